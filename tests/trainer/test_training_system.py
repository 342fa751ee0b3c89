"""The digits training pipeline end to end: data, training, export, model card, publishing, CLI."""

from __future__ import annotations

import argparse
import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

import trainer.digits
from batchwire.config import load_model_config, version_dirs
from engines.loader import load_engine
from trainer.cli import add_train_parser
from trainer.data import dataset_sha256, load_digits_arrays, load_digits_split
from trainer.digits import (
    MODEL_CARD_FILENAME,
    DigitsCNN,
    ExportMismatchError,
    TrainResult,
    digits_config,
    parameter_count,
    train_digits,
)
from trainer.publish import file_sha256

EPOCHS = 8
MIN_ACCURACY_8_EPOCHS = 0.93  # measured 0.961 (seed 0); 30 epochs reach ~0.98
N_IMAGES, N_TEST = 1797, 360


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model_repository")


@pytest.fixture(scope="module")
def first(repository: Path) -> TrainResult:
    return train_digits(repository, epochs=EPOCHS, seed=0, progress=False)


@pytest.fixture(scope="module")
def second(repository: Path, first: TrainResult) -> TrainResult:
    """The same training again, into the same repository."""
    return train_digits(repository, epochs=EPOCHS, seed=0, progress=False)


def _onnx_outputs(result: TrainResult) -> dict[str, np.ndarray]:
    engine = load_engine(load_model_config(result.model_dir), result.version_dir)
    _, x_test, _, _ = load_digits_split(seed=0)
    return engine.infer({"INPUT": x_test})


# ---------------------------------------------------------------------------- data
def test_digits_split() -> None:
    x_train, x_test, y_train, y_test = load_digits_split(seed=0)
    assert x_train.shape == (N_IMAGES - N_TEST, 1, 8, 8) and x_test.shape == (N_TEST, 1, 8, 8)
    assert x_train.dtype == x_test.dtype == np.float32
    assert y_train.dtype == y_test.dtype == np.int64
    assert x_train.min() == 0 and x_train.max() == 16  # raw intensities, not normalised
    assert np.array_equal(x_train, np.round(x_train))
    # Stratified: every digit is held out in proportion (36 or 37 of ~180 each).
    assert set(np.bincount(y_test, minlength=10)) <= {35, 36, 37, 38}
    # The same seed gives the same split; another seed a different one of the same data.
    again = load_digits_split(seed=0)
    for a, b in zip((x_train, x_test, y_train, y_test), again, strict=True):
        np.testing.assert_array_equal(a, b)
    other = load_digits_split(seed=1)
    assert not np.array_equal(other[1], x_test)
    images, labels = load_digits_arrays()
    assert np.sort(np.concatenate([y_train, y_test])).tolist() == np.sort(labels).tolist()
    assert np.isclose(np.concatenate([x_train, x_test]).sum(), images.sum())


def test_data_hash_is_stable() -> None:
    digest = dataset_sha256()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert dataset_sha256() == digest


# --------------------------------------------------------------- train and publish
def test_publishes_a_complete_version_folder(first: TrainResult, repository: Path) -> None:
    assert first.version == 1
    assert first.model_dir == repository / "digits"
    assert first.version_dir == repository / "digits" / "1"
    assert sorted(p.name for p in first.version_dir.iterdir()) == [
        "model.onnx", "model.pt", MODEL_CARD_FILENAME, "reference_profile.json",
    ]  # fmt: skip
    leftovers = [p.name for p in first.model_dir.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert first.test_accuracy >= MIN_ACCURACY_8_EPOCHS
    assert first.train_time_s > 0


def test_model_card(first: TrainResult) -> None:
    card = json.loads((first.version_dir / MODEL_CARD_FILENAME).read_text())
    assert card == first.card
    assert card["name"] == "digits" and card["version"] == 1
    assert datetime.fromisoformat(card["created"]).utcoffset() is not None
    assert card["seed"] == 0 and card["epochs"] == EPOCHS
    assert card["test_accuracy"] == first.test_accuracy
    # The accuracy is a whole number of correct answers out of the test size.
    correct = card["test_accuracy"] * card["data"]["test_size"]
    assert abs(correct - round(correct)) < 1e-9
    assert card["data"]["train_size"] == N_IMAGES - N_TEST
    assert card["data"]["test_size"] == N_TEST
    assert card["data"]["sha256"] == dataset_sha256()
    assert card["parameter_count"] == first.parameter_count == parameter_count(DigitsCNN())
    assert 30_000 <= card["parameter_count"] <= 40_000
    assert card["onnx_sha256"] == file_sha256(first.version_dir / "model.onnx")
    assert card["files"]["model.pt"]["sha256"] == file_sha256(first.version_dir / "model.pt")
    assert set(card["packages"]) == {"python", "torch", "onnx", "onnxruntime", "numpy", "sklearn"}
    assert card["packages"]["torch"] == torch.__version__
    assert max(card["export_max_abs_diff"].values()) <= 1e-5
    assert card["inputs"] == [
        {"name": "INPUT", "datatype": "FP32", "dims": [1, 8, 8], "optional": False}
    ]
    assert card["outputs"] == [
        {"name": "PROBABILITIES", "datatype": "FP32", "dims": [10], "optional": False},
        {"name": "LABEL", "datatype": "INT64", "dims": [1], "optional": False},
    ]


def test_config_yaml(first: TrainResult) -> None:
    config = load_model_config(first.model_dir)
    assert config == digits_config()
    assert config.name == "digits" and config.backend == "onnxruntime"
    assert config.max_batch_size == 64
    assert [t.spec() for t in config.inputs] == [t.spec() for t in digits_config().inputs]
    assert config.dynamic_batching is not None
    assert config.dynamic_batching.preferred_batch_size == [16, 32]
    assert config.dynamic_batching.max_queue_delay_us == 500
    assert config.dynamic_batching.max_queue_size == 1024
    assert config.instance_count == 1 and config.intra_op_threads == 1


def test_second_run_is_version_2_and_reproduces_the_first(
    first: TrainResult, second: TrainResult
) -> None:
    assert second.version == 2
    assert sorted(version_dirs(first.model_dir)) == [1, 2]
    assert second.test_accuracy == first.test_accuracy
    assert second.card["onnx_sha256"] == first.card["onnx_sha256"]
    a, b = _onnx_outputs(first), _onnx_outputs(second)
    np.testing.assert_array_equal(a["PROBABILITIES"], b["PROBABILITIES"])
    np.testing.assert_array_equal(a["LABEL"], b["LABEL"])


@pytest.mark.parametrize("backend", ["onnxruntime", "torchscript"])
def test_published_model_serves_the_held_out_split(first: TrainResult, backend: str) -> None:
    config = load_model_config(first.model_dir).model_copy(update={"backend": backend})
    engine = load_engine(config, first.version_dir)
    engine.warmup()
    _, x_test, _, y_test = load_digits_split(seed=0)
    out = engine.infer({"INPUT": x_test})  # raw 0..16 intensities: the graph normalises
    accuracy = float(np.mean(out["LABEL"][:, 0] == y_test))
    assert accuracy == pytest.approx(first.test_accuracy, abs=1 / N_TEST)
    assert accuracy >= MIN_ACCURACY_8_EPOCHS


def test_explicit_version_and_conflicts(tmp_path: Path) -> None:
    result = train_digits(tmp_path, epochs=1, progress=False, version=5)
    assert result.version == 5 and result.version_dir == tmp_path / "digits" / "5"
    with pytest.raises(FileExistsError):
        train_digits(tmp_path, epochs=1, progress=False, version=5)
    assert train_digits(tmp_path, epochs=1, progress=False).version == 6


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"version": 0}])
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, int | float]) -> None:
    with pytest.raises(ValueError):
        train_digits(tmp_path, progress=False, **kwargs)  # type: ignore[arg-type]


def test_failed_export_check_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def mismatch(what: str, *args: object) -> float:
        raise ExportMismatchError(f"{what} disagrees")

    monkeypatch.setattr(trainer.digits, "_check_matches", mismatch)
    with pytest.raises(ExportMismatchError):
        train_digits(tmp_path, epochs=1, progress=False)
    assert list((tmp_path / "digits").iterdir()) == []  # no version, no staging, no config


def test_training_restores_torch_global_state(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    rng_state = torch.get_rng_state()
    train_digits(tmp_path, epochs=1, progress=False)
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic
    assert torch.equal(torch.get_rng_state(), rng_state)


# ---------------------------------------------------------------------------- CLI
def test_cli_trains_and_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="batchwire")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["train", "digits", "--model-repository", str(tmp_path), "--epochs", "2", "--seed", "3"]
    )
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "digits version 1" in captured.out and str(tmp_path / "digits" / "1") in captured.out
    assert "test accuracy" in captured.out
    assert "epoch" in captured.err  # the progress bar, on stderr
    card = json.loads((tmp_path / "digits" / "1" / MODEL_CARD_FILENAME).read_text())
    assert card["epochs"] == 2 and card["seed"] == 3

    args = parser.parse_args(
        ["train", "digits", "--model-repository", str(tmp_path), "--epochs", "1", "--no-progress"]
    )
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert "digits version 2" in captured.out and captured.err == ""
