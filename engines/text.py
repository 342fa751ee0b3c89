"""`TokenizingEngine`: turns a BYTES text input into token ids for the engine it wraps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from batchwire.config import TokenizerConfig
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import TensorSpec
from engines.base import Engine

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def load_tokenizer(path: Path, max_length: int) -> Tokenizer:
    """A fast tokenizer from `tokenizer.json` that truncates to `max_length` tokens and
    pads (id 0) to the longest text of each `encode_batch` call."""
    from tokenizers import Tokenizer  # the Rust fast tokenizer; no torch, no transformers

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def tokenize(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    input_ids: str = "input_ids",
    attention_mask: str = "attention_mask",
) -> dict[str, np.ndarray]:
    """Token ids and attention mask, INT64 [len(texts), longest], of a batch of texts."""
    encodings = tokenizer.encode_batch(list(texts))
    return {
        input_ids: np.array([e.ids for e in encodings], dtype=np.int64),
        attention_mask: np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


class TokenizingEngine:
    """Tokenises a batch of texts (Hugging Face fast tokenizer) and runs the inner engine.

    A batch holds either the text input or the pre-tokenised ids and mask (the batcher
    never mixes requests with different input names). Texts are tokenised together, so
    they are padded to the longest text of the batch, not of the request.

    Args:
        inner: the engine that takes `input_ids` / `attention_mask`.
        inputs: every declared input, the text input included.
        config: the model's tokenizer section.
        version_dir: where `config.path` is found.
    """

    def __init__(
        self,
        inner: Engine,
        inputs: tuple[TensorSpec, ...],
        config: TokenizerConfig,
        version_dir: Path,
    ) -> None:
        path = version_dir / config.path
        if not path.is_file():
            raise InferenceError(ErrorCode.NOT_FOUND, f"tokenizer file {path} not found")
        self._tokenizer = load_tokenizer(path, config.max_length)
        self._inner = inner
        self._config = config
        self.inputs = inputs
        self.outputs = inner.outputs
        self.max_batch_size = inner.max_batch_size

    def tokenize(self, texts: np.ndarray) -> dict[str, np.ndarray]:
        """Token ids and attention mask (int64, padded to the longest text) for BYTES texts."""
        strings = [
            t.decode("utf-8", errors="replace") if isinstance(t, bytes) else str(t)
            for t in texts.reshape(-1)
        ]
        return tokenize(
            self._tokenizer,
            strings,
            input_ids=self._config.input_ids,
            attention_mask=self._config.attention_mask,
        )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a batch of texts (tokenised here) or of token ids (passed through)."""
        texts = inputs.get(self._config.text_input)
        if texts is not None:
            inputs = self.tokenize(texts)
        return self._inner.infer(inputs)

    def warmup(self) -> None:
        """Warm the tokenizer and the inner engine."""
        self.infer({self._config.text_input: np.array([[b"warm up"]], dtype=np.object_)})
