"""Prometheus metrics of a running server, read from the runtime's counters at scrape time.

Nothing here runs per request: the runtime, batchers and lanes keep plain counters and
fixed-bucket histograms (`batchwire/histogram.py`), and `RuntimeCollector` turns them into
metric families when Prometheus scrapes. Triton's names are kept where Triton has the
metric (`nv_inference_*`, so existing dashboards work); the rest are `batchwire_*`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any, Final
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from batchwire.errors import ErrorCode
from batchwire.histogram import Histogram
from server.runtime import ModelRuntime, ModelVersion

logger = logging.getLogger(__name__)

#: Triton's `nv_inference_request_failure` reasons, from our error codes.
TRITON_FAILURE_REASONS: Final = {
    ErrorCode.QUEUE_FULL.value: "REJECTED",
    ErrorCode.DEADLINE_EXCEEDED.value: "REJECTED",
    ErrorCode.INTERNAL.value: "BACKEND",
}
#: gRPC status name of each error code (as `server/status.py` maps them).
_STATUS_NAMES: dict[str, str] = {}


def _status_name(code: str) -> str:
    name = _STATUS_NAMES.get(code)
    if name is None:
        from server.status import grpc_status

        name = _STATUS_NAMES[code] = grpc_status(ErrorCode(code)).name
    return name


class ExactNameCounter(Metric):
    """A counter exposed under exactly its name (Triton's `nv_inference_*` have no `_total`).

    prometheus_client appends `_total` to counter families, which would break Triton
    dashboards, so these are exposed untyped; `rate()` works on them all the same.
    """

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        super().__init__(name, documentation, "unknown")
        self._labelnames = labels

    def add_metric(self, labels: list[str], value: float) -> None:
        """Add the value of one label set."""
        self.add_sample(self.name, dict(zip(self._labelnames, labels, strict=True)), value)


def _histogram(
    family: HistogramMetricFamily, labels: list[str], hist: Histogram, scale: float = 1e-9
) -> None:
    buckets = [
        ("+Inf" if bound == float("inf") else repr(bound), count)
        for bound, count in hist.cumulative()
    ]
    family.add_metric(labels, buckets, hist.sum_ns * scale)


def batch_size_buckets(max_batch_size: int) -> list[int]:
    """Powers of two up to the model's largest batch, and that batch itself."""
    out, size = [], 1
    while size < max_batch_size:
        out.append(size)
        size *= 2
    out.append(max(max_batch_size, 1))
    return out


class RuntimeCollector(Collector):
    """Request, batch, queue and lane metrics of every loaded model version.

    Args:
        runtime: the served runtime.
        extra: more families to append (tracing counters...), called at each scrape.
    """

    def __init__(
        self, runtime: ModelRuntime, extra: Callable[[], Iterable[Metric]] | None = None
    ) -> None:
        self.runtime = runtime
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "version"]
        success = ExactNameCounter(
            "nv_inference_request_success", "Successful inference requests", labels=labels
        )
        failure = ExactNameCounter(
            "nv_inference_request_failure",
            "Failed inference requests (reason: REJECTED, BACKEND, OTHER)",
            labels=[*labels, "reason"],
        )
        count = ExactNameCounter(
            "nv_inference_count", "Inferences performed (samples; batch rows)", labels=labels
        )
        execs = ExactNameCounter(
            "nv_inference_exec_count",
            "Model executions (batches and CPU-lane calls); count/exec_count = mean batch size",
            labels=labels,
        )
        request_us = ExactNameCounter(
            "nv_inference_request_duration_us",
            "Cumulative time requests spent in the runtime (queue + compute), microseconds",
            labels=labels,
        )
        queue_us = ExactNameCounter(
            "nv_inference_queue_duration_us",
            "Cumulative time requests waited in the batch queue, microseconds",
            labels=labels,
        )
        compute_us = ExactNameCounter(
            "nv_inference_compute_infer_duration_us",
            "Cumulative engine time per request, microseconds",
            labels=labels,
        )
        pending = GaugeMetricFamily(
            "nv_inference_pending_request_count",
            "Requests waiting in the batch queue now",
            labels=labels,
        )
        requests = CounterMetricFamily(
            "batchwire_requests",
            "Requests that reached a loaded model, by gRPC status",
            labels=[*labels, "status"],
        )
        lanes = CounterMetricFamily(
            "batchwire_lane_requests",
            "Successful requests by lane (cpu = CPU-concurrency lane, batched = dynamic batcher)",
            labels=[*labels, "lane"],
        )
        rejected = CounterMetricFamily(
            "batchwire_rejected_inputs",
            "Requests rejected as invalid, by reason (shape, datatype, batch_size, malformed...)",
            labels=[*labels, "reason"],
        )
        latency = HistogramMetricFamily(
            "batchwire_request_duration_seconds",
            "Time successful requests spent in the runtime: lane or queue + compute",
            labels=labels,
        )
        queue_hist = HistogramMetricFamily(
            "batchwire_queue_duration_seconds",
            "Time each batched request waited in the queue",
            labels=labels,
        )
        compute_hist = HistogramMetricFamily(
            "batchwire_compute_duration_seconds",
            "Engine time of each executed batch (batched lane)",
            labels=labels,
        )
        batch_hist = HistogramMetricFamily(
            "batchwire_batch_size",
            "Samples per executed batch (batched lane)",
            labels=labels,
        )
        depth = GaugeMetricFamily(
            "batchwire_queue_depth", "Requests waiting in the batch queue now", labels=labels
        )
        in_flight = GaugeMetricFamily(
            "batchwire_batches_in_flight", "Batches computing now", labels=labels
        )
        for model in list(self.runtime.loaded()):
            self._add_version(
                model,
                success, failure, count, execs, request_us, queue_us, compute_us, pending,
                requests, lanes, rejected, latency, queue_hist, compute_hist, batch_hist,
                depth, in_flight,
            )  # fmt: skip
        yield from (
            success, failure, count, execs, request_us, queue_us, compute_us, pending,
            requests, lanes, rejected, latency, queue_hist, compute_hist, batch_hist,
            depth, in_flight,
        )  # fmt: skip
        if self.extra is not None:
            yield from self.extra()

    @staticmethod
    def _add_version(model: ModelVersion, *families: Any) -> None:
        (
            success, failure, count, execs, request_us, queue_us, compute_us, pending,
            requests, lanes, rejected, latency, queue_hist, compute_hist, batch_hist,
            depth, in_flight,
        ) = families  # fmt: skip
        labels = [model.config.name, str(model.version)]
        stats, batcher, lane = model.stats, model.batcher, model.lane
        bstats = batcher.stats
        success.add_metric(labels, stats.success.count)
        by_reason: dict[str, int] = {"REJECTED": 0, "BACKEND": 0, "OTHER": 0}
        for code, n in stats.failures.items():
            reason = TRITON_FAILURE_REASONS.get(code, "OTHER")
            by_reason[reason] += n
            requests.add_metric([*labels, _status_name(code)], n)
        for reason, n in by_reason.items():
            failure.add_metric([*labels, reason], n)
        requests.add_metric([*labels, "OK"], stats.success.count)
        lane_samples = lane.samples_total if lane else 0
        lane_requests = lane.requests_total if lane else 0
        count.add_metric(labels, bstats.samples_total + lane_samples)
        execs.add_metric(labels, bstats.batches_total + lane_requests)
        request_us.add_metric(labels, (stats.success.ns + stats.fail.ns) / 1000)
        queue_us.add_metric(labels, bstats.queue_ns_total / 1000)
        compute_us.add_metric(
            labels,
            (bstats.compute_request_ns_total + (lane.compute_ns_total if lane else 0)) / 1000,
        )
        pending.add_metric(labels, batcher.queue_depth)
        depth.add_metric(labels, batcher.queue_depth)
        in_flight.add_metric(labels, batcher.batches_in_flight)
        for lane_name, n in stats.lane_requests.items():
            lanes.add_metric([*labels, lane_name], n)
        for reason, n in stats.rejected.items():
            rejected.add_metric([*labels, reason], n)
        _histogram(latency, labels, stats.latency_hist)
        _histogram(queue_hist, labels, bstats.queue_hist)
        _histogram(compute_hist, labels, bstats.compute_hist)
        sizes = dict(bstats.batch_sizes)
        bounds = batch_size_buckets(model.config.max_batch_size)
        buckets = []
        for bound in bounds:
            buckets.append((str(bound), sum(n for size, n in sizes.items() if size <= bound)))
        buckets.append(("+Inf", sum(sizes.values())))
        batch_hist.add_metric(labels, buckets, sum(size * n for size, n in sizes.items()))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        logger.debug("metrics http: " + format, *args)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class MetricsServer:
    """HTTP endpoint: `/metrics` (Prometheus text), `/slo` and `/drift` (JSON).

    Args:
        registry: the collectors to expose.
        json_routes: path -> callable returning a JSON-able object.
        host: address to listen on.
        port: port (0 = any free one; see `port` after start).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        json_routes: dict[str, Callable[[], object]],
        host: str,
        port: int,
    ) -> None:
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "/")
            route = json_routes.get(path)
            if route is not None:
                try:
                    body = json.dumps(route(), default=str).encode()
                    status = "200 OK"
                except Exception as exc:  # a broken route must not take the endpoint down
                    logger.exception("metrics http route %s failed", path)
                    body = json.dumps({"error": str(exc)}).encode()
                    status = "500 Internal Server Error"
                start_response(status, [("Content-Type", "application/json")])
                return [body]
            if path in ("/metrics", "/"):
                result: Iterable[bytes] = metrics_app(environ, start_response)
                return result
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: try /metrics, " + ", ".join(json_routes).encode() + b"\n"]

        self._server = make_server(
            host, port, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
        )
        self.host = host
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
