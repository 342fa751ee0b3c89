"""A minimal OTLP/gRPC trace receiver (the collector's TraceService) on 127.0.0.1.

Used by the tracing tests (to check what arrives) and by the monitoring-overhead benchmark
(as the far end of the OTLP exporter). Keeps every span it receives, flattened to dicts.

    python -m loadtests.otlp_sink --port 4317      # prints spans received per second
"""

from __future__ import annotations

import argparse
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as ts
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as ts_grpc
from opentelemetry.proto.common.v1 import common_pb2


def _value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, which)


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items}


@dataclass
class _Store:
    spans: list[dict[str, Any]] = field(default_factory=list)
    """The spans received, flattened (kept only when `keep`)."""
    counted: int = 0
    """Spans received."""
    requests: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    keep: bool = True


class _TraceService(ts_grpc.TraceServiceServicer):
    def __init__(self, store: _Store) -> None:
        self.store = store

    def Export(
        self, request: ts.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> ts.ExportTraceServiceResponse:
        if not self.store.keep:
            # NOTE: count only: flattening costs ~15 µs per span, which a benchmark's sink
            # would take from the 2 cores the measured server runs on.
            count = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
            with self.store.lock:
                self.store.requests += 1
                self.store.counted += count
            return ts.ExportTraceServiceResponse()
        flat = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    flat.append(
                        {
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex() or None,
                            "name": span.name,
                            "kind": span.kind,
                            "start_ns": span.start_time_unix_nano,
                            "end_ns": span.end_time_unix_nano,
                            "status_code": span.status.code,
                            "attributes": _attributes(span.attributes),
                            "links": [
                                {
                                    "trace_id": link.trace_id.hex(),
                                    "span_id": link.span_id.hex(),
                                    "attributes": _attributes(link.attributes),
                                }
                                for link in span.links
                            ],
                            "resource": resource,
                            "scope": scope_spans.scope.name,
                        }
                    )
        with self.store.lock:
            self.store.requests += 1
            self.store.counted += len(flat)
            self.store.spans.extend(flat)
        return ts.ExportTraceServiceResponse()


class OtlpSink:
    """A TraceService server on 127.0.0.1 (port 0 = any free port) keeping what it gets.

    Args:
        port: where to listen.
        keep_spans: keep flattened spans (False: count them only, for benchmarks).
    """

    def __init__(self, port: int = 0, *, keep_spans: bool = True) -> None:
        self._store = _Store(keep=keep_spans)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        ts_grpc.add_TraceServiceServicer_to_server(_TraceService(self._store), self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()

    @property
    def endpoint(self) -> str:
        """The `--otlp-endpoint` value that reaches this sink."""
        return f"http://127.0.0.1:{self.port}"

    def spans(self) -> list[dict[str, Any]]:
        """A copy of every span received so far."""
        with self._store.lock:
            return list(self._store.spans)

    def count(self) -> int:
        """Spans received so far."""
        with self._store.lock:
            return self._store.counted

    def wait_for(self, predicate: Any, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Poll until `predicate(spans)` holds; returns the spans (raises on timeout)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"OTLP sink: condition not met with {len(spans)} spans")
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop listening."""
        self._server.stop(grace=None).wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=4317)
    parser.add_argument("--seconds", type=float, default=60.0, help="stop after this long")
    args = parser.parse_args()
    sink = OtlpSink(args.port, keep_spans=False)
    print(f"OTLP sink on {sink.endpoint}", flush=True)
    try:
        last, deadline = 0, time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = sink.count()
            print(f"{now - last} spans/s (total {now})", flush=True)
            last = now
    finally:
        sink.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
