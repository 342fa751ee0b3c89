"""Input and output drift: a live window of each model version compared with its training profile.

**Reference profile.** The trainer writes `<version>/reference_profile.json` (`build_profile`
+ `write_profile`, called from `trainer/profile.py`) next to `model_card.json`. For each
*feature group* it holds fixed bin edges, the reference share of values in each bin and
summary statistics (mean, std, min, max, quantiles); and the same for the model's top-class
confidence when the model has a probabilities output. Feature groups of a numeric input `X`
(BYTES inputs have none):

- `X`: every element, pooled (the value distribution);
- `X:mean`: each sample's mean (a rescaled or shifted input moves it even where the pooled
  histograms overlap);
- `X:center` / `X:border`: the inner elements and the outermost ring of the last two dims,
  for inputs laid out as at least 3x3 images (a shift confined to one region shows up);
- `confidence`: the top-class probability, `max` over the `confidence_output` of a sample.

**Bins.** Edges are the reference's deciles (ties merged, so integer pixels get fewer
bins). Input groups add two edges at the reference's min and max, so the end bins are
open-ended and hold only values *outside* the training range (a doubled image lands there);
their reference share is 0. Bins are right-closed: bin i holds (edges[i-1], edges[i]].

**Score.** The population stability index over the bins,
`PSI = sum((live - ref) * ln(live / ref))`, with empty bins counted as `EMPTY_BIN_SHARE`
(1e-4) so it stays finite. Rule of thumb (and the config defaults): below 0.1 no shift,
0.1-0.25 a moderate shift (`warn`), above 0.25 a significant one (`alert`).

**Server side.** `DriftMonitor.observe` only appends references to a batch's arrays to a
deque (about 0.5 µs), at most about `max_samples_per_s` samples a second (a token bucket:
at higher rates the rest cost a clock read). On the CPU lane, where each request is a call,
the caller also thins the calls without making them (`lane_gap`): above the budget's rate
it observes about one request in `lane_stride` (re-estimated at each `evaluate` from the
lane's request rate, at random gaps so that periodic traffic is not aliased), and the
others cost it a counter decrement. `scores` / `evaluate` histogram the last
`window_samples` samples on demand, vectorised, off the event loop (the monitoring hub
evaluates once a second in a thread). Each change of a group's state is logged once as a
JSON event (logger `monitoring.drift`); `DriftCollector` exports the scores to Prometheus.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batchwire.config import DriftConfig

logger = logging.getLogger(__name__)

PROFILE_FILENAME: Final = "reference_profile.json"
#: Version of the profile's JSON layout (`ReferenceProfile.to_json`).
PROFILE_FORMAT: Final = 2
#: Feature name of the top-class confidence.
CONFIDENCE: Final = "confidence"
#: Share used for an empty bin (live or reference), so PSI stays finite.
EMPTY_BIN_SHARE: Final = 1e-4
#: Quantile bins per feature group (fewer where values tie, as integer pixels do).
DEFAULT_BINS: Final = 10
#: Quantiles kept in each group's summary statistics (`p01`... in the JSON).
SUMMARY_QUANTILES: Final = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
#: Drift states, in order of severity (their index is the Prometheus state value).
STATES: Final = ("ok", "warn", "alert")

DriftState = Literal["ok", "warn", "alert"]


@dataclass(frozen=True, slots=True)
class FeatureProfile:
    """Reference distribution of one feature group.

    Attributes:
        input: the tensor the group is taken from (`confidence` for the confidence).
        group: the kind of group: `all`, `mean`, `center`, `border` or `confidence`.
        edges: inner bin edges, strictly increasing: bin i holds values in
            (edges[i-1], edges[i]]; the first and last bins are open-ended.
        proportions: reference share of values per bin (len(edges) + 1, summing to 1).
        stats: mean, std, min, max and the `SUMMARY_QUANTILES` (p01 ... p99) of the values.
    """

    input: str
    group: str
    edges: tuple[float, ...]
    proportions: tuple[float, ...]
    stats: dict[str, float]

    def bin_counts(self, values: np.ndarray) -> np.ndarray:
        """How many of `values` (1-D, any numeric dtype) fall in each bin (NaN: the last)."""
        # One vectorised comparison per edge: 2-3x faster than searchsorted + bincount for
        # a dozen edges. NOTE: float64 scalars, so float32 values compare in float64 as the
        # reference did (a Python float would be cast down to float32 under NEP 50).
        at_most = [np.count_nonzero(values <= np.float64(edge)) for edge in self.edges]
        counts: np.ndarray = np.diff(np.array([0, *at_most, values.size], dtype=np.int64))
        return counts

    def psi(self, values: np.ndarray) -> float:
        """PSI of live `values` (1-D) against this reference."""
        return psi(self.proportions, self.bin_counts(values))

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "input": self.input, "group": self.group, "edges": list(self.edges),
            "proportions": list(self.proportions), "stats": dict(self.stats),
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FeatureProfile:
        """Inverse of `to_json`.

        Raises:
            ValueError: bins and proportions do not match, or edges are not increasing.
        """
        feature = cls(
            str(data["input"]),
            str(data["group"]),
            tuple(float(e) for e in data["edges"]),
            tuple(float(p) for p in data["proportions"]),
            {str(k): float(v) for k, v in data["stats"].items()},
        )
        if len(feature.proportions) != len(feature.edges) + 1:
            raise ValueError(f"{feature.input}/{feature.group}: bins and proportions differ")
        if any(b <= a for a, b in zip(feature.edges, feature.edges[1:], strict=False)):
            raise ValueError(f"{feature.input}/{feature.group}: edges not increasing")
        return feature


@dataclass(frozen=True, slots=True)
class ReferenceProfile:
    """What the training data looked like: per feature group, and the model's confidence.

    Attributes:
        features: feature group name (`X`, `X:mean`, `X:center`, `X:border`) -> profile.
        confidence: the top-class confidence's profile, or None (no probabilities output).
        samples: samples the profile was built from.
        source: free text: which data and which model (for people reading the file).
    """

    features: dict[str, FeatureProfile]
    confidence: FeatureProfile | None
    samples: int
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (what `write_profile` writes)."""
        return {
            "format": PROFILE_FORMAT,
            "samples": self.samples,
            "source": self.source,
            "features": {name: f.to_json() for name, f in self.features.items()},
            CONFIDENCE: self.confidence.to_json() if self.confidence is not None else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReferenceProfile:
        """Inverse of `to_json`.

        Raises:
            ValueError: an unknown format or inconsistent bins.
            KeyError: a field is missing.
        """
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"unknown reference profile format {data.get('format')!r}")
        confidence = data.get(CONFIDENCE)
        return cls(
            {str(name): FeatureProfile.from_json(d) for name, d in data["features"].items()},
            FeatureProfile.from_json(confidence) if confidence else None,
            int(data["samples"]),
            str(data.get("source", "")),
        )

    @property
    def inputs(self) -> frozenset[str]:
        """The input tensors the profile covers."""
        return frozenset(f.input for f in self.features.values())


def feature_groups(name: str, array: np.ndarray) -> dict[str, tuple[str, np.ndarray]]:
    """The feature groups of one numeric input batch (batch axis first).

    Returns:
        group name -> (group kind, its values as a 1-D array in the input's dtype; the
        per-sample means in float64).
    """
    n = array.shape[0]
    flat = array.reshape(n, -1)
    groups = {
        name: ("all", flat.reshape(-1)),
        f"{name}:mean": ("mean", flat.mean(axis=1, dtype=np.float64)),
    }
    if array.ndim >= 3 and array.shape[-1] >= 3 and array.shape[-2] >= 3:
        inner = np.zeros(array.shape[-2:], dtype=bool)
        inner[1:-1, 1:-1] = True
        grid = flat.reshape(n, -1, *array.shape[-2:])
        groups[f"{name}:center"] = ("center", grid[..., inner].reshape(-1))
        groups[f"{name}:border"] = ("border", grid[..., ~inner].reshape(-1))
    return groups


def top_class_confidence(probabilities: np.ndarray) -> np.ndarray:
    """Each sample's largest class probability (batch axis first), as float64."""
    n = probabilities.shape[0]
    top: np.ndarray = probabilities.reshape(n, -1).max(axis=1).astype(np.float64)
    return top


def _summary(values: np.ndarray) -> dict[str, float]:
    quantiles = np.quantile(values, SUMMARY_QUANTILES)
    stats = {
        "mean": float(values.mean()), "std": float(values.std()),
        "min": float(values.min()), "max": float(values.max()),
    }  # fmt: skip
    for q, value in zip(SUMMARY_QUANTILES, quantiles, strict=True):
        stats[f"p{round(q * 100):02d}"] = float(value)
    return stats


def profile_feature(
    input_name: str, group: str, values: np.ndarray, *, bins: int, outside_range_bins: bool
) -> FeatureProfile:
    """Bin edges, reference shares and summary statistics of one group's values (1-D).

    Args:
        input_name: the tensor the values come from.
        group: the kind of group (`all`, `mean`, ...).
        values: the reference values (not empty).
        bins: quantile bins wanted (fewer where quantiles tie).
        outside_range_bins: make the end bins hold only values below the reference's min
            and above its max.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError(f"no reference values for {input_name}/{group}")
    edges = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    if outside_range_bins:
        # NOTE: bins are right-closed, so an edge just below the min makes bin 0 "< min".
        low, high = values.min(), values.max()
        edges = np.concatenate([[np.nextafter(low, -np.inf)], edges, [high]])
    edges = np.unique(edges)
    counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)
    return FeatureProfile(
        input_name,
        group,
        tuple(float(e) for e in edges),
        tuple(float(c) for c in counts / values.size),
        _summary(values),
    )


def build_profile(
    inputs: Mapping[str, np.ndarray],
    confidence: np.ndarray | None,
    *,
    bins: int = DEFAULT_BINS,
    source: str = "",
) -> ReferenceProfile:
    """The reference profile of (training) inputs and the model's confidence on them.

    Args:
        inputs: input name -> reference batch (batch axis first); non-numeric inputs
            (BYTES text) are skipped.
        confidence: the model's top-class confidence per sample (see
            `top_class_confidence`), or None for models without a probabilities output.
        bins: quantile bins per group.
        source: what the data and model were (kept in the file for readers).

    Returns:
        The profile; `samples` is the largest batch among the profiled inputs.
    """
    features: dict[str, FeatureProfile] = {}
    samples = 0
    for name, array in inputs.items():
        if array.dtype.kind not in "biuf" or array.ndim == 0 or array.shape[0] == 0:
            continue  # BYTES (text) inputs have no numeric distribution to compare
        samples = max(samples, array.shape[0])
        for group_name, (kind, values) in feature_groups(name, array).items():
            features[group_name] = profile_feature(
                name, kind, values, bins=bins, outside_range_bins=True
            )
    conf = None
    if confidence is not None:
        # Confidence lives in [0, 1]: no out-of-range bins, all of them for the shape.
        conf = profile_feature(CONFIDENCE, CONFIDENCE, confidence, bins=bins,
                               outside_range_bins=False)  # fmt: skip
        samples = max(samples, len(confidence))
    return ReferenceProfile(features, conf, samples, source)


def write_profile(profile: ReferenceProfile, version_dir: Path) -> Path:
    """Write `<version_dir>/reference_profile.json`; return its path."""
    path = Path(version_dir) / PROFILE_FILENAME
    path.write_text(json.dumps(profile.to_json(), indent=1) + "\n")
    return path


def load_profile(version_dir: Path) -> ReferenceProfile | None:
    """The version's reference profile; None when it has none or it is unreadable (logged)."""
    path = Path(version_dir) / PROFILE_FILENAME
    if not path.is_file():
        return None
    try:
        return ReferenceProfile.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.error("unreadable reference profile %s: %s", path, exc)
        return None


def psi(reference: Iterable[float], counts: np.ndarray) -> float:
    """Population stability index of live bin counts against reference shares.

    Args:
        reference: reference share per bin.
        counts: live count per bin (same length).
    """
    live = np.maximum(counts / max(float(counts.sum()), 1.0), EMPTY_BIN_SHARE)
    ref = np.maximum(np.fromiter(reference, dtype=np.float64), EMPTY_BIN_SHARE)
    return float(np.sum((live - ref) * np.log(live / ref)))


@dataclass(frozen=True, slots=True)
class DriftAlert:
    """A feature group whose drift state is not `ok`.

    Attributes:
        model: model name.
        version: model version.
        feature: feature group (`INPUT:mean`, `confidence`...).
        state: `warn` or `alert`.
        psi: its PSI at the last evaluation.
        since_s: monitor clock reading when it entered this state.
    """

    model: str
    version: str
    feature: str
    state: DriftState
    psi: float
    since_s: float


_Entry = tuple[Mapping[str, np.ndarray], "np.ndarray | None", int, float]
"""One observed batch in the window: inputs, probabilities (the confidence output, or
None), samples, monitor clock at observation (a plain tuple: built on the hot path)."""


class DriftMonitor:
    """A sliding window of one model version's live inputs and outputs, scored by PSI.

    Args:
        model: model name (labels, logs).
        version: model version (labels, logs).
        profile: the version's reference profile.
        config: window size, minimum samples, thresholds, the probabilities output.
        clock: seconds, monotonic (injectable for tests); dates entries and transitions.
    """

    def __init__(
        self,
        model: str,
        version: str,
        profile: ReferenceProfile,
        config: DriftConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.version = version
        self.profile = profile
        self.config = config
        self._clock = clock
        self._window_limit = config.window_samples
        self._rate = config.max_samples_per_s
        # The sample budget (a token bucket holding up to one second's worth) and when it
        # was last refilled. NOTE: updated without a lock by concurrent observers (the
        # loop, engine threads): a lost update admits a batch more or less, nothing worse.
        self._budget = self._rate
        self._refilled_s = clock()
        self._confidence_output = config.confidence_output if profile.confidence else None
        self.lane_stride = 1
        """CPU-lane requests per `observe` call the lane makes, on average (`lane_gap`)."""
        # NOTE: `lane_gap` adds to this on the event loop, `evaluate` reads and resets it on
        # its thread, without a lock: a lost update skews one estimate, nothing worse.
        self._lane_requests = 0
        self._lane_since_s = self._refilled_s
        self._uniform = random.Random(f"{model}/{version}").random
        self._lock = threading.Lock()
        self._window: deque[_Entry] = deque()
        """Entries in the window, oldest first (under `_lock`)."""
        self._pending: deque[_Entry] = deque()
        """Entries observed and not yet folded into the window (`_fold`)."""
        self._count = 0
        self._observed = 0
        # NOTE: evaluate() runs on one thread at a time; readers (scrapes, /drift) see the
        # last evaluation through these two references, each replaced whole.
        self._evaluate_lock = threading.Lock()
        self._last_scores: dict[str, float] = {}
        self._last_states: dict[str, DriftState] = {}
        self._since_s: dict[str, float] = {}

    # ------------------------------------------------------------ hot path
    def observe(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Add one executed batch (or one CPU-lane request) to the window, unless the
        `max_samples_per_s` budget is spent (then it is skipped whole).

        Thread-safe and cheap: one `deque.append` (atomic) of references to the arrays
        (the caller must not reuse them); readers fold what is pending into the window
        (`_fold`), and so does this call once about a window's worth of samples is pending.
        Arrays have a leading batch axis.
        """
        first = next(iter(inputs.values()), None)
        if first is None or not first.ndim:
            return
        now = self._clock()
        n = len(first)
        rate = self._rate
        if rate:  # the token bucket: a batch is taken whole while any budget is left
            budget = min(rate, self._budget + (now - self._refilled_s) * rate)
            self._refilled_s = now
            if budget <= 0:
                self._budget = budget
                return
            self._budget = budget - n
        name = self._confidence_output
        pending = self._pending
        pending.append((inputs, None if name is None else outputs.get(name), n, now))
        # About a window's worth pending (entries of this size): fold, so that what is
        # kept stays near two windows even when nothing reads (batches of 256 fold at 8).
        if len(pending) * n >= self._window_limit:
            with self._lock:
                self._fold()

    def lane_gap(self) -> int:
        """CPU-lane requests until the next one the lane is to `observe` (1 = the next
        one); the lane calls this with each request it observes.

        Random, from 1 to `2 * lane_stride - 1` (averaging `lane_stride`), not every
        `lane_stride`-th request: traffic that cycles through a fixed set of inputs would
        otherwise be seen through a fixed subset of them.
        """
        stride = self.lane_stride
        gap = 1 if stride == 1 else 1 + int(self._uniform() * (2 * stride - 1))
        self._lane_requests += gap
        return gap

    def count_lane_requests(self, requests: int) -> None:
        """Count in the lane's rate (`lane_stride`'s next estimate) `requests` it served
        without calling `lane_gap`: with its observer detached for a while, as
        `loadtests.monitoring_paired` detaches it between phases. Otherwise the estimate
        would take the lane for a slower one, and the lane, once attached again, would call
        `observe` more often than the budget admits samples."""
        self._lane_requests += requests

    def _update_lane_stride(self) -> None:
        """Re-estimate `lane_stride` from the lane's requests since the last estimate:
        about as many `observe` calls a second as the budget admits samples (every request
        below that rate, or without a budget); unchanged after a spell without any."""
        now = self._clock()
        elapsed = now - self._lane_since_s
        if elapsed <= 0:
            return
        requests, self._lane_requests = self._lane_requests, 0
        self._lane_since_s = now
        rate = self._rate
        if not rate:
            self.lane_stride = 1
        elif requests:  # NOTE: no lane traffic says nothing of the next: the stride stays
            self.lane_stride = max(1, int(requests / elapsed / rate))

    def _fold(self) -> None:
        """Move the pending entries into the window and drop the entries that left it
        (with `_lock` held).

        NOTE: whole entries leave only once the rest still fill the window, so the window
        always covers the last `window_samples` samples; `scores` trims the excess rows.
        """
        pending, window, limit = self._pending, self._window, self._window_limit
        count = self._count
        observed = 0
        # NOTE: `popleft` until empty, not a copy and `clear`: observe() may append
        # meanwhile (deque operations are atomic), and nothing appended may be lost.
        while pending:
            entry = pending.popleft()
            window.append(entry)
            observed += entry[2]
        count += observed
        while window and count - window[0][2] >= limit:
            count -= window.popleft()[2]
        self._count = count
        self._observed += observed

    # ------------------------------------------------------------ reading
    @property
    def window_samples(self) -> int:
        """Samples in the window now (at most `window_samples` of the config)."""
        with self._lock:
            self._fold()
            return min(self._count, self._window_limit)

    @property
    def observed_total(self) -> int:
        """Samples taken into the window since the monitor started (`max_samples_per_s`)."""
        with self._lock:
            self._fold()
            return self._observed

    @property
    def last_scores(self) -> dict[str, float]:
        """PSI per feature group at the last `evaluate` ({} before it has enough samples)."""
        return self._last_scores

    @property
    def last_states(self) -> dict[str, DriftState]:
        """State per feature group at the last `evaluate`."""
        return self._last_states

    def _entries(self) -> tuple[list[_Entry], int]:
        """The entries covering the window and how many oldest rows to skip."""
        with self._lock:
            self._fold()
            entries = list(self._window)
            count = self._count
        return entries, max(count - self._window_limit, 0)

    def window_arrays(self, name: str) -> list[np.ndarray]:
        """The live window's batches of input `name` (or of `confidence`, the confidence
        output), oldest first, trimmed to the window's last `window_samples` samples."""
        entries, skip = self._entries()
        return _trimmed(entries, skip, name)

    def scores(self) -> dict[str, float]:
        """PSI per feature group and `confidence` over the window; {} before `min_samples`.

        Computed on demand over the last `window_samples` samples (vectorised numpy; a few
        milliseconds for 2,000 digits): call it off the event loop.
        """
        entries, skip = self._entries()
        out: dict[str, float] = {}
        for name in sorted(self.profile.inputs):
            arrays = _trimmed(entries, skip, name)
            if sum(len(a) for a in arrays) < self.config.min_samples:
                continue
            for group, values in _group_values(name, arrays).items():
                feature = self.profile.features.get(group)
                if feature is not None:
                    out[group] = feature.psi(values)
        reference = self.profile.confidence
        if reference is not None:
            probabilities = _trimmed(entries, skip, CONFIDENCE)
            if sum(len(p) for p in probabilities) >= self.config.min_samples:
                top = top_class_confidence(_concatenate(probabilities))
                out[CONFIDENCE] = reference.psi(top)
        return out

    def state_of(self, score: float) -> DriftState:
        """`ok`, `warn` (PSI above `warn_psi`) or `alert` (above `alert_psi`)."""
        if score > self.config.alert_psi:
            return "alert"
        if score > self.config.warn_psi:
            return "warn"
        return "ok"

    def evaluate(self) -> list[DriftAlert]:
        """Score the window against the thresholds and log each change of state once.

        A transition is logged on logger `monitoring.drift` as a JSON message (WARNING when
        it gets worse, INFO when it recovers), with the event also in `record.drift_event`.

        Returns:
            The feature groups not `ok` now.
        """
        with self._evaluate_lock:
            self._update_lane_stride()
            scores = self.scores()
            now_s = self._clock()
            states = {feature: self.state_of(score) for feature, score in scores.items()}
            previous = self._last_states
            for feature, state in states.items():
                before = previous.get(feature, "ok")
                if state == before:
                    continue
                self._since_s[feature] = now_s
                self._log_transition(feature, before, state, scores[feature])
            self._last_scores = scores
            self._last_states = states
            return [
                DriftAlert(self.model, self.version, feature, state, scores[feature],
                           self._since_s[feature])
                for feature, state in states.items()
                if state != "ok"
            ]  # fmt: skip

    def _log_transition(
        self, feature: str, before: DriftState, state: DriftState, score: float
    ) -> None:
        event = {
            "event": "drift", "model": self.model, "version": self.version,
            "feature": feature, "state": state, "previous": before, "psi": round(score, 6),
            "warn_psi": self.config.warn_psi, "alert_psi": self.config.alert_psi,
            "window_samples": self.window_samples,
        }  # fmt: skip
        worse = STATES.index(state) > STATES.index(before)
        logger.log(
            logging.WARNING if worse else logging.INFO,
            "%s",
            json.dumps(event),
            extra={"drift_event": event},
        )

    def snapshot(self) -> dict[str, Any]:
        """The last evaluation, JSON-able (served as `/drift`)."""
        scores, states = self._last_scores, self._last_states
        with self._lock:
            self._fold()
            oldest_s = self._window[0][3] if self._window else None
            observed = self._observed
            window_samples = min(self._count, self._window_limit)
        return {
            "window_samples": window_samples,
            "observed_total": observed,
            "lane_stride": self.lane_stride,
            "window_age_s": None if oldest_s is None else self._clock() - oldest_s,
            "scores": scores,
            "states": states,
            "alerts": sorted(f for f, s in states.items() if s != "ok"),
            "warn_psi": self.config.warn_psi,
            "alert_psi": self.config.alert_psi,
            "min_samples": self.config.min_samples,
        }


def _trimmed(entries: list[_Entry], skip: int, name: str) -> list[np.ndarray]:
    """Arrays of input `name` (or `CONFIDENCE`: the probabilities) in `entries`, with the
    first `skip` rows of the window left out."""
    arrays: list[np.ndarray] = []
    for inputs, probabilities, samples, _ in entries:
        array = probabilities if name == CONFIDENCE else inputs.get(name)
        if skip > 0:
            drop = min(skip, samples)
            skip -= drop
            if array is not None and drop:
                array = array[drop:]
        if array is not None and len(array):
            arrays.append(array)
    return arrays


def _concatenate(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _group_values(name: str, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Group name -> the values of every array in the window (1-D)."""
    if not arrays or arrays[0].dtype.kind not in "biuf":
        return {}
    if all(a.shape[1:] == arrays[0].shape[1:] for a in arrays):
        groups = feature_groups(name, _concatenate(arrays))
        return {group: values for group, (_, values) in groups.items()}
    # Variable dims (e.g. token ids of different lengths): group each batch on its own.
    parts: dict[str, list[np.ndarray]] = {}
    for array in arrays:
        for group, (_, values) in feature_groups(name, array).items():
            parts.setdefault(group, []).append(values)
    return {group: np.concatenate(values) for group, values in parts.items()}


class DriftCollector(Collector):
    """Prometheus families of the drift monitors' last evaluation.

    `batchwire_drift_psi{model,version,feature}`, `batchwire_drift_state{...}` (0 ok, 1 warn,
    2 alert), `batchwire_drift_window_samples{model,version}` and
    `batchwire_drift_observed_samples_total{model,version}`.

    Args:
        monitors: returns the live monitors at each scrape.
    """

    def __init__(self, monitors: Callable[[], Iterable[DriftMonitor]]) -> None:
        self.monitors = monitors

    def collect(self) -> Iterator[Metric]:
        """One sample per monitor (and per feature group of its last evaluation)."""
        labels = ["model", "version", "feature"]
        psi_family = GaugeMetricFamily(
            "batchwire_drift_psi",
            "PSI of the live window against the reference profile, per feature group",
            labels=labels,
        )
        state_family = GaugeMetricFamily(
            "batchwire_drift_state",
            "Drift state per feature group: 0 ok, 1 warn (PSI > warn_psi), 2 alert (> alert_psi)",
            labels=labels,
        )
        window = GaugeMetricFamily(
            "batchwire_drift_window_samples",
            "Samples in the live drift window",
            labels=["model", "version"],
        )
        observed = CounterMetricFamily(
            "batchwire_drift_observed_samples",
            "Samples taken into the drift window (at most max_samples_per_s a second)",
            labels=["model", "version"],
        )
        for monitor in self.monitors():
            version = [monitor.model, monitor.version]
            window.add_metric(version, monitor.window_samples)
            observed.add_metric(version, monitor.observed_total)
            states = monitor.last_states
            for feature, score in monitor.last_scores.items():
                psi_family.add_metric([*version, feature], score)
                state_family.add_metric(
                    [*version, feature], STATES.index(states.get(feature, "ok"))
                )
        yield from (psi_family, state_family, window, observed)
