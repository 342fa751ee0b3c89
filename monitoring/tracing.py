"""OpenTelemetry traces of every request, recorded off the hot path.

Why not `tracer.start_span` per request: the SDK's `_Span` costs 25-30 µs to start and end
here, and a request has four spans, which would cost more than the whole request does on
a small model. Instead the event loop appends one compact record per request (ids, monotonic
timestamps, attributes: about 2 µs) and the engine threads one per batch; a shipper thread
turns them, every `flush_interval_s`, into the SDK's own `ReadableSpan` objects and hands
those to ordinary SDK span processors and exporters (OTLP/gRPC, or a local JSON-lines file).

Sampling: a request continuing an incoming W3C `traceparent` follows the parent's sampled
flag; otherwise a trace-id ratio (like `TraceIdRatioBased`) decides. Every request still
becomes a server span for the span processors (unsampled ones with the sampled flag off, as
`RECORD_ONLY` spans are), so the SLO monitor's span processor sees all traffic while the
exporters see only the sampled share. Child, batch and engine spans exist only for sampled
requests. See `monitoring/spans.py` for names and attributes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    get_current_span,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import batchwire
from batching.batcher import ExecutedBatch
from batchwire.types import RequestTiming
from monitoring import spans as S

logger = logging.getLogger(__name__)

#: gRPC status codes that mark a *server* span as an error (RPC semantic conventions):
#: the others (INVALID_ARGUMENT, NOT_FOUND...) are the client's doing.
SERVER_ERROR_CODES: Final = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
#: gRPC status name -> number (for the older `rpc.grpc.status_code` attribute).
GRPC_CODE_NUMBERS: Final = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5, "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9, "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12,
    "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}  # fmt: skip

_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_NOT_SAMPLED: Final = TraceFlags(TraceFlags.DEFAULT)
_RATIO_MASK: Final = (1 << 64) - 1
_OK: Final = Status(StatusCode.UNSET)
_ERROR: Final = Status(StatusCode.ERROR)
_PROPAGATOR: Final = TraceContextTextMapPropagator()
_GETTER: Final = DefaultGetter()


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """How requests are traced (`batchwire serve --trace-*` flags)."""

    sampling_ratio: float = 1.0
    """Share of new traces (no incoming parent) that are exported, 0..1."""
    otlp_endpoint: str | None = None
    """OTLP/gRPC collector (e.g. `http://127.0.0.1:4317`); None = the JSON-lines file."""
    trace_file: Path = Path("traces/batchwire-spans.jsonl")
    """Where spans go when no OTLP endpoint is set (rotated to `.1` past `max_file_bytes`)."""
    max_file_bytes: int = 256 * 1024 * 1024
    """Size at which the JSON-lines file is rotated."""
    flush_interval_s: float = 0.2
    """How often the shipper thread turns records into spans."""
    max_buffered: int = 200_000
    """Records waiting for the shipper beyond this are dropped (and counted)."""
    service_name: str | None = None
    """`service.name` resource attribute; None = $OTEL_SERVICE_NAME or `batchwire`."""


class TraceHandle:
    """The ids of one request's server span, and whether its trace is sampled."""

    __slots__ = ("trace_id", "span_id", "parent_span_id", "sampled", "link")

    def __init__(self, trace_id: int, span_id: int, parent_span_id: int, sampled: bool) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        """0 = a root span (no incoming traceparent)."""
        self.sampled = sampled
        self.link: tuple[int, int] | None = (trace_id, span_id) if sampled else None
        """What a batch span links to (only sampled requests get batch links)."""


# Record layouts (plain tuples: the cheapest thing to build on the event loop).
_REQUEST: Final = 0
_BATCH: Final = 1


def monotonic_to_epoch_offset_ns() -> int:
    """`time.time_ns() - time.monotonic_ns()`, read back to back (converts span times)."""
    return time.time_ns() - time.monotonic_ns()


class RequestTracer:
    """Records requests and batches on the hot path; a thread ships them as SDK spans.

    Args:
        settings: sampling and export settings.
        processors: SDK span processors that see every server span and every sampled
            child/batch span (`on_end` only), e.g. the SLO monitor's.
        exporter: receives the sampled spans (None = build one from `settings`).
        resource: the spans' resource (None = service name and version).
    """

    def __init__(
        self,
        settings: TracingSettings,
        *,
        processors: Sequence[SpanProcessor] = (),
        exporter: SpanExporter | None = None,
        resource: Resource | None = None,
    ) -> None:
        if not 0.0 <= settings.sampling_ratio <= 1.0:
            raise ValueError(f"sampling ratio {settings.sampling_ratio} is outside 0..1")
        self.settings = settings
        self.processors = list(processors)
        self.exporter = exporter if exporter is not None else build_exporter(settings)
        self.resource = resource or Resource.create(
            {
                "service.name": settings.service_name
                or os.environ.get("OTEL_SERVICE_NAME", "batchwire"),
                "service.version": batchwire.__version__,
            }
        )
        self.scope = InstrumentationScope(S.SCOPE, batchwire.__version__)
        self._bound = round(settings.sampling_ratio * (1 << 64))
        self._records: deque[tuple[object, ...]] = deque()
        self._max = settings.max_buffered
        self.dropped = 0
        """Records dropped because the shipper fell behind."""
        self.exported_spans = 0
        # NOTE: read once: spans of one server share one clock mapping, so a child never
        # lands outside its parent because the two were shipped at different times.
        self._offset_ns = monotonic_to_epoch_offset_ns()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._ship_loop, name="trace-shipper", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ hot path (event loop)
    def begin(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> TraceHandle:
        """Ids and the sampling decision for a new server span (continuing `traceparent`)."""
        if metadata:
            for key, value in metadata:
                if key == "traceparent" and isinstance(value, str):
                    parent = get_current_span(
                        _PROPAGATOR.extract({"traceparent": value}, getter=_GETTER)
                    ).get_span_context()
                    if parent.is_valid:
                        return TraceHandle(
                            parent.trace_id,
                            random.getrandbits(64),
                            parent.span_id,
                            parent.trace_flags.sampled,
                        )
                    break
        trace_id = random.getrandbits(128)
        return TraceHandle(
            trace_id, random.getrandbits(64), 0, (trace_id & _RATIO_MASK) < self._bound
        )

    def end_request(
        self,
        handle: TraceHandle,
        method: str,
        model: str,
        version: str,
        lane: str,
        samples: int,
        request_id: str,
        status: str,
        start_ns: int,
        decoded_ns: int,
        timing: RequestTiming | None,
        encode_start_ns: int,
        end_ns: int,
    ) -> None:
        """Record one finished request (monotonic times; 0 = that phase did not happen)."""
        if len(self._records) >= self._max:
            self.dropped += 1
            return
        self._records.append(
            (
                _REQUEST, handle, method, model, version, lane, samples, request_id, status,
                start_ns, decoded_ns, timing, encode_start_ns, end_ns,
            )
        )  # fmt: skip

    # ------------------------------------------------------------ engine threads
    def record_batch(self, model: str, version: str, batch: ExecutedBatch) -> None:
        """Record one executed batch if any member request is sampled (thread-safe)."""
        links = [t for t in batch.traces if t is not None]
        if not links or len(self._records) >= self._max:
            return
        sizes = [
            n for n, t in zip(batch.member_samples, batch.traces, strict=True) if t is not None
        ]
        self._records.append(
            (
                _BATCH, model, version, links, sizes, batch.samples, batch.padded_samples,
                len(batch.traces), batch.start_ns, batch.end_ns, batch.error is not None,
            )
        )  # fmt: skip

    # ------------------------------------------------------------ shipper thread
    def flush(self) -> None:
        """Ship everything recorded so far now (blocks until exported)."""
        self._ship()

    def shutdown(self) -> None:
        """Ship what is left, stop the thread, shut the exporter and processors down."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._ship()
        self.exporter.shutdown()
        for processor in self.processors:
            processor.shutdown()

    def _ship_loop(self) -> None:
        interval = self.settings.flush_interval_s
        while not self._stopping:
            self._wake.wait(interval)
            try:
                self._ship()
            except Exception:  # a broken exporter must not kill the thread
                logger.exception("trace shipping failed")

    def _ship(self) -> None:
        records = self._records
        if not records:
            return
        exported: list[ReadableSpan] = []
        processors = self.processors
        n = len(records)
        for _ in range(n):
            record = records.popleft()
            if record[0] == _REQUEST:
                server, children = self._request_spans(record)
                for processor in processors:
                    processor.on_end(server)
                if children is not None:
                    exported.append(server)
                    exported.extend(children)
            else:
                exported.extend(self._batch_spans(record))
        if exported:
            for processor in processors:
                for span in exported:
                    if span.kind is not SpanKind.SERVER:
                        processor.on_end(span)
            result = self.exporter.export(exported)
            if result is SpanExportResult.SUCCESS:
                self.exported_spans += len(exported)
            else:
                logger.warning("exporting %d spans failed", len(exported))

    def _request_spans(
        self, record: tuple[object, ...]
    ) -> tuple[ReadableSpan, list[ReadableSpan] | None]:
        (
            _, handle, method, model, version, lane, samples, request_id, status,
            start_ns, decoded_ns, timing, encode_start_ns, end_ns,
        ) = record  # fmt: skip
        assert isinstance(handle, TraceHandle) and isinstance(status, str)
        assert isinstance(start_ns, int) and isinstance(end_ns, int)
        assert isinstance(decoded_ns, int) and isinstance(encode_start_ns, int)
        offset = self._offset_ns
        flags = _SAMPLED if handle.sampled else _NOT_SAMPLED
        context = SpanContext(handle.trace_id, handle.span_id, False, flags)
        parent = (
            SpanContext(handle.trace_id, handle.parent_span_id, True, flags)
            if handle.parent_span_id
            else None
        )
        attributes: dict[str, str | int] = {
            S.RPC_SYSTEM_NAME: "grpc",
            S.RPC_SYSTEM: "grpc",
            S.RPC_SERVICE: S.SERVICE,
            S.RPC_METHOD: str(method),
            S.RPC_RESPONSE_STATUS_CODE: status,
            S.RPC_GRPC_STATUS_CODE: GRPC_CODE_NUMBERS.get(status, 2),
            S.MODEL_NAME: str(model),
            S.MODEL_VERSION: str(version),
            S.REQUEST_SAMPLES: int(samples),  # type: ignore[call-overload]
        }
        if lane:
            attributes[S.LANE] = str(lane)
        if request_id:
            attributes[S.REQUEST_ID] = str(request_id)
        server = ReadableSpan(
            str(method),
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            kind=SpanKind.SERVER,
            start_time=start_ns + offset,
            end_time=end_ns + offset,
            status=_ERROR if status in SERVER_ERROR_CODES else _OK,
            instrumentation_scope=self.scope,
        )
        if not handle.sampled:
            return server, None
        children: list[ReadableSpan] = []
        if decoded_ns:
            children.append(self._child(context, S.DECODE, start_ns, decoded_ns, {}))
        if isinstance(timing, RequestTiming) and timing.compute_start_ns:
            if timing.queued_ns:
                children.append(
                    self._child(context, S.QUEUE, timing.queued_ns, timing.compute_start_ns, {})
                )
            elif lane == "cpu":
                children.append(
                    self._child(
                        context,
                        S.ENGINE,
                        timing.compute_start_ns,
                        timing.compute_end_ns,
                        {S.LANE: "cpu", S.BATCH_SIZE: timing.batch_samples},
                    )
                )
        if encode_start_ns:
            children.append(self._child(context, S.ENCODE, encode_start_ns, end_ns, {}))
        return server, children

    def _child(
        self,
        parent: SpanContext,
        name: str,
        start_ns: int,
        end_ns: int,
        attributes: dict[str, str | int],
    ) -> ReadableSpan:
        offset = self._offset_ns
        return ReadableSpan(
            name,
            context=SpanContext(parent.trace_id, random.getrandbits(64), False, _SAMPLED),
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            kind=SpanKind.INTERNAL,
            start_time=start_ns + offset,
            end_time=end_ns + offset,
            status=_OK,
            instrumentation_scope=self.scope,
        )

    def _batch_spans(self, record: tuple[object, ...]) -> list[ReadableSpan]:
        (_, model, version, links, sizes, samples, padded, requests, start_ns, end_ns, failed) = (
            record
        )
        assert isinstance(links, list) and isinstance(sizes, list)
        assert isinstance(start_ns, int) and isinstance(end_ns, int)
        offset = self._offset_ns
        context = SpanContext(random.getrandbits(128), random.getrandbits(64), False, _SAMPLED)
        attributes: dict[str, str | int] = {
            S.MODEL_NAME: str(model),
            S.MODEL_VERSION: str(version),
            S.LANE: "batched",
            S.BATCH_SIZE: int(samples),  # type: ignore[call-overload]
            S.BATCH_PADDED_SIZE: int(padded),  # type: ignore[call-overload]
            S.BATCH_REQUESTS: int(requests),  # type: ignore[call-overload]
        }
        batch = ReadableSpan(
            S.BATCH,
            context=context,
            parent=None,
            resource=self.resource,
            attributes=attributes,
            kind=SpanKind.INTERNAL,
            links=[
                Link(SpanContext(trace_id, span_id, False, _SAMPLED), {S.REQUEST_SAMPLES: n})
                for (trace_id, span_id), n in zip(links, sizes, strict=True)
            ],
            start_time=start_ns + offset,
            end_time=end_ns + offset,
            status=_ERROR if failed else _OK,
            instrumentation_scope=self.scope,
        )
        engine = self._child(
            context,
            S.ENGINE,
            start_ns,
            end_ns,
            {S.BATCH_SIZE: int(samples)},  # type: ignore[call-overload]
        )
        return [batch, engine]


# ---------------------------------------------------------------------------- exporters
_KIND_NAMES: Final = {kind: kind.name for kind in SpanKind}
_STATUS_NAMES: Final = {code: code.name for code in StatusCode}
_dumps: Final = json.JSONEncoder(separators=(",", ":"), default=str).encode


def span_to_dict(span: ReadableSpan) -> dict[str, object]:
    """One span in batchwire's JSON-lines layout (see `monitoring/spans.py`)."""
    return json.loads(span_to_line(span, _dumps(dict(span.resource.attributes))))  # type: ignore[no-any-return]


def span_to_line(span: ReadableSpan, resource_json: str = "{}") -> str:
    """One span as a JSON line (no newline), built without an intermediate dict."""
    context = span.context
    assert context is not None
    parent = span.parent
    parent_id = f'"{parent.span_id:016x}"' if parent is not None else "null"
    attributes = span.attributes
    links = span.links
    links_json = (
        "["
        + ",".join(
            f'{{"trace_id":"{link.context.trace_id:032x}","span_id":"{link.context.span_id:016x}"'
            f',"attributes":{_dumps(dict(link.attributes or {}))}}}'
            for link in links
        )
        + "]"
        if links
        else "[]"
    )
    return (
        f'{{"trace_id":"{context.trace_id:032x}","span_id":"{context.span_id:016x}",'
        f'"parent_span_id":{parent_id},"name":{_dumps(span.name)},'
        f'"kind":"{_KIND_NAMES[span.kind]}","start_ns":{span.start_time},'
        f'"end_ns":{span.end_time},"status":"{_STATUS_NAMES[span.status.status_code]}",'
        f'"attributes":{_dumps(dict(attributes)) if attributes else "{}"},'
        f'"links":{links_json},"resource":{resource_json}}}'
    )


class JsonLinesSpanExporter(SpanExporter):
    """Appends spans to a file, one JSON object per line; rotates to `<file>.1` when full.

    The resource is written once per export call (on its first span), not on every line.

    Args:
        path: the file (its folder is created).
        max_bytes: rotate once the file is larger than this.
    """

    def __init__(self, path: Path, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        resource = _dumps(dict(spans[0].resource.attributes))
        lines = [span_to_line(spans[0], resource)]
        lines.extend(span_to_line(span) for span in spans[1:])
        with self._lock:
            if self._file is None:
                return SpanExportResult.FAILURE
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()
            if self._file.tell() > self.max_bytes:
                self._file.close()
                self.path.replace(self.path.with_name(self.path.name + ".1"))
                self._file = self.path.open("a", encoding="utf-8")
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            if self._file is not None:
                self._file.flush()
        return True


def encode_otlp(spans: Sequence[ReadableSpan]) -> Any:
    """An OTLP ExportTraceServiceRequest of SDK spans, built in place.

    Does what the SDK's `encode_spans` does for the fields batchwire sets, at a fraction of
    its cost (the SDK spends ~30 µs per span here on generic attribute handling).
    """
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
    from opentelemetry.proto.trace.v1.trace_pb2 import Status as PbStatus

    kinds = {
        SpanKind.INTERNAL: PbSpan.SPAN_KIND_INTERNAL,
        SpanKind.SERVER: PbSpan.SPAN_KIND_SERVER,
        SpanKind.CLIENT: PbSpan.SPAN_KIND_CLIENT,
        SpanKind.PRODUCER: PbSpan.SPAN_KIND_PRODUCER,
        SpanKind.CONSUMER: PbSpan.SPAN_KIND_CONSUMER,
    }
    request = ExportTraceServiceRequest()
    scopes: dict[tuple[int, int], Any] = {}
    for span in spans:
        key = (id(span.resource), id(span.instrumentation_scope))
        scope_spans = scopes.get(key)
        if scope_spans is None:
            resource_spans = request.resource_spans.add()
            resource_spans.schema_url = span.resource.schema_url
            _set_attributes(resource_spans.resource.attributes, span.resource.attributes)
            scope_spans = scopes[key] = resource_spans.scope_spans.add()
            if span.instrumentation_scope is not None:
                scope_spans.scope.name = span.instrumentation_scope.name
                scope_spans.scope.version = span.instrumentation_scope.version or ""
        context = span.context
        assert context is not None
        parent = span.parent
        out = scope_spans.spans.add(
            trace_id=context.trace_id.to_bytes(16, "big"),
            span_id=context.span_id.to_bytes(8, "big"),
            name=span.name,
            kind=kinds[span.kind],
            start_time_unix_nano=span.start_time or 0,
            end_time_unix_nano=span.end_time or 0,
            flags=0x100 | (0x200 if parent is not None and parent.is_remote else 0),
        )
        if parent is not None:
            out.parent_span_id = parent.span_id.to_bytes(8, "big")
        if span.attributes:
            _set_attributes(out.attributes, span.attributes)
        for link in span.links:
            encoded = out.links.add(
                trace_id=link.context.trace_id.to_bytes(16, "big"),
                span_id=link.context.span_id.to_bytes(8, "big"),
            )
            if link.attributes:
                _set_attributes(encoded.attributes, link.attributes)
        if span.status.status_code is StatusCode.ERROR:
            out.status.code = PbStatus.STATUS_CODE_ERROR
    return request


def _set_attributes(target: Any, attributes: Any) -> None:
    for key, value in attributes.items():
        slot = target.add(key=key).value
        if isinstance(value, bool):
            slot.bool_value = value
        elif isinstance(value, int):
            slot.int_value = value
        elif isinstance(value, float):
            slot.double_value = value
        else:
            slot.string_value = str(value)


def build_exporter(settings: TracingSettings) -> SpanExporter:
    """OTLP/gRPC when an endpoint is configured (flag, or $OTEL_EXPORTER_OTLP_ENDPOINT /
    $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), else the JSON-lines file."""
    endpoint = (
        settings.otlp_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        class _Exporter(OTLPSpanExporter):
            def _translate_data(self, data: Sequence[ReadableSpan]) -> Any:
                return encode_otlp(data)

        insecure = endpoint.startswith("http://") or "://" not in endpoint
        logger.info("exporting spans to OTLP/gRPC %s", endpoint)
        return _Exporter(endpoint=endpoint, insecure=insecure)
    logger.info("writing spans to %s", settings.trace_file)
    return JsonLinesSpanExporter(settings.trace_file, settings.max_file_bytes)
