"""Drift: the reference profile, PSI on held-out and shifted digits, the window, events, metrics."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from batchwire.config import DriftConfig
from monitoring.drift import (
    CONFIDENCE,
    EMPTY_BIN_SHARE,
    PROFILE_FILENAME,
    DriftAlert,
    DriftCollector,
    DriftMonitor,
    ReferenceProfile,
    build_profile,
    load_profile,
    psi,
    write_profile,
)
from trainer.data import MAX_INTENSITY, load_digits_split

#: A window of a few hundred samples, as a lightly loaded server would hold; every sample
#: joins it (the tests feed in one go what such a server would see over seconds).
CONFIG = DriftConfig(
    window_samples=300, min_samples=200, confidence_output="PROBABILITIES", max_samples_per_s=0
)
DIGITS_GROUPS = {"INPUT", "INPUT:mean", "INPUT:center", "INPUT:border"}


class FakeClock:
    """A settable monotonic clock (seconds)."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture(scope="module")
def session(digits_repository: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(digits_repository / "digits" / "1" / "model.onnx"))


@pytest.fixture(scope="module")
def profile(digits_repository: Path) -> ReferenceProfile:
    loaded = load_profile(digits_repository / "digits" / "1")
    assert loaded is not None, "train digits writes a reference profile"
    return loaded


@pytest.fixture(scope="module")
def x_test() -> np.ndarray:
    """The 360 held-out digits (seed 0: the split the fixture's model was trained on)."""
    return load_digits_split(0)[1]


def probabilities(session: ort.InferenceSession, images: np.ndarray) -> np.ndarray:
    out: np.ndarray = session.run(["PROBABILITIES"], {"INPUT": images.astype(np.float32)})[0]
    return out


def fed(
    profile: ReferenceProfile,
    session: ort.InferenceSession,
    images: np.ndarray,
    config: DriftConfig = CONFIG,
) -> DriftMonitor:
    """A monitor that observed `images` with the model's outputs, in batches of ~16."""
    monitor = DriftMonitor("digits", "1", profile, config)
    for chunk in np.array_split(images, max(1, len(images) // 16)):
        monitor.observe({"INPUT": chunk}, {"PROBABILITIES": probabilities(session, chunk)})
    return monitor


# ------------------------------------------------------------------ the profile
def test_the_trained_version_carries_a_profile_that_round_trips(
    digits_repository: Path, profile: ReferenceProfile, tmp_path: Path
) -> None:
    card = json.loads((digits_repository / "digits" / "1" / "model_card.json").read_text())
    assert card["reference_profile"]["file"] == PROFILE_FILENAME
    assert set(card["reference_profile"]["feature_groups"]) == DIGITS_GROUPS | {CONFIDENCE}
    x_train = load_digits_split(0)[0]
    assert set(profile.features) == DIGITS_GROUPS and profile.confidence is not None
    assert profile.samples == len(x_train)
    for feature in [*profile.features.values(), profile.confidence]:
        assert sum(feature.proportions) == pytest.approx(1.0)
        assert list(feature.edges) == sorted(set(feature.edges))
    pooled = profile.features["INPUT"]
    assert pooled.stats["mean"] == pytest.approx(float(x_train.mean()))
    assert (pooled.stats["min"], pooled.stats["max"]) == (0.0, MAX_INTENSITY)
    # The end bins hold only values outside the training range: none in the reference.
    assert pooled.proportions[0] == pooled.proportions[-1] == 0.0
    assert pooled.edges[-1] == MAX_INTENSITY

    write_profile(profile, tmp_path)
    assert load_profile(tmp_path) == profile
    text = json.dumps(profile.to_json())
    assert ReferenceProfile.from_json(json.loads(text)) == profile
    assert load_profile(tmp_path / "missing") is None


def test_an_unreadable_profile_is_logged_and_ignored(
    profile: ReferenceProfile, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = profile.to_json()
    data["features"]["INPUT"]["proportions"] = [1.0]
    (tmp_path / PROFILE_FILENAME).write_text(json.dumps(data))
    assert load_profile(tmp_path) is None
    (tmp_path / PROFILE_FILENAME).write_text(json.dumps({**profile.to_json(), "format": 99}))
    assert load_profile(tmp_path) is None
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.ERROR]


def test_profile_skips_text_inputs_and_profiles_integer_ones() -> None:
    built = build_profile(
        {
            "TEXT": np.array([[b"a"], [b"b"]], dtype=object),
            "IDS": np.arange(40, dtype=np.int64).reshape(10, 4),
        },
        None,
    )
    assert set(built.features) == {"IDS", "IDS:mean"} and built.confidence is None
    assert built.samples == 10
    assert built.features["IDS"].stats["max"] == 39.0


# ------------------------------------------------------------------ PSI on digits
def test_held_out_digits_do_not_drift(
    profile: ReferenceProfile, session: ort.InferenceSession, x_test: np.ndarray
) -> None:
    # All 360 held-out digits through a 300-sample window: neither the images nor the
    # model's confidence on them were part of the reference (built on the training split).
    monitor = fed(profile, session, x_test)
    assert monitor.evaluate() == []
    assert set(monitor.last_scores) == DIGITS_GROUPS | {CONFIDENCE}
    assert max(monitor.last_scores.values()) < CONFIG.warn_psi, monitor.last_scores
    assert set(monitor.last_states.values()) == {"ok"}


SHIFTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "inverted": lambda x: MAX_INTENSITY - x,
    "doubled": lambda x: x * 2,
    "halved": lambda x: x / 2,
}


@pytest.mark.parametrize("shift", sorted(SHIFTS))
def test_shifted_digits_fire_the_drift_alert(
    profile: ReferenceProfile, session: ort.InferenceSession, x_test: np.ndarray, shift: str
) -> None:
    monitor = fed(profile, session, SHIFTS[shift](x_test[:300]))
    alerts = {a.feature: a for a in monitor.evaluate()}
    assert {"INPUT", "INPUT:mean"} <= {f for f, a in alerts.items() if a.state == "alert"}
    assert alerts["INPUT:mean"].psi == monitor.last_scores["INPUT:mean"] > CONFIG.alert_psi
    assert all(a.model == "digits" and a.version == "1" for a in alerts.values())


def test_values_above_the_training_range_land_in_the_open_end_bin(
    profile: ReferenceProfile, session: ort.InferenceSession, x_test: np.ndarray
) -> None:
    monitor = fed(profile, session, x_test[:300] * 2)
    window = np.concatenate(monitor.window_arrays("INPUT")).reshape(-1)
    counts = profile.features["INPUT"].bin_counts(window)
    assert counts[-1] == np.count_nonzero(window > MAX_INTENSITY) > 0
    assert counts.sum() == window.size


def test_a_shift_in_one_region_shows_in_its_spatial_group(
    profile: ReferenceProfile, session: ort.InferenceSession, x_test: np.ndarray
) -> None:
    images = x_test[:300].copy()
    images[..., 0, :] = MAX_INTENSITY / 2  # a grey bar along the top edge
    monitor = fed(profile, session, images)
    monitor.evaluate()
    assert monitor.last_states["INPUT:border"] == "alert", monitor.last_scores
    assert monitor.last_states["INPUT:center"] == "ok", monitor.last_scores


def test_noise_inputs_shift_the_confidence(
    profile: ReferenceProfile, session: ort.InferenceSession
) -> None:
    noise = np.random.default_rng(0).uniform(0, MAX_INTENSITY, (300, 1, 8, 8))
    monitor = fed(profile, session, noise)
    alerts = {a.feature: a.state for a in monitor.evaluate()}
    assert alerts[CONFIDENCE] == "alert"
    assert monitor.last_scores[CONFIDENCE] > CONFIG.alert_psi


def test_no_score_before_min_samples(profile: ReferenceProfile, x_test: np.ndarray) -> None:
    monitor = DriftMonitor("digits", "1", profile, CONFIG)
    monitor.observe({"INPUT": x_test[:199]}, {})
    assert monitor.scores() == {} and monitor.evaluate() == []
    monitor.observe({"INPUT": x_test[199:200]}, {})
    # No probabilities were observed: the confidence has no score, the inputs have.
    assert set(monitor.scores()) == DIGITS_GROUPS


# ------------------------------------------------------------------ the window
def test_the_window_slides_by_whole_samples(profile: ReferenceProfile, x_test: np.ndarray) -> None:
    config = DriftConfig(window_samples=100, min_samples=10)
    monitor = DriftMonitor("digits", "1", profile, config)
    monitor.observe({"INPUT": np.zeros((100, 1, 8, 8), np.float32)}, {})
    zeros_psi = monitor.scores()["INPUT"]
    for chunk in np.array_split(x_test[:150], 3):  # 50 each: the window ends mid-batch
        monitor.observe({"INPUT": chunk}, {})
    assert monitor.window_samples == 100 and monitor.observed_total == 250
    np.testing.assert_array_equal(np.concatenate(monitor.window_arrays("INPUT")), x_test[50:150])
    # The old all-zero samples left: scores are those of the last 100 images alone.
    alone = DriftMonitor("digits", "1", profile, config)
    alone.observe({"INPUT": x_test[50:150]}, {})
    assert monitor.scores() == alone.scores()
    assert monitor.scores()["INPUT"] < zeros_psi


def test_unread_observations_are_folded_into_the_window_as_they_come(
    profile: ReferenceProfile, x_test: np.ndarray
) -> None:
    """Nothing reads the window (no evaluation): what `observe` keeps stays bounded."""
    config = DriftConfig(window_samples=100, min_samples=10, max_samples_per_s=0)  # take all
    monitor = DriftMonitor("digits", "1", profile, config)
    for row in range(350):
        monitor.observe({"INPUT": x_test[row : row + 1]}, {})
        assert len(monitor._pending) < 100 and len(monitor._window) <= 100
    assert monitor.window_samples == 100 and monitor.observed_total == 350
    np.testing.assert_array_equal(np.concatenate(monitor.window_arrays("INPUT")), x_test[250:350])
    batches = [x_test[start : start + 40] for start in range(0, 320, 40)]
    for batch in batches:  # batches: the samples kept stay near two windows
        monitor.observe({"INPUT": batch}, {})
        kept = sum(e[2] for e in (*monitor._pending, *monitor._window))
        assert kept < 100 + 100 + 40
    assert monitor.window_samples == 100 and monitor.observed_total == 350 + 320
    np.testing.assert_array_equal(
        np.concatenate(monitor.window_arrays("INPUT")), np.concatenate(batches)[-100:]
    )


def test_observe_is_thread_safe(profile: ReferenceProfile, x_test: np.ndarray) -> None:
    config = DriftConfig(window_samples=500, min_samples=10, max_samples_per_s=0)  # take all
    monitor = DriftMonitor("digits", "1", profile, config)
    sizes = (1, 3, 7, 16)  # one batch size per thread
    calls = 400
    errors: list[BaseException] = []
    done = threading.Event()

    def feed(size: int) -> None:
        batch = {"INPUT": x_test[:size]}
        for _ in range(calls):
            monitor.observe(batch, {})

    def evaluate() -> None:  # scoring concurrently with observe must not break either
        try:
            while not done.is_set():
                monitor.evaluate()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=feed, args=(size,)) for size in sizes]
    scorer = threading.Thread(target=evaluate)
    scorer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    scorer.join()
    assert errors == []
    assert monitor.observed_total == calls * sum(sizes)
    assert monitor.window_samples == 500
    assert sum(len(a) for a in monitor.window_arrays("INPUT")) == 500


def test_at_most_max_samples_per_s_join_the_window(
    profile: ReferenceProfile, x_test: np.ndarray
) -> None:
    """A token bucket of one second's worth: requests beyond the rate are skipped whole,
    a batch is taken whole while any budget is left, and the budget refills with time."""
    clock = FakeClock()
    config = DriftConfig(window_samples=1000, min_samples=10, max_samples_per_s=100)
    monitor = DriftMonitor("digits", "1", profile, config, clock=clock)
    one = {"INPUT": x_test[:1]}
    for _ in range(500):  # a burst at one instant: one second's budget
        monitor.observe(one, {})
    assert monitor.observed_total == 100
    clock.now_s += 0.5  # half a second refills half the budget
    for _ in range(500):
        monitor.observe(one, {})
    assert monitor.observed_total == 150
    clock.now_s += 10.0  # the budget holds one second's worth, no more
    for _ in range(500):
        monitor.observe(one, {})
    assert monitor.observed_total == 250
    clock.now_s += 0.01  # one sample's budget: a batch of 256 is taken whole ...
    monitor.observe({"INPUT": x_test[:256]}, {})
    assert monitor.observed_total == 506
    clock.now_s += 2.5  # ... and leaves a debt of 255 samples, 2.55 s to pay back
    monitor.observe(one, {})
    assert monitor.observed_total == 506
    clock.now_s += 0.1
    monitor.observe(one, {})
    assert monitor.observed_total == 507
    everything = DriftMonitor(
        "digits", "1", profile, config.model_copy(update={"max_samples_per_s": 0}), clock=clock
    )
    for _ in range(500):  # 0: every sample
        everything.observe(one, {})
    assert everything.observed_total == 500


class Lane:
    """What the CPU lane does with a drift monitor's `lane_gap` (see `ModelObserver`)."""

    def __init__(self, monitor: DriftMonitor, clock: FakeClock, batch: dict[str, np.ndarray]):
        self.monitor, self.clock, self.batch = monitor, clock, batch
        self.countdown = 1

    def second(self, requests: int, seconds: float = 1.0) -> int:
        """`requests` spread over one second (or `seconds`); how many were offered to
        `observe`."""
        offered = 0
        for _ in range(requests):
            self.clock.now_s += seconds / requests
            self.countdown -= 1
            if self.countdown <= 0:
                self.countdown = self.monitor.lane_gap()
                self.monitor.observe(self.batch, {})
                offered += 1
        return offered


def test_the_cpu_lane_offers_about_the_budgets_rate_of_requests(
    profile: ReferenceProfile, x_test: np.ndarray
) -> None:
    """`lane_stride` follows the lane's request rate (re-estimated at `evaluate`) so that
    the lane calls `observe` about `max_samples_per_s` times a second, at random gaps
    averaging the stride; 1 below that rate or without a budget, unchanged without
    traffic."""
    clock = FakeClock()
    config = DriftConfig(window_samples=1000, min_samples=10, max_samples_per_s=100)
    monitor = DriftMonitor("digits", "1", profile, config, clock=clock)
    assert monitor.lane_stride == 1 and monitor.lane_gap() == 1
    monitor.evaluate()
    lane = Lane(monitor, clock, {"INPUT": x_test[:1]})
    offered = []
    for _ in range(3):  # 3 s of 1,000 requests a second
        offered.append(lane.second(1000))
        monitor.evaluate()
    assert offered[0] == 1000  # the first second: every request (the stride was 1)
    assert 80 <= offered[2] <= 120  # then about 100 a second
    stride = monitor.lane_stride  # estimated from the gaps drawn: about 10
    assert 9 <= stride <= 11
    drawn = DriftMonitor("digits", "2", profile, config, clock=clock)
    drawn.lane_stride = stride
    gaps = [drawn.lane_gap() for _ in range(5000)]
    assert min(gaps) == 1 and max(gaps) == 2 * stride - 1
    assert 0.95 * stride <= np.mean(gaps) <= 1.05 * stride
    clock.now_s += 1.0  # no traffic for a second: no news, the stride stays
    monitor.evaluate()
    assert monitor.lane_stride == stride
    for _ in range(2):  # 50 requests a second, below the budget: every request again
        lane.second(50)
        monitor.evaluate()
    assert monitor.lane_stride == 1
    assert lane.second(50) == 50
    unbounded = DriftMonitor(
        "digits", "1", profile, config.model_copy(update={"max_samples_per_s": 0}), clock=clock
    )
    Lane(unbounded, clock, {"INPUT": x_test[:1]}).second(1000)
    unbounded.evaluate()
    assert unbounded.lane_stride == 1


def test_requests_served_while_detached_count_in_the_lane_rate(
    profile: ReferenceProfile, x_test: np.ndarray
) -> None:
    """A lane whose observer is detached half of each second (as the paired benchmark
    switches monitoring) is taken for one of half its rate, unless the requests it served
    meanwhile are counted in (`count_lane_requests`): then the stride is that of its whole
    traffic."""
    config = DriftConfig(window_samples=1000, min_samples=10, max_samples_per_s=100)
    strides = {}
    for counted_in in (False, True):
        clock = FakeClock()
        monitor = DriftMonitor("digits", "1", profile, config, clock=clock)
        monitor.evaluate()
        lane = Lane(monitor, clock, {"INPUT": x_test[:1]})
        for _ in range(4):  # 1,000 requests a second, half of them shown
            lane.second(500, seconds=0.5)
            clock.now_s += 0.5
            if counted_in:
                monitor.count_lane_requests(500)
            monitor.evaluate()
        strides[counted_in] = monitor.lane_stride
    assert 9 <= strides[True] <= 11
    assert 4 <= strides[False] <= 6


def test_variable_shapes_in_one_window_are_scored() -> None:
    reference = np.random.default_rng(0).integers(0, 100, (1000, 8))
    built = build_profile({"IDS": reference}, None)
    monitor = DriftMonitor("m", "1", built, DriftConfig(window_samples=400, min_samples=100))
    monitor.observe({"IDS": reference[:200, :5]}, {})  # shorter sequences, same values
    monitor.observe({"IDS": reference[200:400]}, {})
    scores = monitor.scores()
    assert set(scores) == {"IDS", "IDS:mean"}
    assert scores["IDS"] < 0.1


# ------------------------------------------------------------------ PSI and events
def test_psi_is_zero_for_identical_distributions_and_grows_with_shift() -> None:
    reference = (0.25, 0.25, 0.25, 0.25)
    assert psi(reference, np.array([25, 25, 25, 25])) == pytest.approx(0.0)
    small, large = (
        psi(reference, np.array([40, 20, 20, 20])),
        psi(reference, np.array([70, 10, 10, 10])),
    )
    assert 0 < small < large
    # An empty live bin counts as EMPTY_BIN_SHARE: finite.
    empty = psi(reference, np.array([0, 50, 25, 25]))
    assert np.isfinite(empty) and empty > 0.25
    share = EMPTY_BIN_SHARE
    assert psi((0.0, 1.0), np.array([0, 10])) == pytest.approx(0.0)
    assert psi((0.0, 1.0), np.array([5, 5])) == pytest.approx(
        (0.5 - share) * np.log(0.5 / share) + (0.5 - 1.0) * np.log(0.5)
    )


def synthetic_monitor(clock: FakeClock) -> tuple[DriftMonitor, Callable[[float], None]]:
    """A monitor over a 1-feature Gaussian reference, and a function that fills its window
    with samples shifted by `mu` standard deviations (PSI grows about as mu**2)."""
    rng = np.random.default_rng(1)
    built = build_profile({"X": rng.normal(0.0, 1.0, (20_000, 1))}, None)
    # Every sample taken: each `fill` replaces the whole window, however close in time.
    config = DriftConfig(window_samples=2000, min_samples=100, max_samples_per_s=0)
    monitor = DriftMonitor("m", "7", built, config, clock=clock)

    def fill(mu: float) -> None:
        monitor.observe({"X": rng.normal(mu, 1.0, (2000, 1))}, {})

    return monitor, fill


def test_each_transition_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="monitoring.drift")
    clock = FakeClock()
    monitor, fill = synthetic_monitor(clock)
    expected = ["ok", "warn", "alert", "alert", "ok"]
    for step, mu in enumerate((0.0, 0.45, 1.0, 1.0, 0.0)):
        clock.now_s = 100.0 + step
        fill(mu)
        monitor.evaluate()
        assert monitor.last_states["X"] == expected[step], monitor.last_scores
        monitor.evaluate()  # nothing changed: no new event
    events = [
        (r.levelno, json.loads(r.getMessage()))
        for r in caplog.records
        if r.name == "monitoring.drift"
    ]
    x = [(level, e["previous"], e["state"]) for level, e in events if e["feature"] == "X"]
    assert x == [
        (logging.WARNING, "ok", "warn"),
        (logging.WARNING, "warn", "alert"),
        (logging.INFO, "alert", "ok"),
    ]
    first = next(e for _, e in events if e["feature"] == "X")
    assert first["model"] == "m" and first["version"] == "7" and first["event"] == "drift"
    assert CONFIG.warn_psi < first["psi"] <= CONFIG.alert_psi
    assert first["window_samples"] == 2000


def test_alerts_say_since_when(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    monitor, fill = synthetic_monitor(clock)
    fill(1.0)
    clock.now_s = 200.0
    alerts = monitor.evaluate()
    clock.now_s = 260.0
    assert monitor.evaluate() == alerts
    assert alerts == [
        DriftAlert("m", "7", feature, "alert", monitor.last_scores[feature], 200.0)
        for feature in ("X", "X:mean")
    ]
    snapshot = monitor.snapshot()
    assert json.loads(json.dumps(snapshot)) == snapshot
    assert snapshot["alerts"] == ["X", "X:mean"] and snapshot["window_age_s"] == 160.0
    assert snapshot["states"] == {"X": "alert", "X:mean": "alert"}


def test_collector_exposes_scores_states_and_window(
    profile: ReferenceProfile, session: ort.InferenceSession, x_test: np.ndarray
) -> None:
    shifted = fed(profile, session, MAX_INTENSITY - x_test[:300])
    shifted.evaluate()
    quiet = DriftMonitor("digits", "2", profile, CONFIG)  # nothing observed yet
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DriftCollector(lambda: [shifted, quiet]))
    values = {
        (s.name, s.labels["version"], s.labels.get("feature")): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert values[("batchwire_drift_psi", "1", "INPUT:mean")] == pytest.approx(
        shifted.last_scores["INPUT:mean"]
    )
    assert values[("batchwire_drift_state", "1", "INPUT:mean")] == 2
    assert values[("batchwire_drift_state", "1", CONFIDENCE)] == 2
    assert values[("batchwire_drift_window_samples", "1", None)] == 300
    assert values[("batchwire_drift_observed_samples_total", "1", None)] == 300
    assert values[("batchwire_drift_window_samples", "2", None)] == 0
    assert not any(name == "batchwire_drift_psi" and v == "2" for name, v, _ in values)
