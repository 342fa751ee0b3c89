"""Drift: the reference profile, PSI on shifted digits, the sliding window, events, metrics."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from batchwire.config import DriftConfig
from monitoring.drift import (
    CONFIDENCE,
    PROFILE_FILENAME,
    DriftCollector,
    DriftMonitor,
    ReferenceProfile,
    build_profile,
    load_profile,
    psi,
    write_profile,
)
from trainer.data import MAX_INTENSITY, load_digits_split

CONFIG = DriftConfig(window_samples=300, min_samples=200, confidence_output="PROBABILITIES")


@pytest.fixture(scope="module")
def session(digits_repository: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(digits_repository / "digits" / "1" / "model.onnx"))


@pytest.fixture(scope="module")
def profile(digits_repository: Path) -> ReferenceProfile:
    loaded = load_profile(digits_repository / "digits" / "1")
    assert loaded is not None, "train digits writes a reference profile"
    return loaded


def probabilities(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    out: np.ndarray = session.run(["PROBABILITIES"], {"INPUT": images.astype(np.float32)})[0]
    return out


def scored(
    profile: ReferenceProfile,
    session: ort.InferenceSession,
    images: np.ndarray,
    config: DriftConfig = CONFIG,
) -> tuple[DriftMonitor, dict[str, str]]:
    monitor = DriftMonitor("digits", "1", profile, config)
    for chunk in np.array_split(images, max(1, len(images) // 16)):  # batches of ~16
        monitor.observe({"INPUT": chunk}, {"PROBABILITIES": probabilities(session, chunk)})
    return monitor, monitor.evaluate()  # fmt: skip


def test_the_trained_version_carries_a_profile_that_round_trips(
    digits_repository: Path, profile: ReferenceProfile, tmp_path: Path
) -> None:
    card = json.loads((digits_repository / "digits" / "1" / "model_card.json").read_text())
    assert card["reference_profile"] == PROFILE_FILENAME
    assert {"INPUT", "INPUT:mean", "INPUT:center", "INPUT:border"} <= set(profile.features)
    assert profile.confidence is not None and profile.samples > 1000
    for feature in profile.features.values():
        assert sum(feature.proportions) == pytest.approx(1.0)
        assert list(feature.edges) == sorted(feature.edges)
    assert 0 <= profile.features["INPUT"].stats["min"] <= profile.features["INPUT"].stats["max"]
    write_profile(profile, tmp_path)
    assert load_profile(tmp_path) == profile
    assert load_profile(tmp_path / "missing") is None


def test_held_out_digits_do_not_drift(
    profile: ReferenceProfile, session: ort.InferenceSession
) -> None:
    # Held-out digits: unseen by the input reference (built on the training split); the
    # confidence reference is the model's confidence on this held-out split.
    x_test = load_digits_split(0)[1][:300]
    monitor, states = scored(profile, session, x_test)
    assert states == {}
    assert max(monitor.last_scores.values()) < CONFIG.warn_psi
    assert set(monitor.last_scores) >= {"INPUT", "INPUT:mean", CONFIDENCE}


@pytest.mark.parametrize(
    ("name", "shift"),
    [
        ("inverted", lambda x: MAX_INTENSITY - x),
        ("doubled", lambda x: x * 2),
        ("halved", lambda x: x / 2),
    ],
)
def test_shifted_digits_fire_the_drift_alert(
    profile: ReferenceProfile, session: ort.InferenceSession, name: str, shift: object
) -> None:
    assert callable(shift)
    x_test = load_digits_split(0)[1]
    monitor, states = scored(profile, session, shift(x_test[:300]))
    assert "alert" in states.values(), f"{name}: {monitor.last_scores}"
    assert monitor.last_scores["INPUT:mean"] > CONFIG.alert_psi


def test_noise_inputs_shift_the_confidence(
    profile: ReferenceProfile, session: ort.InferenceSession
) -> None:
    noise = np.random.default_rng(0).uniform(0, MAX_INTENSITY, (300, 1, 8, 8))
    monitor, states = scored(profile, session, noise)
    assert monitor.last_scores[CONFIDENCE] > CONFIG.alert_psi
    assert states[CONFIDENCE] == "alert"


def test_no_score_before_min_samples(profile: ReferenceProfile) -> None:
    monitor = DriftMonitor("digits", "1", profile, CONFIG)
    monitor.observe({"INPUT": np.zeros((10, 1, 8, 8), np.float32)}, {})
    assert monitor.scores() == {} and monitor.evaluate() == {}


def test_window_slides_and_observe_is_thread_safe(profile: ReferenceProfile) -> None:
    monitor = DriftMonitor("digits", "1", profile, DriftConfig(window_samples=100, min_samples=1))
    batch = {"INPUT": np.zeros((4, 1, 8, 8), np.float32)}

    def feed() -> None:
        for _ in range(500):
            monitor.observe(batch, {})

    threads = [threading.Thread(target=feed) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert monitor.observed_total == 4 * 500 * 4
    assert 100 <= monitor.window_samples < 104  # whole batches, just enough to fill it
    # New in-distribution samples replace the old all-zero ones.
    images = load_digits_split(0)[1][:100]
    zeros_psi = monitor.scores()["INPUT"]
    monitor.observe({"INPUT": images}, {})
    assert monitor.scores()["INPUT"] < zeros_psi


def test_transitions_are_logged_once(
    profile: ReferenceProfile, session: ort.InferenceSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="monitoring.drift")
    x_test = load_digits_split(0)[1][:300]
    monitor = DriftMonitor("digits", "1", profile, CONFIG)
    monitor.observe({"INPUT": MAX_INTENSITY - x_test}, {})
    monitor.evaluate()
    monitor.evaluate()  # no change: no new event
    monitor.observe({"INPUT": x_test}, {})  # the window now holds in-distribution inputs
    monitor.evaluate()
    events = [json.loads(r.getMessage()) for r in caplog.records]
    mean = [(e["previous"], e["state"]) for e in events if e["feature"] == "INPUT:mean"]
    assert mean == [("ok", "alert"), ("alert", "ok")]


def test_psi_is_zero_for_identical_distributions_and_grows_with_shift() -> None:
    reference = (0.25, 0.25, 0.25, 0.25)
    assert psi(reference, np.array([25, 25, 25, 25])) == pytest.approx(0.0)
    assert psi(reference, np.array([40, 20, 20, 20])) < psi(reference, np.array([70, 10, 10, 10]))


def test_profile_skips_text_inputs() -> None:
    profile = build_profile(
        {"TEXT": np.array([b"a", b"b"], dtype=object), "X": np.arange(20.0).reshape(10, 2)},
        None,
    )
    assert set(profile.features) == {"X", "X:mean"}


def test_collector_exposes_scores_states_and_window(
    profile: ReferenceProfile, session: ort.InferenceSession
) -> None:
    x_test = load_digits_split(0)[1][:300]
    monitor, _ = scored(profile, session, MAX_INTENSITY - x_test)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DriftCollector(lambda: [monitor]))
    values = {
        (s.name, s.labels.get("feature")): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert values[("batchwire_drift_psi", "INPUT:mean")] > CONFIG.alert_psi
    assert values[("batchwire_drift_state", "INPUT:mean")] == 2
    assert values[("batchwire_drift_window_samples", None)] == monitor.window_samples
