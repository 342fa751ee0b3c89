"""Input and output drift: live windows compared with the training data's reference profile.

The trainer writes `<version>/reference_profile.json` (`build_profile` + `write_profile`):
for each *feature group* of each numeric input, bin edges taken from the training data's
deciles plus two open-ended bins, the reference share of values per bin and summary
statistics; and the same for the model's top-class confidence when it has a probabilities
output. Feature groups of an input `X`:

- `X`: every element, pooled (the value distribution);
- `X:mean`: each sample's mean (catches rescaled or shifted inputs even when per-element
  histograms overlap);
- `X:center` / `X:border`: the inner elements and the outermost ring of the last two dims,
  for inputs with a 2-D layout of at least 3x3 (a shift confined to a region shows up).

The server keeps the last `window_samples` samples it computed (`DriftMonitor.observe`:
references appended under a lock, nothing computed per request) and, on `evaluate`, scores
each group with the population stability index
`PSI = sum((live - ref) * ln(live / ref))` over the bins (empty bins count as 1e-4).
PSI above `warn_psi` (0.1) warns, above `alert_psi` (0.25) alerts; each change of state is
logged once as a JSON event (logger `monitoring.drift`).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batchwire.config import DriftConfig

logger = logging.getLogger(__name__)

PROFILE_FILENAME: Final = "reference_profile.json"
CONFIDENCE: Final = "confidence"
#: Share used for an empty bin, so PSI stays finite.
EMPTY_BIN_SHARE: Final = 1e-4
#: Confidence bins (upper edges; the last bin is open-ended).
CONFIDENCE_EDGES: Final = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
STATES: Final = ("ok", "warn", "alert")


@dataclass(frozen=True, slots=True)
class FeatureProfile:
    """Reference distribution of one feature group."""

    input: str
    group: str
    edges: tuple[float, ...]
    """Inner bin edges, increasing: bin i holds values in (edges[i-1], edges[i]]; the first
    and last bins are open-ended."""
    proportions: tuple[float, ...]
    """Reference share of values per bin (len(edges) + 1 entries, summing to 1)."""
    stats: dict[str, float]
    """mean, std, min, max, p01, p50, p99 of the reference values."""


@dataclass(frozen=True, slots=True)
class ReferenceProfile:
    """What the training data looked like: per feature group, and the confidence."""

    features: dict[str, FeatureProfile]
    confidence: FeatureProfile | None
    samples: int

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (what `write_profile` writes)."""

        def one(f: FeatureProfile) -> dict[str, Any]:
            return {
                "input": f.input, "group": f.group, "edges": list(f.edges),
                "proportions": list(f.proportions), "stats": f.stats,
            }  # fmt: skip

        return {
            "format": 1,
            "samples": self.samples,
            "features": {name: one(f) for name, f in self.features.items()},
            "confidence": one(self.confidence) if self.confidence else None,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReferenceProfile:
        """Inverse of `to_json`.

        Raises:
            ValueError: an unknown format or inconsistent bins.
        """
        if data.get("format") != 1:
            raise ValueError(f"unknown reference profile format {data.get('format')!r}")

        def one(d: Mapping[str, Any]) -> FeatureProfile:
            feature = FeatureProfile(
                str(d["input"]), str(d["group"]), tuple(float(e) for e in d["edges"]),
                tuple(float(p) for p in d["proportions"]),
                {k: float(v) for k, v in d["stats"].items()},
            )  # fmt: skip
            if len(feature.proportions) != len(feature.edges) + 1:
                raise ValueError(f"feature {feature.input}:{feature.group}: bins do not match")
            return feature

        confidence = data.get("confidence")
        return cls(
            {name: one(d) for name, d in data["features"].items()},
            one(confidence) if confidence else None,
            int(data["samples"]),
        )


def feature_groups(name: str, array: np.ndarray) -> dict[str, tuple[str, np.ndarray]]:
    """The feature groups of one input batch: group name -> (group kind, values, 1-D)."""
    n = array.shape[0]
    flat = array.reshape(n, -1).astype(np.float64, copy=False)
    groups = {name: ("all", flat.reshape(-1)), f"{name}:mean": ("mean", flat.mean(axis=1))}
    if array.ndim >= 3 and array.shape[-1] >= 3 and array.shape[-2] >= 3:
        mask = np.zeros(array.shape[-2:], dtype=bool)
        mask[1:-1, 1:-1] = True
        grid = array.reshape(n, -1, *array.shape[-2:]).astype(np.float64, copy=False)
        groups[f"{name}:center"] = ("center", grid[..., mask].reshape(-1))
        groups[f"{name}:border"] = ("border", grid[..., ~mask].reshape(-1))
    return groups


def _profile(input_name: str, group: str, values: np.ndarray, edges: np.ndarray) -> FeatureProfile:
    counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)
    quantiles = np.quantile(values, [0.01, 0.5, 0.99])
    return FeatureProfile(
        input_name,
        group,
        tuple(float(e) for e in edges),
        tuple(float(c) for c in counts / max(counts.sum(), 1)),
        {
            "mean": float(values.mean()), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max()),
            "p01": float(quantiles[0]), "p50": float(quantiles[1]), "p99": float(quantiles[2]),
        },
    )  # fmt: skip


def build_profile(
    inputs: Mapping[str, np.ndarray], confidence: np.ndarray | None
) -> ReferenceProfile:
    """The reference profile of training inputs (batch axis first) and, optionally, the
    model's top-class confidence on them."""
    features: dict[str, FeatureProfile] = {}
    samples = 0
    for name, array in inputs.items():
        if array.dtype.kind not in "biuf":
            continue  # BYTES (text) inputs have no numeric distribution to compare
        samples = max(samples, array.shape[0])
        for group_name, (kind, values) in feature_groups(name, array).items():
            edges = np.unique(np.quantile(values, np.linspace(0, 1, 11)[1:-1]))
            features[group_name] = _profile(name, kind, values, edges)
    conf = None
    if confidence is not None:
        conf = _profile(
            CONFIDENCE, CONFIDENCE, confidence.astype(np.float64), np.array(CONFIDENCE_EDGES)
        )
    return ReferenceProfile(features, conf, samples)


def write_profile(profile: ReferenceProfile, version_dir: Path) -> Path:
    """Write `<version_dir>/reference_profile.json`."""
    path = version_dir / PROFILE_FILENAME
    path.write_text(json.dumps(profile.to_json(), indent=1) + "\n")
    return path


def load_profile(version_dir: Path) -> ReferenceProfile | None:
    """The version's reference profile, or None when it has none (or it is unreadable)."""
    path = version_dir / PROFILE_FILENAME
    if not path.is_file():
        return None
    try:
        return ReferenceProfile.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        logger.error("unreadable reference profile %s: %s", path, exc)
        return None


def psi(reference: tuple[float, ...], counts: np.ndarray) -> float:
    """Population stability index of live bin counts against reference shares."""
    live = counts / max(counts.sum(), 1)
    ref = np.maximum(np.asarray(reference), EMPTY_BIN_SHARE)
    live = np.maximum(live, EMPTY_BIN_SHARE)
    return float(np.sum((live - ref) * np.log(live / ref)))


def _bin_counts(feature: FeatureProfile, values: np.ndarray) -> np.ndarray:
    edges = np.asarray(feature.edges)
    return np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)


class DriftMonitor:
    """A sliding window of one model version's live inputs and outputs, scored by PSI.

    Args:
        model: model name (labels, logs).
        version: version (labels, logs).
        profile: the version's reference profile.
        config: window size and thresholds.
    """

    def __init__(
        self, model: str, version: str, profile: ReferenceProfile, config: DriftConfig
    ) -> None:
        self.model = model
        self.version = version
        self.profile = profile
        self.config = config
        self._lock = threading.Lock()
        self._window: deque[tuple[Mapping[str, np.ndarray], np.ndarray | None, int]] = deque()
        self._count = 0
        self.observed_total = 0
        self.last_scores: dict[str, float] = {}
        self._states: dict[str, str] = {}

    def observe(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Add one batch (or one CPU-lane request) to the window; thread-safe and cheap."""
        first = next(iter(inputs.values()), None)
        if first is None or first.ndim == 0:
            return
        n = first.shape[0]
        name = self.config.confidence_output
        probabilities = outputs.get(name) if name is not None else None
        window = self.config.window_samples
        with self._lock:
            self._window.append((inputs, probabilities, n))
            self._count += n
            self.observed_total += n
            # NOTE: keep whole entries while the rest still fill the window.
            while self._count - self._window[0][2] >= window:
                self._count -= self._window.popleft()[2]

    @property
    def window_samples(self) -> int:
        """Samples in the window now."""
        return self._count

    def scores(self) -> dict[str, float]:
        """PSI per feature group (and `confidence`) over the window; {} before `min_samples`."""
        with self._lock:
            entries = list(self._window)
            count = self._count
        if count < self.config.min_samples or not entries:
            return {}
        keep = self.config.window_samples
        out: dict[str, float] = {}
        names = {f.input for f in self.profile.features.values()}
        for name in names:
            arrays = [e[0][name] for e in entries if name in e[0]]
            if not arrays:
                continue
            batch = np.concatenate(arrays)[-keep:]
            if batch.dtype.kind not in "biuf":
                continue
            for group, (_, values) in feature_groups(name, batch).items():
                feature = self.profile.features.get(group)
                if feature is not None:
                    out[group] = psi(feature.proportions, _bin_counts(feature, values))
        confidence = self.profile.confidence
        probs = [e[1] for e in entries if e[1] is not None]
        if confidence is not None and probs:
            recent = np.concatenate(probs)[-keep:]
            top = recent.reshape(len(recent), -1).max(axis=1)
            out[CONFIDENCE] = psi(confidence.proportions, _bin_counts(confidence, top))
        return out

    def state_of(self, score: float) -> str:
        """`ok`, `warn` or `alert` for one PSI."""
        if score > self.config.alert_psi:
            return "alert"
        if score > self.config.warn_psi:
            return "warn"
        return "ok"

    def evaluate(self) -> dict[str, str]:
        """Score the window, log each feature's change of state once; return non-ok states."""
        scores = self.scores()
        self.last_scores = scores
        states = {feature: self.state_of(score) for feature, score in scores.items()}
        for feature, state in states.items():
            before = self._states.get(feature, "ok")
            if state != before:
                event = {
                    "event": "drift", "state": state, "previous": before, "model": self.model,
                    "version": self.version, "feature": feature, "psi": scores[feature],
                    "warn_psi": self.config.warn_psi, "alert_psi": self.config.alert_psi,
                    "window_samples": self._count,
                }  # fmt: skip
                level = (
                    logging.WARNING if STATES.index(state) > STATES.index(before) else logging.INFO
                )
                logger.log(level, "%s", json.dumps(event), extra={"drift_event": event})
        self._states = states
        return {f: s for f, s in states.items() if s != "ok"}

    def snapshot(self) -> dict[str, Any]:
        """Last scores and states (JSON-able; served as `/drift`)."""
        return {
            "window_samples": self._count,
            "observed_total": self.observed_total,
            "scores": self.last_scores,
            "states": {f: self.state_of(s) for f, s in self.last_scores.items()},
            "warn_psi": self.config.warn_psi,
            "alert_psi": self.config.alert_psi,
        }


class DriftCollector(Collector):
    """Prometheus families of the drift monitors' last evaluation.

    Args:
        monitors: returns the live monitors at each scrape.
    """

    def __init__(self, monitors: Callable[[], list[DriftMonitor]]) -> None:
        self.monitors = monitors

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version", "feature"]
        psi_family = GaugeMetricFamily(
            "batchwire_drift_psi", "PSI of the live window against the reference", labels=labels
        )
        state = GaugeMetricFamily(
            "batchwire_drift_state",
            "Drift state: 0 ok, 1 warn (PSI > 0.1), 2 alert (> 0.25)",
            labels=labels,
        )
        window = GaugeMetricFamily(
            "batchwire_drift_window_samples",
            "Samples in the live window",
            labels=["model", "version"],
        )
        for monitor in self.monitors():
            window.add_metric([monitor.model, monitor.version], monitor.window_samples)
            for feature, score in monitor.last_scores.items():
                key = [monitor.model, monitor.version, feature]
                psi_family.add_metric(key, score)
                state.add_metric(key, STATES.index(monitor.state_of(score)))
        yield from (psi_family, state, window)
