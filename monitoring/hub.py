"""`Monitoring`: wires tracing, the SLO monitor, drift monitors and Prometheus into a server.

The runtime knows none of this: it calls the per-version observers this module builds
(`observer_factory`) and the load/unload hooks; the front door feeds the SLO monitor
(`slo.ok_feeds` and `slo.record`, when tracing is off) or the tracer. One evaluation thread
re-checks SLO and drift alerts every `evaluate_interval_s`.

NOTE: a thread, not an asyncio task sleeping on the event loop: while any timer is
scheduled, every turn of the loop reads the clock once more and computes a timeout, and
the loop turns several times per request; a 1 s timer alone measured ~2% of mlp64's
throughput at concurrency 32 (BENCHMARKS.md, "Monitoring overhead").
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric

from batching.batcher import ExecutedBatch
from batchwire.config import ModelConfig
from monitoring.drift import DriftCollector, DriftMonitor, load_profile
from monitoring.metrics import MetricsServer, RuntimeCollector
from monitoring.slo import SloCollector, SloMonitor, SloSpanProcessor
from monitoring.tracing import RequestTracer, TracingSettings
from server.runtime import ModelObserver, ModelRuntime

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MonitoringSettings:
    """What a server monitors and where it shows it (`batchwire serve` flags)."""

    metrics_host: str = "127.0.0.1"
    """Address of the metrics HTTP endpoint."""
    metrics_port: int | None = 8002
    """Port of `/metrics`, `/slo` and `/drift` (Triton's metrics port; 0 = any free port,
    None = no endpoint)."""
    tracing: TracingSettings | None = None
    """None = tracing off (the SLO monitor is then fed directly)."""
    evaluate_interval_s: float = 1.0
    """How often SLO burn rates and drift scores are re-evaluated."""


#: `lane_countdown` of a version without drift monitoring: its lane never calls `on_lane`.
_NEVER: Final = 1 << 62


class _VersionObserver:
    """The observer of one model version: batch spans and drift."""

    __slots__ = ("model", "version", "tracer", "drift", "lane_countdown")

    def __init__(
        self, model: str, version: str, tracer: RequestTracer | None, drift: DriftMonitor | None
    ) -> None:
        self.model = model
        self.version = version
        self.tracer = tracer
        self.drift = drift
        self.lane_countdown = 1 if drift is not None else _NEVER
        """CPU-lane requests until the next `on_lane` (`ModelObserver`): the drift monitor's
        `lane_gap`."""

    def on_lane(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Observe one CPU-lane request (`ModelObserver.on_lane`): drift."""
        drift = self.drift
        if drift is None:
            self.lane_countdown = _NEVER
            return
        self.lane_countdown = drift.lane_gap()
        drift.observe(inputs, outputs)

    def on_batch(self, batch: ExecutedBatch) -> None:
        if self.drift is not None and batch.outputs is not None:
            n = batch.samples
            if n == batch.padded_samples:
                self.drift.observe(batch.inputs, batch.outputs)
            else:  # drop the bucket padding rows
                self.drift.observe(
                    {k: v[:n] for k, v in batch.inputs.items()},
                    {k: v[:n] for k, v in batch.outputs.items()},
                )
        if self.tracer is not None:
            self.tracer.record_batch(self.model, self.version, batch)


class Monitoring:
    """Everything a server monitors: build it, pass its hooks to the runtime, `start` it.

    Args:
        settings: what to monitor and where to expose it.
    """

    def __init__(self, settings: MonitoringSettings) -> None:
        self.settings = settings
        self.slo = SloMonitor({})
        self.tracer: RequestTracer | None = (
            RequestTracer(settings.tracing, processors=[SloSpanProcessor(self.slo)])
            if settings.tracing is not None
            else None
        )
        self._drift: dict[tuple[str, str], DriftMonitor] = {}
        self._drift_lock = threading.Lock()
        self.runtime: ModelRuntime | None = None
        self.http: MetricsServer | None = None
        self._evaluator: threading.Thread | None = None
        self._stop_evaluating = threading.Event()

    # ------------------------------------------------------------ runtime hooks
    def observer_factory(
        self, config: ModelConfig, version: int, path: Path
    ) -> ModelObserver | None:
        """The observer of a version being loaded (None when nothing watches it)."""
        drift = None
        if config.drift is not None:
            profile = load_profile(path)
            if profile is None:
                logger.warning(
                    "model %s version %d has a drift block but no reference profile in %s: "
                    "drift monitoring is off for it",
                    config.name,
                    version,
                    path,
                )
            else:
                drift = DriftMonitor(config.name, str(version), profile, config.drift)
                with self._drift_lock:
                    self._drift[(config.name, str(version))] = drift
        if drift is None and self.tracer is None:
            return None
        return _VersionObserver(config.name, str(version), self.tracer, drift)

    def on_load(self, config: ModelConfig) -> None:
        """A model (re)loaded: take its SLO, forget drift state of versions no longer served."""
        self.slo.set_objective(config.name, config.slo)
        self._prune_drift(config.name)

    def on_unload(self, name: str) -> None:
        """A model unloaded: drop its SLO and drift state."""
        self.slo.set_objective(name, None)
        self._prune_drift(name)

    def _prune_drift(self, name: str) -> None:
        if self.runtime is None:  # still loading the repository: nothing stale yet
            return
        served = {str(v) for v in self.runtime.versions(name)}
        with self._drift_lock:
            for key in [k for k in self._drift if k[0] == name and k[1] not in served]:
                del self._drift[key]

    def drift_monitors(self) -> list[DriftMonitor]:
        """The live drift monitors."""
        with self._drift_lock:
            return list(self._drift.values())

    # ------------------------------------------------------------ lifecycle
    def registry(self, runtime: ModelRuntime) -> CollectorRegistry:
        """A Prometheus registry with every collector of this server."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(RuntimeCollector(runtime, extra=self._tracing_metrics))
        registry.register(SloCollector(self.slo))
        registry.register(DriftCollector(self.drift_monitors))
        return registry

    def _tracing_metrics(self) -> Iterator[Metric]:
        tracer = self.tracer
        if tracer is None:
            return
        exported = CounterMetricFamily(
            "batchwire_trace_spans_exported", "Spans handed to the trace exporter successfully"
        )
        exported.add_metric([], tracer.exported_spans)
        dropped = CounterMetricFamily(
            "batchwire_trace_records_dropped",
            "Requests or batches not traced because the span shipper fell behind",
        )
        dropped.add_metric([], tracer.dropped)
        yield exported
        yield dropped

    def drift_snapshot(self) -> dict[str, object]:
        """Drift scores and states per model version as of the last evaluation (`/drift`)."""
        return {f"{m.model}/{m.version}": m.snapshot() for m in self.drift_monitors()}

    async def start(self, runtime: ModelRuntime) -> None:
        """Bind to the runtime, open the metrics endpoint and start evaluating alerts.

        Raises:
            OSError: the metrics port cannot be bound.
        """
        self.runtime = runtime
        for model in runtime.loaded():
            self.slo.set_objective(model.config.name, model.config.slo)
        port = self.settings.metrics_port
        if port is not None:
            try:
                self.http = MetricsServer(
                    self.registry(runtime),
                    {"/slo": self.slo.snapshot, "/drift": self.drift_snapshot},
                    self.settings.metrics_host,
                    port,
                )
            except OSError as exc:
                raise OSError(
                    f"cannot open the metrics endpoint on {self.settings.metrics_host}:{port} "
                    f"({exc.strerror or exc}); pick another with --metrics-port, or --no-metrics"
                ) from exc
            self.http.start()
        self._evaluator = threading.Thread(
            target=self._evaluate_loop, name="monitoring-evaluate", daemon=True
        )
        self._evaluator.start()

    def evaluate(self) -> None:
        """Re-check SLO burn rates and drift scores now (logs alert transitions)."""
        self.slo.evaluate()
        for monitor in self.drift_monitors():
            monitor.evaluate()

    def _evaluate_loop(self) -> None:
        """The evaluation thread: `evaluate` every interval until `close`."""
        interval = self.settings.evaluate_interval_s
        while not self._stop_evaluating.wait(interval):
            try:
                self.evaluate()
            except Exception:
                logger.exception("monitoring evaluation failed")

    async def close(self) -> None:
        """Stop evaluating, close the endpoint, ship the last spans."""
        if self._evaluator is not None:
            self._stop_evaluating.set()
            await asyncio.to_thread(self._evaluator.join)
            self._evaluator = None
        if self.http is not None:
            self.http.stop()
            self.http = None
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)
