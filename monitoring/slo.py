"""Latency and availability SLOs per model, with multiwindow, multi-burn-rate alerts.

Each model with an `slo:` block in its config.yaml has two SLIs:

- **availability**: the share of *valid* requests that did not fail on the server's side.
  Server-side failures are the statuses in `SERVER_FAILURES` (INTERNAL, UNAVAILABLE,
  DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNKNOWN, DATA_LOSS, UNIMPLEMENTED). Client errors
  (INVALID_ARGUMENT, NOT_FOUND, CANCELLED...) are not the server's fault and count in
  neither SLI.
- **latency**: the share of *successful* requests that took at most `latency_threshold_ms`
  (server-side, from the RPC's start to its response). A failed request counts against
  availability only.

The error budget of an SLI is `1 - objective`; a window's burn rate is its bad share divided
by the budget (1.0 spends the budget exactly over the SLO period). An alert rule fires while
the burn rate exceeds its `burn_rate` over both its long and its short window (Google SRE
workbook, "Alerting on SLOs"); defaults: page at 14.4x over 1 h and 5 min, page at 6x over
6 h and 30 min, ticket at 1x over 3 d and 6 h.

Counts live in a ring of time buckets per model (bucket length: a tenth of the shortest
short window, so a shrunk test config works the same; longer when the ring would exceed
`MAX_BUCKETS`), sized for the longest window: memory is bounded whatever the traffic
(about 8,600 buckets for the default rules). A window of length W sums the trailing
`ceil(W / bucket)` buckets, the current partial one included. Latency percentiles come from
a log-spaced histogram (bins 10% apart, so a percentile is the upper edge of its bin:
at most 10% high) per bucket over the shortest short window. The front door feeds a
successful request with one C call, no Python frame: `ok_feeds[model](latency_ns)` (on the
event loop, an `array.append` of an int64: the int object is freed at once, where a list
would keep it until the next count); `record` (one request, about 0.25 µs, a deque
append: the front door's failed requests) and `record_many` (the tracer's span processor,
a chunk of requests as columns) are one Python call each. What was fed is counted in
batches, vectorised with numpy, when something reads the monitor (the hub evaluates it
every second) or once enough is pending; records older than the ring (a late span) are
dropped. What `ok_feeds` took is dated when it is counted (the next evaluation: at most
`evaluate_interval_s` late), not when each request ended: a request counts one bucket late
at most, and with the default rules' 30 s buckets about one in thirty does. The span
processor counts a request when its span reaches it (the tracer ships spans every 200 ms),
well inside one bucket for sane windows. The "budget left" is computed over the longest
alert window (the data kept), not the whole SLO period.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain, compress
from typing import Any, Final

import numpy as np
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from batchwire.config import BurnRateAlertConfig, SloConfig
from monitoring.tracing import RequestSpanProcessor

logger = logging.getLogger(__name__)

#: gRPC statuses that count against availability (the server's fault).
SERVER_FAILURES: Final = frozenset(
    {
        "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNKNOWN",
        "DATA_LOSS", "UNIMPLEMENTED",
    }
)  # fmt: skip
SLIS: Final = ("latency", "availability")
#: Latency histogram bin upper bounds: 10 µs to ~100 s, 10% apart.
_LATENCY_BOUNDS_S: Final = tuple(1e-5 * 1.1**i for i in range(170))
#: Smallest bucket length (seconds), whatever the windows.
MIN_BUCKET_S: Final = 0.05
#: Most buckets in a model's ring: bounds memory (3 counters each) and the cost of a sum.
MAX_BUCKETS: Final = 20_000
_BINS: Final = len(_LATENCY_BOUNDS_S) + 1  # the last bin: above the largest bound
_LATENCY_BOUNDS: Final = np.asarray(_LATENCY_BOUNDS_S)
#: Pending records past which `record` counts them itself (bounds memory without readers).
_FOLD_AT: Final = 4096
#: Pending `record_many` calls past which it counts them itself.
_FOLD_MANY_AT: Final = 16


def window_label(seconds: float) -> str:
    """`300` -> `5m`, `3600` -> `1h`, `259200` -> `3d`, `2.5` -> `2.5s`."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def rule_label(rule: BurnRateAlertConfig) -> str:
    """e.g. `14.4x/1h/5m`."""
    return (
        f"{rule.burn_rate:g}x/{window_label(rule.long_window_s)}/"
        f"{window_label(rule.short_window_s)}"
    )


@dataclass(frozen=True, slots=True)
class AlertState:
    """One firing alert rule of one SLI of one model."""

    model: str
    sli: str
    severity: str
    rule: str
    burn_rate_long: float
    burn_rate_short: float
    threshold: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "model": self.model, "sli": self.sli, "severity": self.severity, "rule": self.rule,
            "burn_rate_long": self.burn_rate_long, "burn_rate_short": self.burn_rate_short,
            "threshold": self.threshold,
        }  # fmt: skip


class _ModelWindows:
    """Bucketed counts of one model (guarded by the monitor's lock)."""

    def __init__(self, model: str, slo: SloConfig, now_s: float) -> None:
        self.slo = slo
        self.threshold_s = slo.latency_threshold_ms / 1000
        short = min((r.short_window_s for r in slo.alerts), default=300.0)
        longest = max((max(r.long_window_s, r.short_window_s) for r in slo.alerts), default=short)
        self.bucket_s = max(short / 10, longest / (MAX_BUCKETS - 1), MIN_BUCKET_S)
        if self.bucket_s > short / 10 and short / 10 >= MIN_BUCKET_S:
            logger.warning(
                "SLO of model %s: windows from %gs to %gs need more than %d buckets; "
                "bucket length %gs makes its shortest windows coarse",
                model, short, longest, MAX_BUCKETS, self.bucket_s,
            )  # fmt: skip
        self.percentile_window_s = short
        self.size = math.ceil(longest / self.bucket_s) + 1
        self.hist_size = math.ceil(short / self.bucket_s) + 1
        self.current = int(now_s / self.bucket_s)
        self.ok = [0] * self.size  # successful requests
        self.slow = [0] * self.size  # successful requests over the threshold
        self.failed = [0] * self.size  # server-side failures
        self.hist = [[0] * _BINS for _ in range(self.hist_size)]

    def advance(self, index: int) -> None:
        """Move the ring to bucket `index`, zeroing the buckets skipped over."""
        gap = index - self.current
        if gap <= 0:
            return
        if gap >= self.size:
            self.ok, self.slow, self.failed = [0] * self.size, [0] * self.size, [0] * self.size
        else:
            for i in range(self.current + 1, index + 1):
                slot = i % self.size
                self.ok[slot] = self.slow[slot] = self.failed[slot] = 0
        for i in range(max(self.current + 1, index - self.hist_size + 1), index + 1):
            self.hist[i % self.hist_size] = [0] * _BINS
        self.current = index

    def sums(self, window_s: float) -> tuple[int, int, int]:
        """(ok, slow, failed) over the trailing window (the current bucket included)."""
        n = min(self.size, max(1, math.ceil(window_s / self.bucket_s - 1e-9)))
        end = self.current % self.size + 1
        start = end - n
        if start >= 0:
            return (
                sum(self.ok[start:end]), sum(self.slow[start:end]), sum(self.failed[start:end])
            )  # fmt: skip
        # NOTE: the window wraps around the ring: its tail [start:] plus its head [:end].
        return (
            sum(self.ok[start:]) + sum(self.ok[:end]),
            sum(self.slow[start:]) + sum(self.slow[:end]),
            sum(self.failed[start:]) + sum(self.failed[:end]),
        )

    def percentiles(self, quantiles: tuple[float, ...]) -> tuple[int, dict[float, float | None]]:
        """Successful requests in the percentile window and their latency quantiles (s)."""
        merged = [sum(col) for col in zip(*self.hist, strict=True)]
        total = sum(merged)
        out: dict[float, float | None] = {}
        for q in quantiles:
            if total == 0:
                out[q] = None
                continue
            rank, seen = q * total, 0
            for i, n in enumerate(merged):
                seen += n
                if seen >= rank:
                    out[q] = _LATENCY_BOUNDS_S[i] if i < len(_LATENCY_BOUNDS_S) else math.inf
                    break
        return total, out


def _count_records(
    windows: _ModelWindows,
    latencies: np.ndarray,
    statuses: list[str] | None,
    times: np.ndarray,
) -> None:
    """Count one model's records (in the order they were recorded) into its buckets
    (`statuses` None: every one succeeded)."""
    latency = np.asarray(latencies, dtype=np.float64)
    index = (np.asarray(times, dtype=np.float64) / windows.bucket_s).astype(np.int64)
    ok: np.ndarray | None = None  # None: every record succeeded
    failed: np.ndarray | None = None
    if statuses is not None and statuses.count("OK") != len(statuses):
        ok = np.fromiter((s == "OK" for s in statuses), bool, len(statuses))
        failed = np.fromiter((s in SERVER_FAILURES for s in statuses), bool, len(statuses))
        counted = ok | failed  # client errors count in neither SLI, nor move the ring
        if not counted.any():
            return
        newest = int(index[counted].max())
    else:
        newest = int(index.max())
    if newest > windows.current:
        windows.advance(newest)
    kept = index > windows.current - windows.size
    good = kept if ok is None else kept & ok
    if failed is not None:
        failed &= kept
    slots = index % windows.size
    _add_counts(windows.ok, slots[good])
    _add_counts(windows.slow, slots[good & (latency > windows.threshold_s)])
    if failed is not None:
        _add_counts(windows.failed, slots[failed])
    in_histogram = good & (index > windows.current - windows.hist_size)
    for bucket in np.unique(index[in_histogram]).tolist():
        chosen = in_histogram & (index == bucket)
        bins = np.searchsorted(_LATENCY_BOUNDS, latency[chosen], side="left")
        row = bucket % windows.hist_size
        counts = np.bincount(bins, minlength=_BINS) + np.asarray(windows.hist[row])
        windows.hist[row] = counts.tolist()


def _add_counts(ring: list[int], slots: np.ndarray) -> None:
    """Add one to `ring[slot]` for each slot given (repeats count)."""
    if slots.size:
        for slot, count in zip(*np.unique(slots, return_counts=True), strict=True):
            ring[int(slot)] += int(count)


class _OkFeeds(dict[str, Callable[[int], None]]):
    """`SloMonitor.ok_feeds`: model -> count one successful request by its latency (ns);
    a model's first lookup makes its feed."""

    __slots__ = ("_make",)

    def __init__(self, make: Callable[[str], Callable[[int], None]]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, model: str) -> Callable[[int], None]:
        return self._make(model)


def burn_rate(bad: int, total: int, objective: float) -> float:
    """Bad share over the error budget (0.0 without traffic)."""
    return (bad / total) / (1 - objective) if total else 0.0


class SloMonitor:
    """Rolling SLI windows, burn rates and alerts for every model with an SLO.

    Args:
        objectives: model name -> its SLO.
        clock: seconds, monotonic; injected so tests need not sleep.
    """

    def __init__(
        self,
        objectives: Mapping[str, SloConfig],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: deque[tuple[str, float, str, float]] = deque()
        """Records not yet counted (`_fold`): model, latency, status, time."""
        self._pending_many: deque[tuple[Sequence[str], np.ndarray, Sequence[str], float]] = deque()
        """`record_many` calls not yet counted: models, latencies, statuses, time."""
        self._ok_ns: dict[str, array[int]] = {}
        """Latencies (ns, int64) taken by `ok_feeds`, per model, not yet counted."""
        self.ok_feeds = _OkFeeds(self._make_ok_feed)
        """Model -> count one *successful* request of it, given its latency in ns: the
        front door's per-request feed for the common case (`array("q").append`: a C call,
        no frame; counted, dated now, at the next read; the hub reads every second, and
        what waits meanwhile grows by 8 bytes a request). With an injected clock it is
        `record` on that clock."""
        self._models: dict[str, _ModelWindows] = {}
        self._firing: dict[tuple[str, str, str], AlertState] = {}
        for model, slo in objectives.items():
            self.set_objective(model, slo)

    def set_objective(self, model: str, slo: SloConfig | None) -> None:
        """Start (or restart, when it changed) or stop monitoring a model."""
        with self._lock:
            self._fold()  # what was recorded counts under the objective it was recorded for
            current = self._models.get(model)
            if slo is None:
                self._models.pop(model, None)
                for key in [k for k in self._firing if k[0] == model]:
                    del self._firing[key]
            elif current is None or current.slo != slo:
                self._models[model] = _ModelWindows(model, slo, self._clock())

    def models(self) -> list[str]:
        """Models with an objective."""
        with self._lock:
            return sorted(self._models)

    def rules(self, model: str) -> list[BurnRateAlertConfig]:
        """The alert rules of a model (empty when it has no objective)."""
        with self._lock:
            windows = self._models.get(model)
            return [] if windows is None else list(windows.slo.alerts)

    def record(self, model: str, latency_s: float, status: str, now_s: float | None = None) -> None:
        """Count one finished request.

        Cheap and thread-safe: one `deque.append` (atomic) of the request's fields, on
        the event loop or the tracer's shipper thread; reads fold what is pending into the
        buckets, vectorised (`_fold`), and so does this call once `_FOLD_AT` records are
        pending.

        Args:
            model: the model's name; models without an objective are not counted.
            latency_s: server-side latency of the request.
            status: its gRPC status name (`OK`, `INTERNAL`...); client errors are ignored.
            now_s: when it finished, on the monitor's clock (default: now). A time older
                than the data kept is dropped.
        """
        pending = self._pending
        pending.append((model, latency_s, status, self._clock() if now_s is None else now_s))
        if len(pending) >= _FOLD_AT:
            with self._lock:
                self._fold()

    def _make_ok_feed(self, model: str) -> Callable[[int], None]:
        """The `ok_feeds` entry of a model, made on its first lookup."""
        with self._lock:
            feed = self.ok_feeds.get(model)  # NOTE: `get` does not call __missing__
            if feed is None:
                if self._clock is time.monotonic:
                    latencies = array("q")
                    self._ok_ns[model] = latencies
                    feed = latencies.append
                else:
                    feed = partial(self._record_ok_ns, model)
                self.ok_feeds[model] = feed
            return feed

    def _record_ok_ns(self, model: str, latency_ns: int) -> None:
        self.record(model, latency_ns / 1e9, "OK")

    def record_many(
        self, models: Sequence[str], latencies_s: np.ndarray, statuses: Sequence[str]
    ) -> None:
        """`record` of several requests that finished now, in one `deque.append` (the
        tracer's shipper: a chunk at a time, counted as columns by `_fold`).

        Args:
            models: each request's model.
            latencies_s: their latencies (float64), in the same order.
            statuses: their gRPC status names, in the same order.
        """
        if not models:
            return
        pending = self._pending_many
        pending.append((models, latencies_s, statuses, self._clock()))
        if len(pending) >= _FOLD_MANY_AT:
            with self._lock:
                self._fold()

    def fold(self) -> None:
        """Count what was fed now (every read does it first)."""
        with self._lock:
            self._fold()

    def _fold(self) -> None:
        """Count the pending records into their models' buckets (with `_lock` held).

        The same counts as taking the records one by one in order (each moving the ring
        forward to its bucket, or dropped when older than the ring), computed with numpy
        per model: the ring moves once to the newest bucket, then each record counts in its
        own bucket unless the ring has left it behind.
        """
        pending, many = self._pending, self._pending_many
        # NOTE: `popleft` until the count taken, not a copy and `clear`: record() may
        # append meanwhile (deque operations are atomic), and nothing appended may be lost.
        # Each feed becomes columns: models, latencies (s), statuses, times (s).
        columns: list[tuple[Sequence[str], np.ndarray, Sequence[str], np.ndarray]] = []
        models: Sequence[str]
        statuses: Sequence[str]
        if pending:
            models, latencies, statuses, times = zip(
                *[pending.popleft() for _ in range(len(pending))], strict=True
            )
            columns.append((models, np.asarray(latencies, np.float64), statuses,
                            np.asarray(times, np.float64)))  # fmt: skip
        for _ in range(len(many)):
            models, latencies_s, statuses, now = many.popleft()
            columns.append((models, latencies_s, statuses, np.full(len(models), now)))
        # Split once by model, then count each model's share in one go.
        parts: dict[str, list[tuple[np.ndarray, Sequence[str] | None, np.ndarray]]] = {}
        now_s: float | None = None
        for name, taken in self._ok_ns.items():
            n = len(taken)
            if not n:
                continue
            # NOTE: a copy, then `del`: both C calls under the GIL, so an append between
            # them lands after the n taken (and `chunk`, a buffer of its own, stays as
            # numpy reads it).
            chunk = taken[:n]
            del taken[:n]
            latencies_ns = np.frombuffer(chunk, np.int64)
            if name in self._models:
                now_s = self._clock() if now_s is None else now_s
                parts.setdefault(name, []).append(
                    (latencies_ns / 1e9, None, np.full(n, now_s))
                )  # fmt: skip
        for models, latencies_s, statuses, times_s in columns:
            one_model = models.count(models[0]) == len(models)
            for name in [models[0]] if one_model else set(models):
                if name not in self._models:
                    continue
                if one_model:
                    parts.setdefault(name, []).append((latencies_s, statuses, times_s))
                else:
                    chosen = np.fromiter(map(name.__eq__, models), bool, len(models))
                    parts.setdefault(name, []).append(
                        (latencies_s[chosen], list(compress(statuses, chosen)), times_s[chosen])
                    )
        for name, shares in parts.items():
            latency_parts, status_parts, time_parts = zip(*shares, strict=True)
            statuses_all: list[str] | None = None
            if any(part is not None for part in status_parts):
                statuses_all = list(chain.from_iterable(
                    ["OK"] * len(latencies_s) if part is None else part
                    for latencies_s, part in zip(latency_parts, status_parts, strict=True)
                ))  # fmt: skip
            _count_records(
                self._models[name], np.concatenate(latency_parts), statuses_all,
                np.concatenate(time_parts),
            )  # fmt: skip

    def burn_rates(self, model: str, now_s: float | None = None) -> dict[str, dict[float, float]]:
        """SLI -> window length -> burn rate, for every window the model's rules use."""
        now = self._clock() if now_s is None else now_s
        with self._lock:
            self._fold()
            windows = self._models[model]
            windows.advance(int(now / windows.bucket_s))
            return self._burn_rates(windows)

    @staticmethod
    def _burn_rates(windows: _ModelWindows) -> dict[str, dict[float, float]]:
        slo = windows.slo
        lengths = sorted({w for r in slo.alerts for w in (r.short_window_s, r.long_window_s)})
        out: dict[str, dict[float, float]] = {"latency": {}, "availability": {}}
        for length in lengths:
            ok, slow, failed = windows.sums(length)
            out["latency"][length] = burn_rate(slow, ok, slo.latency_objective)
            out["availability"][length] = burn_rate(failed, ok + failed, slo.availability_objective)
        return out

    def evaluate(self, now_s: float | None = None) -> list[AlertState]:
        """Re-check every rule; log each transition once; return the firing alerts."""
        now = self._clock() if now_s is None else now_s
        events: list[tuple[str, AlertState]] = []
        with self._lock:
            self._fold()
            firing: dict[tuple[str, str, str], AlertState] = {}
            for model, windows in self._models.items():
                windows.advance(int(now / windows.bucket_s))
                rates = self._burn_rates(windows)
                for sli in SLIS:
                    for rule in windows.slo.alerts:
                        long_rate = rates[sli][rule.long_window_s]
                        short_rate = rates[sli][rule.short_window_s]
                        if long_rate > rule.burn_rate and short_rate > rule.burn_rate:
                            label = rule_label(rule)
                            firing[(model, sli, label)] = AlertState(
                                model, sli, rule.severity, label, long_rate, short_rate,
                                rule.burn_rate,
                            )  # fmt: skip
            for key, alert in firing.items():
                if key not in self._firing:
                    events.append(("firing", alert))
            for key, alert in self._firing.items():
                if key not in firing:
                    events.append(("resolved", alert))
            self._firing = firing
        for state, alert in events:
            event = {"event": "slo_alert", "state": state, **alert.as_dict()}
            level = logging.WARNING if state == "firing" else logging.INFO
            logger.log(level, "%s", json.dumps(event), extra={"slo_event": event})
        return list(firing.values())

    def firing(self) -> list[AlertState]:
        """Alerts firing as of the last `evaluate`."""
        with self._lock:
            return list(self._firing.values())

    def snapshot(self, now_s: float | None = None) -> dict[str, Any]:
        """Every model's objective, recent percentiles, budget left, burn rates and alerts
        (JSON-able; served as `/slo` and printed by `batchwire slo`)."""
        now = self._clock() if now_s is None else now_s
        out: dict[str, Any] = {}
        with self._lock:
            self._fold()
            for model, windows in sorted(self._models.items()):
                windows.advance(int(now / windows.bucket_s))
                slo = windows.slo
                rates = self._burn_rates(windows)
                kept_s = (windows.size - 1) * windows.bucket_s
                ok, slow, failed = windows.sums(kept_s)
                count, quantiles = windows.percentiles((0.5, 0.9, 0.99))
                slis = {}
                for sli, bad, total, objective in (
                    ("latency", slow, ok, slo.latency_objective),
                    ("availability", failed, ok + failed, slo.availability_objective),
                ):
                    slis[sli] = {
                        "objective": objective,
                        "good_fraction": (1 - bad / total) if total else None,
                        "events": total,
                        "bad_events": bad,
                        "budget_remaining": 1 - burn_rate(bad, total, objective),
                        "burn_rates": {window_label(w): r for w, r in rates[sli].items()},
                    }
                out[model] = {
                    "objective": {
                        "latency_threshold_ms": slo.latency_threshold_ms,
                        "latency_objective": slo.latency_objective,
                        "availability_objective": slo.availability_objective,
                    },
                    "budget_window": window_label(kept_s),
                    "recent": {
                        "window": window_label(windows.percentile_window_s),
                        "requests": count,
                        "latency_ms": {
                            f"p{round(q * 100)}": None if v is None else v * 1000
                            for q, v in quantiles.items()
                        },
                    },
                    "slis": slis,
                    "alerts": [
                        a.as_dict() for key, a in sorted(self._firing.items()) if key[0] == model
                    ],
                }
        return out


class SloSpanProcessor(RequestSpanProcessor):
    """Feeds the SLO monitor from ended SERVER spans that carry `batchwire.model.name`
    (the tracer hands it each request's fields directly; see `RequestSpanProcessor`)."""

    def __init__(self, monitor: SloMonitor) -> None:
        self.monitor = monitor

    def on_request_end(self, model: str, status: str, duration_ns: int) -> None:
        self.monitor.record(model, duration_ns / 1e9, status)

    def on_requests_end(
        self, models: Sequence[str], statuses: Sequence[str], durations_ns: Sequence[int]
    ) -> None:
        latencies_s = np.asarray(durations_ns, np.float64) / 1e9
        self.monitor.record_many(models, latencies_s, statuses)


class SloCollector(Collector):
    """Prometheus families of the SLO state: objectives, budgets, burn rates, alerts."""

    def __init__(self, monitor: SloMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        snapshot = self.monitor.snapshot()
        firing = {(a.model, a.sli, a.rule): a for a in self.monitor.firing()}
        objective = GaugeMetricFamily(
            "batchwire_slo_objective", "SLO target fraction", labels=["model", "sli"]
        )
        threshold = GaugeMetricFamily(
            "batchwire_slo_latency_threshold_seconds",
            "Latency a request must beat to count as good",
            labels=["model"],
        )
        budget = GaugeMetricFamily(
            "batchwire_slo_error_budget_remaining",
            "Share of the error budget left over the longest alert window (negative = overspent)",
            labels=["model", "sli"],
        )
        burn = GaugeMetricFamily(
            "batchwire_slo_burn_rate",
            "Error-budget burn rate over a window (1 = spends the budget in the SLO period)",
            labels=["model", "sli", "window"],
        )
        alert = GaugeMetricFamily(
            "batchwire_slo_alert_firing",
            "1 while a burn-rate alert rule fires",
            labels=["model", "sli", "severity", "rule"],
        )
        latency = GaugeMetricFamily(
            "batchwire_slo_latency_seconds",
            "Latency quantiles of successful requests over the shortest alert window",
            labels=["model", "quantile"],
        )
        for model, state in snapshot.items():
            threshold.add_metric([model], state["objective"]["latency_threshold_ms"] / 1000)
            for sli, values in state["slis"].items():
                objective.add_metric([model, sli], values["objective"])
                budget.add_metric([model, sli], values["budget_remaining"])
                for window, rate in values["burn_rates"].items():
                    burn.add_metric([model, sli, window], rate)
                for rule in self.monitor.rules(model):
                    label = rule_label(rule)
                    on = 1.0 if (model, sli, label) in firing else 0.0
                    alert.add_metric([model, sli, rule.severity, label], on)
            for name, value in state["recent"]["latency_ms"].items():
                if value is not None:
                    quantile = str(int(name[1:]) / 100)
                    latency.add_metric([model, quantile], value / 1000)
        yield from (objective, threshold, budget, burn, alert, latency)
