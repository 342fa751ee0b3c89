"""`train digits` writes a valid reference profile of its training split and its confidence."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from batchwire.config import load_model_config
from monitoring.drift import CONFIDENCE, PROFILE_FILENAME, load_profile, top_class_confidence
from trainer.cli import add_train_parser
from trainer.data import MAX_INTENSITY, load_digits_split
from trainer.digits import MODEL_CARD_FILENAME
from trainer.profile import reference_profile, write_reference_profile

SEED = 2


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`batchwire train digits` (2 epochs, seed 2) into a fresh repository."""
    repository = tmp_path_factory.mktemp("model_repository")
    parser = argparse.ArgumentParser(prog="batchwire")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["train", "digits", "--model-repository", str(repository), "--epochs", "2",
         "--seed", str(SEED), "--no-progress"]
    )  # fmt: skip
    assert args.func(args) == 0
    return repository / "digits" / "1"


def test_train_digits_writes_the_profile_of_its_training_split(version_dir: Path) -> None:
    profile = load_profile(version_dir)
    assert profile is not None
    x_train = load_digits_split(SEED)[0]
    assert profile.samples == len(x_train)
    assert "training split" in profile.source and f"seed {SEED}" in profile.source
    assert set(profile.features) == {"INPUT", "INPUT:mean", "INPUT:center", "INPUT:border"}
    # Every group's reference shares are those of the training split, bin for bin.
    groups = {
        "INPUT": x_train.reshape(-1),
        "INPUT:mean": x_train.reshape(len(x_train), -1).mean(axis=1, dtype=np.float64),
        "INPUT:center": x_train[..., 1:-1, 1:-1].reshape(-1),
    }
    for name, values in groups.items():
        feature = profile.features[name]
        shares = feature.bin_counts(values) / values.size
        np.testing.assert_allclose(shares, feature.proportions, atol=1e-12, err_msg=name)
        assert feature.stats["mean"] == pytest.approx(float(values.mean(dtype=np.float64)))
        assert feature.stats["min"] <= feature.stats["p50"] <= feature.stats["max"]
    assert profile.features["INPUT"].stats["max"] == MAX_INTENSITY
    # The confidence is the served (ONNX) model's top-class probability on the training split.
    session = ort.InferenceSession(str(version_dir / "model.onnx"))
    confidence = top_class_confidence(session.run(["PROBABILITIES"], {"INPUT": x_train})[0])
    assert profile.confidence is not None
    shares = profile.confidence.bin_counts(confidence) / confidence.size
    np.testing.assert_allclose(shares, profile.confidence.proportions, atol=1e-12)
    assert 1 / 10 <= profile.confidence.stats["min"] <= profile.confidence.stats["max"] <= 1


def test_the_model_card_and_config_mention_the_profile(version_dir: Path) -> None:
    card = json.loads((version_dir / MODEL_CARD_FILENAME).read_text())
    entry = card["reference_profile"]
    assert entry["file"] == PROFILE_FILENAME and (version_dir / PROFILE_FILENAME).is_file()
    assert entry["samples"] == card["data"]["train_size"]
    assert CONFIDENCE in entry["feature_groups"] and "INPUT:mean" in entry["feature_groups"]
    config = load_model_config(version_dir.parent)
    assert config.drift is not None and config.drift.confidence_output == "PROBABILITIES"
    assert config.slo is not None and config.slo.latency_threshold_ms == 50


def test_a_profile_without_probabilities_has_no_confidence(tmp_path: Path) -> None:
    inputs = {"X": np.random.default_rng(0).normal(size=(50, 4)).astype(np.float32)}
    entry = write_reference_profile(tmp_path, inputs, None, source="unit test")
    assert entry["feature_groups"] == ["X", "X:mean"] and entry["samples"] == 50
    profile = load_profile(tmp_path)
    assert profile is not None and profile.confidence is None and profile.source == "unit test"


def test_probabilities_must_match_the_inputs() -> None:
    inputs = {"X": np.zeros((5, 2), np.float32)}
    with pytest.raises(ValueError, match="4 probability rows"):
        reference_profile(inputs, np.full((4, 3), 1 / 3, np.float32))


def test_every_trainer_config_has_an_slo_and_only_digits_a_drift_block() -> None:
    from trainer.digits import digits_config
    from trainer.minilm import minilm_config
    from trainer.mlp64 import mlp64_config

    thresholds_ms = {}
    for config in (digits_config(), mlp64_config(), minilm_config()):
        assert config.slo is not None
        thresholds_ms[config.name] = config.slo.latency_threshold_ms
        assert (config.drift is not None) == (config.name == "digits")
    assert thresholds_ms == {"digits": 50, "mlp64": 25, "minilm": 1000}
