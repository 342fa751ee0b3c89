"""OpenTelemetry traces of every request, recorded off the hot path.

Why not `tracer.start_span` per request: the SDK's `_Span` costs 25-30 µs to start and end
here, and a request has four spans, which would cost more than the whole request does on
a small model. Instead the event loop appends one compact record per request (ids, monotonic
timestamps, attributes: about 2 µs) and the engine threads one per batch; a shipper thread
turns them, every `flush_interval_s`, into `SpanData` tuples that the exporters write
directly (OTLP/gRPC), or, for the local JSON-lines file, straight into text: about 8 µs
per request with four spans, where building SDK `ReadableSpan`s and converting them cost
50 µs. `RequestSpanProcessor`s
(the SLO monitor's) get each request's fields without any span object; other SDK span
processors and exporters still work, and get `ReadableSpan`s built for them.

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
import struct
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, NamedTuple, cast

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


class SpanData(NamedTuple):
    """One finished span as the shipper builds it: what the exporters write, with no SDK
    objects (a `ReadableSpan` is built from it only for SDK processors and exporters)."""

    name: str
    trace_id: int
    span_id: int
    parent_span_id: int
    """0 = a root span."""
    parent_remote: bool
    """The parent came from an incoming `traceparent`."""
    server: bool
    """SpanKind SERVER (else INTERNAL)."""
    start_ns: int
    """Unix epoch nanoseconds."""
    end_ns: int
    error: bool
    """Status ERROR (else UNSET)."""
    sampled: bool
    attributes: dict[str, str | int]
    links: tuple[tuple[int, int, int], ...]
    """(trace id, span id, `batchwire.request.samples`) per linked request span."""
    attributes_json: str = ""
    """`attributes` as JSON when the tracer has it cached ("" = not computed)."""


def readable_span(data: SpanData, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    """The SDK span of a `SpanData` (for SDK span processors and exporters)."""
    flags = _SAMPLED if data.sampled else _NOT_SAMPLED
    return ReadableSpan(
        data.name,
        context=SpanContext(data.trace_id, data.span_id, False, flags),
        parent=(
            SpanContext(data.trace_id, data.parent_span_id, data.parent_remote, flags)
            if data.parent_span_id
            else None
        ),
        resource=resource,
        attributes=data.attributes,
        kind=SpanKind.SERVER if data.server else SpanKind.INTERNAL,
        links=[
            Link(SpanContext(t, s, False, _SAMPLED), {S.REQUEST_SAMPLES: n})
            for t, s, n in data.links
        ],
        start_time=data.start_ns,
        end_time=data.end_ns,
        status=_ERROR if data.error else _OK,
        instrumentation_scope=scope,
    )


def span_data(span: ReadableSpan) -> SpanData:
    """The `SpanData` of an SDK span (kinds other than SERVER become INTERNAL)."""
    context = span.context
    assert context is not None
    parent = span.parent
    return SpanData(
        span.name,
        context.trace_id,
        context.span_id,
        parent.span_id if parent is not None else 0,
        bool(parent is not None and parent.is_remote),
        span.kind is SpanKind.SERVER,
        span.start_time or 0,
        span.end_time or 0,
        span.status.status_code is StatusCode.ERROR,
        context.trace_flags.sampled,
        dict(span.attributes or {}),  # type: ignore[arg-type]
        tuple(
            (
                link.context.trace_id,
                link.context.span_id,
                int((link.attributes or {}).get(S.REQUEST_SAMPLES, 0)),  # type: ignore[arg-type]
            )
            for link in span.links
        ),
    )


class RequestSpanProcessor(SpanProcessor):
    """A span processor interested only in batchwire's server spans.

    `RequestTracer` calls `on_request_end` with a request's fields directly, building no
    span object for it; `on_end` (any SDK span) extracts the same fields from a SERVER span
    that carries `batchwire.model.name`, so the processor also works in an SDK pipeline.
    """

    def on_request_end(self, model: str, status: str, duration_ns: int) -> None:
        """One finished request: its model, gRPC status name and server-side duration."""
        raise NotImplementedError

    def on_end(self, span: ReadableSpan) -> None:
        if span.kind is not SpanKind.SERVER or span.start_time is None or span.end_time is None:
            return
        attributes = span.attributes or {}
        model = attributes.get(S.MODEL_NAME)
        if not isinstance(model, str):
            return
        status = attributes.get(S.RPC_RESPONSE_STATUS_CODE, "OK")
        self.on_request_end(model, str(status), span.end_time - span.start_time)


class SpanDataExporter(SpanExporter):
    """An exporter that also takes `SpanData` directly (the tracer's path: no SDK spans)."""

    def export_data(
        self, spans: Sequence[SpanData], resource: Resource, scope: InstrumentationScope
    ) -> SpanExportResult:
        """Export spans that share one resource and scope."""
        raise NotImplementedError

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        first = spans[0]
        scope = first.instrumentation_scope or InstrumentationScope(S.SCOPE)
        return self.export_data([span_data(s) for s in spans], first.resource, scope)


#: Distinct attribute sets cached per tracer (server spans) before the cache starts over.
_ATTRIBUTE_CACHE_SIZE: Final = 4096

# Record layouts (plain tuples: the cheapest thing to build on the event loop).
_REQUEST: Final = 0
_BATCH: Final = 1
_RequestRecord = tuple[
    int, "TraceHandle", str, str, str, str, int, str, str, int, int, RequestTiming | None, int, int
]
"""_REQUEST, handle, method, model, version, lane, samples, request id, status, start,
decoded, timing, encode start, end (monotonic ns; 0 = that phase did not happen)."""
_Phase = tuple[str, int, int, bool, dict[str, str | int], str]
"""A request's child span: name, start, end (monotonic ns), error, attributes, their JSON."""
_NO_ATTRIBUTES: Final[dict[str, str | int]] = {}
"""The attributes of decode, queue and encode spans (shared: nothing may modify it)."""


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
        self._attribute_cache: dict[tuple[object, ...], tuple[dict[str, str | int], str]] = {}
        self._lane_engine_cache: dict[int, tuple[dict[str, str | int], str]] = {}
        self._fast_processors = [p for p in self.processors if isinstance(p, RequestSpanProcessor)]
        self._generic_processors = [
            p for p in self.processors if not isinstance(p, RequestSpanProcessor)
        ]
        self.exporter = exporter if exporter is not None else build_exporter(settings)
        self.resource = resource or Resource.create(
            {
                "service.name": settings.service_name
                or os.environ.get("OTEL_SERVICE_NAME", "batchwire"),
                "service.version": batchwire.__version__,
            }
        )
        self._resource_json = _dumps(dict(self.resource.attributes))
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
        exporter = self.exporter
        generic = self._generic_processors
        if isinstance(exporter, JsonLinesSpanExporter) and not generic:
            self._ship_lines(exporter)
            return
        exported: list[SpanData] = []
        for _ in range(len(records)):
            record = records.popleft()
            if record[0] == _REQUEST:
                request = cast(_RequestRecord, record)
                self._feed_fast_processors(request)
                if not request[1].sampled and not generic:
                    continue
                server, children = self._request_spans(request)
                for processor in generic:
                    processor.on_end(readable_span(server, self.resource, self.scope))
                if children is not None:
                    exported.append(server)
                    exported.extend(children)
            else:
                exported.extend(self._batch_spans(record))
        if not exported:
            return
        if generic:
            for data in exported:
                if not data.server:
                    span = readable_span(data, self.resource, self.scope)
                    for processor in generic:
                        processor.on_end(span)
        if isinstance(exporter, SpanDataExporter):
            result = exporter.export_data(exported, self.resource, self.scope)
        else:
            result = exporter.export(
                [readable_span(data, self.resource, self.scope) for data in exported]
            )
        self._count_export(result, len(exported))

    def _ship_lines(self, exporter: JsonLinesSpanExporter) -> None:
        """`_ship` for the JSON-lines file with no SDK processor: request records go
        straight to text (`_request_lines`), with no `SpanData` in between."""
        records = self._records
        resource_json = self._resource_json
        chunks: list[str] = []
        spans = 0
        for _ in range(len(records)):
            record = records.popleft()
            if record[0] == _REQUEST:
                request = cast(_RequestRecord, record)
                self._feed_fast_processors(request)
                if request[1].sampled:
                    text, count = self._request_lines(request, "{}" if chunks else resource_json)
                    chunks.append(text)
                    spans += count
            else:
                batch = self._batch_spans(record)
                chunks.append(span_line(batch[0], "{}" if chunks else resource_json))
                chunks.extend(map(span_line, batch[1:]))
                spans += len(batch)
        if chunks:
            chunks.append("")
            self._count_export(exporter.write("\n".join(chunks)), spans)

    def _feed_fast_processors(self, record: _RequestRecord) -> None:
        """Every request, sampled or not, reaches the fast processors (the SLO monitor's)
        as its fields: model, status, duration."""
        for processor in self._fast_processors:
            processor.on_request_end(record[3], record[8], record[13] - record[9])

    def _count_export(self, result: SpanExportResult, spans: int) -> None:
        if result is SpanExportResult.SUCCESS:
            self.exported_spans += spans
        else:
            logger.warning("exporting %d spans failed", spans)

    def _request_lines(self, record: _RequestRecord, resource_json: str) -> tuple[str, int]:
        """A sampled request's spans as JSON lines (no final newline) and their count.

        NOTE: the same spans, ids drawn in the same order and the same text as
        `span_line` of each of `_request_spans(record)` (a test compares the two); this
        one costs a quarter as much.
        """
        (_, handle, method, _, _, _, _, _, status, start_ns, _, _, _, end_ns) = record
        offset = self._offset_ns
        _, attributes_json = self._server_attributes(record)
        trace = f"{handle.trace_id:032x}"
        span = f"{handle.span_id:016x}"
        parent = f'"{handle.parent_span_id:016x}"' if handle.parent_span_id else "null"
        lines = [
            f'{{"trace_id":"{trace}","span_id":"{span}","parent_span_id":{parent},'
            f'"name":{_name_json(method)},"kind":"SERVER","start_ns":{start_ns + offset},'
            f'"end_ns":{end_ns + offset},'
            f'"status":"{"ERROR" if status in SERVER_ERROR_CODES else "UNSET"}",'
            f'"attributes":{attributes_json},"links":[],"resource":{resource_json}}}'
        ]
        bits = random.getrandbits
        lines.extend(
            _child_line(trace, bits(64), span, _name_json(name), start + offset, end + offset,
                        error, attributes_json)
            for name, start, end, error, _, attributes_json in self._child_phases(record)
        )  # fmt: skip
        return "\n".join(lines), len(lines)

    def _request_spans(self, record: _RequestRecord) -> tuple[SpanData, list[SpanData] | None]:
        """A request's server span, and its children when it is sampled."""
        (_, handle, method, _, _, _, _, _, status, start_ns, _, _, _, end_ns) = record
        offset = self._offset_ns
        attributes, attributes_json = self._server_attributes(record)
        trace_id, span_id = handle.trace_id, handle.span_id
        server = SpanData(
            method, trace_id, span_id, handle.parent_span_id, bool(handle.parent_span_id),
            True, start_ns + offset, end_ns + offset, status in SERVER_ERROR_CODES,
            handle.sampled, attributes, (), attributes_json,
        )  # fmt: skip
        if not handle.sampled:
            return server, None
        bits = random.getrandbits
        children = [
            SpanData(name, trace_id, bits(64), span_id, False, False, start + offset,
                     end + offset, error, True, attributes, (), attributes_json)
            for name, start, end, error, attributes, attributes_json in self._child_phases(record)
        ]  # fmt: skip
        return server, children

    def _child_phases(self, record: _RequestRecord) -> list[_Phase]:
        """The child spans of a sampled request, in order: decode, then queue (batched
        lane) or engine (CPU lane), then encode; each only if that phase happened."""
        (
            _, _, _, _, _, lane, _, _, _, start_ns, decoded_ns, timing, encode_start_ns, end_ns,
        ) = record  # fmt: skip
        phases: list[_Phase] = []
        if decoded_ns:
            phases.append((S.DECODE, start_ns, decoded_ns, False, _NO_ATTRIBUTES, "{}"))
        if timing is not None:
            if timing.queued_ns:
                # NOTE: a request that never reached an engine (its deadline passed in the
                # queue, or its caller left) waited until the request ended: an error span.
                left = timing.compute_start_ns
                phases.append(
                    (S.QUEUE, timing.queued_ns, left or end_ns, not left, _NO_ATTRIBUTES, "{}")
                )
            elif timing.compute_start_ns and lane == "cpu":
                attributes, attributes_json = self._lane_engine_attributes(timing.batch_samples)
                phases.append(
                    (S.ENGINE, timing.compute_start_ns, timing.compute_end_ns, False,
                     attributes, attributes_json)
                )  # fmt: skip
        if encode_start_ns:
            phases.append((S.ENCODE, encode_start_ns, end_ns, False, _NO_ATTRIBUTES, "{}"))
        return phases

    def _server_attributes(self, record: _RequestRecord) -> tuple[dict[str, str | int], str]:
        """A request's server-span attributes and their JSON, cached: most requests share
        them.

        NOTE: cached dicts are shared by many spans; nothing may modify them.
        """
        (_, _, method, model, version, lane, samples, request_id, status, *_) = record
        key = (method, model, version, lane, samples, status)
        cache = self._attribute_cache
        hit = cache.get(key)
        if hit is None:
            if len(cache) >= _ATTRIBUTE_CACHE_SIZE:
                cache.clear()
            attributes: dict[str, str | int] = {
                S.RPC_SYSTEM_NAME: "grpc",
                S.RPC_SYSTEM: "grpc",
                S.RPC_SERVICE: S.SERVICE,
                S.RPC_METHOD: method,
                S.RPC_RESPONSE_STATUS_CODE: status,
                S.RPC_GRPC_STATUS_CODE: GRPC_CODE_NUMBERS.get(status, 2),
                S.MODEL_NAME: model,
                S.MODEL_VERSION: version,
                S.REQUEST_SAMPLES: samples,
            }
            if lane:
                attributes[S.LANE] = lane
            hit = cache[key] = (attributes, _dumps(attributes))
        if not request_id:
            return hit
        attributes, encoded = hit
        return (
            {**attributes, S.REQUEST_ID: request_id},
            f"{encoded[:-1]},{_REQUEST_ID_JSON}:{_dumps(request_id)}}}",
        )

    def _lane_engine_attributes(self, samples: int) -> tuple[dict[str, str | int], str]:
        """Attributes and attribute JSON of a CPU-lane engine span (cached)."""
        cache = self._lane_engine_cache
        hit = cache.get(samples)
        if hit is None:
            if len(cache) >= _ATTRIBUTE_CACHE_SIZE:
                cache.clear()
            attributes: dict[str, str | int] = {S.LANE: "cpu", S.BATCH_SIZE: samples}
            hit = cache[samples] = (attributes, _dumps(attributes))
        return hit

    def _batch_spans(self, record: tuple[object, ...]) -> list[SpanData]:
        (_, model, version, links, sizes, samples, padded, requests, start_ns, end_ns, failed) = (
            record
        )
        assert isinstance(links, list) and isinstance(sizes, list)
        assert isinstance(start_ns, int) and isinstance(end_ns, int)
        offset = self._offset_ns
        trace_id, span_id = random.getrandbits(128), random.getrandbits(64)
        attributes: dict[str, str | int] = {
            S.MODEL_NAME: str(model),
            S.MODEL_VERSION: str(version),
            S.LANE: "batched",
            S.BATCH_SIZE: int(samples),  # type: ignore[call-overload]
            S.BATCH_PADDED_SIZE: int(padded),  # type: ignore[call-overload]
            S.BATCH_REQUESTS: int(requests),  # type: ignore[call-overload]
        }
        batch = SpanData(
            S.BATCH, trace_id, span_id, 0, False, False, start_ns + offset, end_ns + offset,
            bool(failed), True, attributes,
            tuple((t, s, n) for (t, s), n in zip(links, sizes, strict=True)),
        )  # fmt: skip
        engine = SpanData(
            S.ENGINE, trace_id, random.getrandbits(64), span_id, False, False,
            start_ns + offset, end_ns + offset, bool(failed), True,
            {S.BATCH_SIZE: int(samples)}, (),  # type: ignore[call-overload]
        )  # fmt: skip
        return [batch, engine]


# ---------------------------------------------------------------------------- exporters
_dumps: Final = json.JSONEncoder(separators=(",", ":"), default=str).encode
_SAMPLES_JSON: Final = _dumps(S.REQUEST_SAMPLES)
_REQUEST_ID_JSON: Final = _dumps(S.REQUEST_ID)
_NAME_JSON: dict[str, str] = {}
"""Span name -> its JSON string (a handful of names)."""


def _name_json(name: str) -> str:
    encoded = _NAME_JSON.get(name)
    if encoded is None:
        encoded = _NAME_JSON[name] = _dumps(name)
    return encoded


def _child_line(
    trace: str, span_id: int, parent: str, name_json: str, start_ns: int, end_ns: int,
    error: bool, attributes_json: str,
) -> str:  # fmt: skip
    """A request's child span as a JSON line (`span_line`'s layout, hex ids given)."""
    return (
        f'{{"trace_id":"{trace}","span_id":"{span_id:016x}","parent_span_id":"{parent}",'
        f'"name":{name_json},"kind":"INTERNAL","start_ns":{start_ns},"end_ns":{end_ns},'
        f'"status":"{"ERROR" if error else "UNSET"}","attributes":{attributes_json},'
        f'"links":[],"resource":{{}}}}'
    )


def span_line(span: SpanData, resource_json: str = "{}") -> str:
    """One span in batchwire's JSON-lines layout (see `monitoring/spans.py`), no newline."""
    parent_id = f'"{span.parent_span_id:016x}"' if span.parent_span_id else "null"
    links = span.links
    links_json = (
        "["
        + ",".join(
            f'{{"trace_id":"{t:032x}","span_id":"{s:016x}","attributes":{{{_SAMPLES_JSON}:{n}}}}}'
            for t, s, n in links
        )
        + "]"
        if links
        else "[]"
    )
    attributes = span.attributes
    name = _name_json(span.name)
    return (
        f'{{"trace_id":"{span.trace_id:032x}","span_id":"{span.span_id:016x}",'
        f'"parent_span_id":{parent_id},"name":{name},'
        f'"kind":"{"SERVER" if span.server else "INTERNAL"}","start_ns":{span.start_ns},'
        f'"end_ns":{span.end_ns},"status":"{"ERROR" if span.error else "UNSET"}",'
        f'"attributes":{span.attributes_json or (_dumps(attributes) if attributes else "{}")},'
        f'"links":{links_json},"resource":{resource_json}}}'
    )


class JsonLinesSpanExporter(SpanDataExporter):
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

    def export_data(
        self, spans: Sequence[SpanData], resource: Resource, scope: InstrumentationScope
    ) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        lines = [span_line(spans[0], _dumps(dict(resource.attributes)))]
        lines.extend(map(span_line, spans[1:]))
        lines.append("")
        return self.write("\n".join(lines))

    def write(self, text: str) -> SpanExportResult:
        """Append already formatted lines (the tracer's fast path); rotate when full."""
        with self._lock:
            if self._file is None:
                return SpanExportResult.FAILURE
            self._file.write(text)
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


def encode_otlp(spans: Sequence[SpanData], resource: Resource, scope: InstrumentationScope) -> Any:
    """An OTLP ExportTraceServiceRequest of spans sharing one resource and scope.

    Does what the SDK's `encode_spans` does for the fields batchwire sets, at a fraction of
    its cost (the SDK spends ~30 µs per span here on generic attribute handling).
    """
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.schema_url = resource.schema_url
    _set_attributes(resource_spans.resource.attributes, resource.attributes)
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = scope.name
    scope_spans.scope.version = scope.version or ""
    # NOTE: spans are encoded by hand (`_span_bytes`) and parsed in C in one go: building
    # them field by field through the message API cost ~3 µs per span.
    encoded = [_span_bytes(span) for span in spans]
    scope_spans.MergeFromString(
        b"".join(b"\x12" + _varint(len(body)) + body for body in encoded)  # spans (2)
    )
    return request


_OTLP_ATTRIBUTES: dict[str, bytes] = {}
"""Attribute set (as JSON) -> a serialized Span holding just those attributes."""
_OTLP_NAMES: dict[str, bytes] = {}
"""Span name -> its encoded `name` field."""
_STATUS_ERROR: Final = b"\x7a\x02\x18\x02"  # status (15) { code (3): STATUS_CODE_ERROR }
_FLAGS_FIELD: Final = b"\x85\x01"  # flags (16), fixed32
_PACK_TIMES: Final = struct.Struct("<BQBQ").pack  # start (7) and end (8), fixed64
_LINK_FLAGS: Final = b"\x35" + (0x100).to_bytes(4, "little")  # Link.flags (6), fixed32
_SAMPLES_KEY: Final = (
    b"\x0a" + bytes([len(S.REQUEST_SAMPLES)]) + S.REQUEST_SAMPLES.encode()
)  # KeyValue.key (1)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _otlp_attributes(span: SpanData) -> bytes:
    """The span's attributes as encoded `attributes` (9) fields, cached per attribute set
    (a model's server spans share theirs)."""
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

    key = span.attributes_json or _dumps(span.attributes)
    encoded = _OTLP_ATTRIBUTES.get(key)
    if encoded is None:
        if len(_OTLP_ATTRIBUTES) >= _ATTRIBUTE_CACHE_SIZE:
            _OTLP_ATTRIBUTES.clear()
        holder = PbSpan()
        _set_attributes(holder.attributes, span.attributes)
        encoded = _OTLP_ATTRIBUTES[key] = holder.SerializeToString()
    return encoded


def _span_bytes(span: SpanData) -> bytes:
    """An OTLP `Span` in protobuf wire format: the fields batchwire sets, as the SDK's
    `encode_spans` sets them (a test compares the two)."""
    name = _OTLP_NAMES.get(span.name)
    if name is None:
        raw = span.name.encode()
        name = _OTLP_NAMES[span.name] = b"\x2a" + _varint(len(raw)) + raw
    parts = [
        b"\x0a\x10",
        span.trace_id.to_bytes(16, "big"),
        b"\x12\x08",
        span.span_id.to_bytes(8, "big"),
    ]
    if span.parent_span_id:
        parts += (b"\x22\x08", span.parent_span_id.to_bytes(8, "big"))
    parts += (
        name,
        b"\x30\x02" if span.server else b"\x30\x01",  # kind (6): SERVER / INTERNAL
        _PACK_TIMES(0x39, span.start_ns, 0x41, span.end_ns),
    )
    if span.attributes:
        parts.append(_otlp_attributes(span))
    for trace_id, span_id, samples in span.links:
        link = _link_bytes(trace_id, span_id, samples)
        parts += (b"\x6a", _varint(len(link)), link)  # links (13)
    if span.error:
        parts.append(_STATUS_ERROR)
    parts += (_FLAGS_FIELD, (0x300 if span.parent_remote else 0x100).to_bytes(4, "little"))
    return b"".join(parts)


def _link_bytes(trace_id: int, span_id: int, samples: int) -> bytes:
    """An OTLP `Span.Link` to a member request's span, with its sample count."""
    value = b"\x18" + _varint(samples)  # AnyValue { int_value (3) }
    attribute = _SAMPLES_KEY + b"\x12" + _varint(len(value)) + value  # KeyValue { key, value }
    return b"".join(
        (
            b"\x0a\x10", trace_id.to_bytes(16, "big"),  # trace_id (1)
            b"\x12\x08", span_id.to_bytes(8, "big"),  # span_id (2)
            b"\x22", _varint(len(attribute)), attribute,  # attributes (4)
            _LINK_FLAGS,  # flags (6): the linked context is local, as the SDK says
        )
    )  # fmt: skip


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

        class _Exporter(OTLPSpanExporter, SpanDataExporter):
            """The SDK's OTLP/gRPC exporter (channel, retries, back-off) sending requests
            that `encode_otlp` built."""

            def export_data(
                self, spans: Sequence[SpanData], resource: Resource, scope: InstrumentationScope
            ) -> SpanExportResult:
                if not spans:
                    return SpanExportResult.SUCCESS
                return self._export(encode_otlp(spans, resource, scope))

            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                return SpanDataExporter.export(self, spans)

            def _translate_data(self, data: Any) -> Any:
                return data  # already an ExportTraceServiceRequest

            def _count_data(self, data: Any) -> int:
                return sum(len(s.spans) for r in data.resource_spans for s in r.scope_spans)

        insecure = endpoint.startswith("http://") or "://" not in endpoint
        logger.info("exporting spans to OTLP/gRPC %s", endpoint)
        return _Exporter(endpoint=endpoint, insecure=insecure)
    logger.info("writing spans to %s", settings.trace_file)
    return JsonLinesSpanExporter(settings.trace_file, settings.max_file_bytes)
