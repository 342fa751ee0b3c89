"""OpenTelemetry traces of every request, recorded off the hot path.

Why not `tracer.start_span` per request: the SDK's `_Span` costs 25-30 µs to start and end
here, and a request has four spans, which would cost more than the whole request does on
a small model. Instead the event loop appends one compact record per request (ids, monotonic
timestamps, attributes: under 1 µs; a CPU-lane request's is packed into one `bytes`, its
strings as a code and its ids drawn by the shipper) and the engine threads one per batch; a
shipper thread turns them, every `flush_interval_s`, straight into what the exporter sends:
JSON lines for the local file, protobuf wire format for OTLP/gRPC (in requests of at most about
`OTLP_PAYLOAD_BYTES`). It takes the records `SHIP_CHUNK` at a time (packed ones
`_PACKED_CHUNK`) and encodes the sampled
requests (gathered until there are `SHIP_CHUNK`) a request shape (method, model, status,
which child spans...) at a time: a shape compiles once to a fixed-width row of bytes
(`span_rows`), and the ids, times and request ids of all its requests are converted and
filled in with a few numpy calls. A request with four spans costs about 1-3 µs so with hot
caches (BENCHMARKS.md, "Monitoring overhead"), where one `%` format per request cost 6 µs,
one `struct` pack 4.5 µs and building SDK `ReadableSpan`s and converting them 50 µs.
`RequestSpanProcessor`s (the SLO monitor's) get the requests' fields in bulk without any
span object; other SDK span processors and exporters still work, and get `ReadableSpan`s
built for them, one record at a time.

Where the encoding runs (`TracingSettings.shipper`): by default the shipper thread only takes
the records, feeds the `RequestSpanProcessor`s and hands the sampled ones (packed rows,
tuples) to a child process at the lowest CPU priority, `monitoring/ship_process.py`, which
runs this same encoding and exporting (`export_packed`, `export_records`): encoding in the
server's thread holds the GIL the event loop needs, about 4 more points of mlp64's
throughput at 100% sampling (BENCHMARKS.md, "Eleventh session"). A tracer given its own
exporter, or SDK span processors, encodes in its thread; so does one whose shipper process
died (logged).

Sampling: a request continuing an incoming W3C `traceparent` follows the parent's sampled
flag; otherwise a trace-id ratio (like `TraceIdRatioBased`) decides. Every request reaches
the span processors, so the SLO monitor's sees all traffic while the exporters see only the
sampled share: an unsampled one as its fields, handed by the front door to the
`RequestSpanProcessor`s as it ends (no record), or, when SDK span processors are plugged
in, as a server span with the sampled flag off (as `RECORD_ONLY` spans are) built from its
record. Child, batch and engine spans exist only for sampled requests. See
`monitoring/spans.py` for names and attributes.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import random
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import IO, Any, Final, NamedTuple, TypeVar, cast

import numpy as np
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
from monitoring.ship_process import SHIPPERS, ShipperProcess, ShipperProcessError
from monitoring.span_rows import (
    EPOCH_NS_RANGE,
    RowBuffer,
    RowLayout,
    be64,
    hex_digits,
    int_bytes,
    le64,
    percent_layout,
    struct_layout,
    text_bytes,
    time_digits,
)

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

_V = TypeVar("_V")
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
    shipper: str = "process"
    """Where spans are encoded and exported: `process` (a child process,
    `monitoring/ship_process.py`: the server's shipper thread only hands the sampled
    records over, and the encoding does not hold the event loop's GIL) or `thread` (the
    shipper thread itself). A tracer given its own exporter or SDK span processors other
    than `RequestSpanProcessor`s ships in its thread."""


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
        """One finished request: its model, gRPC status name and server-side duration.

        NOTE: called for unsampled requests by whichever thread ends them (the event loop,
        as they end): keep it cheap and thread-safe."""
        raise NotImplementedError

    def on_requests_end(
        self, models: Sequence[str], statuses: Sequence[str], durations_ns: Sequence[int]
    ) -> None:
        """Finished requests, in order (the tracer's fast paths hand them over a chunk at
        a time): `on_request_end` of each unless overridden."""
        for model, status, duration_ns in zip(models, statuses, durations_ns, strict=True):
            self.on_request_end(model, status, duration_ns)

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


class OtlpPayloadExporter(SpanDataExporter):
    """An exporter that also sends ready-encoded OTLP requests (the tracer's OTLP path:
    spans go from records straight to protobuf wire format, `RequestTracer._request_otlp`)."""

    def export_payload(self, payload: bytes, spans: int) -> SpanExportResult:
        """Send one serialized ExportTraceServiceRequest holding `spans` spans."""
        raise NotImplementedError

    def export_data(
        self, spans: Sequence[SpanData], resource: Resource, scope: InstrumentationScope
    ) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        payload = otlp_payload(otlp_head(resource, scope), list(map(_span_bytes, spans)))
        return self.export_payload(payload, len(spans))


#: The size past which the tracer starts a new OTLP export request (a collector accepts
#: 4 MiB by default; a backlog of records must not become one oversized request).
OTLP_PAYLOAD_BYTES = 1 << 20

#: Records the fast paths take at once (`_drain_chunks`); sampled requests are gathered
#: and encoded `SHIP_CHUNK` or more at a time (`span_rows`: a call costs ~100 µs whatever
#: its size, then 1.5-3 µs a request), and the GIL is handed over (`_hand_over_gil`)
#: between chunks: during a flush of 2,000 requests the event loop waited at most
#: 0.46-0.58 ms for it (`python -m loadtests.shipping_stall`). The file gets one write per
#: encoded chunk (its first line carries the resource).
SHIP_CHUNK: Final = 256

#: The general path (SDK span processors or exporters) hands the GIL over after this many
#: records (20-400 µs of building spans). While a thread holds the GIL, the event loop,
#: coming back from a wait that released it (epoll), waits until that thread lets go: up
#: to the switch interval, 5 ms (`python -m loadtests.shipping_stall`; BENCHMARKS.md,
#: "Monitoring overhead").
SHIP_YIELD_EVERY: Final = 32


def _hand_over_gil() -> None:
    """Let a thread waiting for the GIL (the event loop) have it now (between chunks)."""
    time.sleep(0)


#: Distinct attribute sets cached per tracer (server spans) before the cache starts over.
_ATTRIBUTE_CACHE_SIZE: Final = 4096

# Record layouts (plain tuples: the cheapest thing to build on the event loop).
_REQUEST: Final = 0
_BATCH: Final = 1
_RequestRecord = tuple[
    int, int, int, int, bool, str, str, str, str, int, str, str,
    int, int, int, int, int, int, int, int,
]  # fmt: skip
"""_REQUEST, trace id, span id, parent span id (0 = none), sampled, method, model, version,
lane, samples, request id, status, then monotonic ns (0 = that phase did not happen):
start, decoded, queued, compute start, compute end, then the lane's batch size, then
encode start, end.

NOTE: ints and strings only, no `TraceHandle` or `RequestTiming`: the cycle collector
stops tracking such a tuple at its first pass, so the records waiting for the shipper
(a flush interval's worth) add nothing to the collections that follow."""
# A CPU-lane request (`record_request`) is packed into one `bytes` (no Python object per
# field: the loop builds one object, the shipper reads a chunk of them as one numpy array
# and frees one object each): flags, the code of its (method, model, version, lane,
# status), samples, the trace id (high and low 64 bits) and the parent span id when it
# continues a `traceparent` (else 0: the shipper draws the ids), then the monotonic times
# start, decoded, compute start, compute end, encode start, end (0 = did not happen).
# NOTE: native byte order and alignment, and the 64-bit fields as C `long` where that is 64
# bits: CPython 3.11 converts an int of more than 30 bits (a monotonic time) to `long` with
# a short loop, but to `long long` (`q`, also `<q`) through its generic byte-array
# routine: 250 -> 150 ns a pack (BENCHMARKS.md, "Eighth session").
_PACK_STRUCT: Final = struct.Struct(
    "@BxHILLLllllll" if struct.calcsize("@l") == 8 else "@BxHIQQQqqqqqq"
)
_PACK: Final = _PACK_STRUCT.pack
_PACKED_FIELDS: Final = (
    ("flags", "u1"), ("code", "=u2"), ("samples", "=u4"), ("trace_hi", "=u8"),
    ("trace_lo", "=u8"), ("parent", "=u8"), ("start", "=i8"), ("decoded", "=i8"),
    ("compute_start", "=i8"), ("compute_end", "=i8"), ("encode_start", "=i8"), ("end", "=i8"),
)  # fmt: skip
_PACKED_DTYPE: Final = np.dtype(
    {
        "names": [name for name, _ in _PACKED_FIELDS],
        "formats": [code for _, code in _PACKED_FIELDS],
        "offsets": [0, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 72],
        "itemsize": 80,
    }
)
assert _PACK_STRUCT.size == _PACKED_DTYPE.itemsize
_P_SAMPLED: Final = 1
_P_PARENT: Final = 2
"""It continues an incoming `traceparent`: trace id and parent span id given."""
_P_REQUEST_ID: Final = 4
"""Its request id is the next one in `RequestTracer._request_ids`."""
_MAX_CODES: Final = 4096
"""Distinct (method, model, version, lane, status) packed; past them, tuple records."""
_PACKED_CHUNK: Final = 1024
"""Packed records the shipper takes and encodes at once (no Python work per record but a
`popleft`, so a chunk's cost is mostly numpy calls of fixed cost: a larger chunk than
`SHIP_CHUNK` shares them among more requests; the rows go to memory reused from chunk to
chunk, `RowBuffer`). The GIL still changes hands around each numpy call: the event loop
waited at most 0.2-0.4 ms for it during a flush of 2,000 (`python -m
loadtests.shipping_stall`)."""
_random: Final = random.random

_PackedChunks = Iterable[tuple[list[Any], Callable[[int], Any]]]
"""Sampled packed records a chunk at a time, as `_drain_packed` yields them."""
_RecordChunks = Iterable[tuple[list[Any], list[Any]]]
"""Sampled request records and batch records a chunk at a time (`_drain_chunks`)."""
_Phase = tuple[str, int, int, bool, dict[str, str | int], str]
"""A request's child span: name, start, end (monotonic ns), error, attributes, their JSON."""
_NO_ATTRIBUTES: Final[dict[str, str | int]] = {}
"""The attributes of decode, queue and encode spans (shared: nothing may modify it)."""


# A request's shape (`_phase_times`): which child spans it has, as bits, and on the CPU
# lane its batch size (the engine span's attribute) above them.
_DECODED: Final = 1
_QUEUED: Final = 2
_QUEUE_LEFT: Final = 4
"""Queued but never reached an engine: the queue span ends with the request, as an error."""
_ENGINE: Final = 8
_ENCODED: Final = 16
_SAMPLES_SHIFT: Final = 5
_SHAPE_BITS: Final = (1 << _SAMPLES_SHIFT) - 1


def _phase_rows(shape: int) -> tuple[tuple[int, int], ...]:
    """The child spans' (start, end) as rows of `_encode_requests`'s times (start 0,
    decoded 1, queued 2, compute start 3, compute end 4, encode 6, end 7), as
    `_phase_times` picks them."""
    pairs: list[tuple[int, int]] = []
    if shape & _DECODED:
        pairs.append((0, 1))
    if shape & _QUEUED:
        pairs.append((2, 3))
    elif shape & _QUEUE_LEFT:
        pairs.append((2, 7))
    elif shape & _ENGINE:
        pairs.append((3, 4))
    if shape & _ENCODED:
        pairs.append((6, 7))
    return tuple(pairs)


_PHASE_TIMES: Final = tuple(_phase_rows(shape) for shape in range(_SHAPE_BITS + 1))
"""Shape bits (`& _SHAPE_BITS`) -> `_phase_rows`."""
_MODEL: Final = operator.itemgetter(6)
_STATUS: Final = operator.itemgetter(11)
_START: Final = operator.itemgetter(12)
_END: Final = operator.itemgetter(19)
_SAMPLED_FLAG: Final = operator.itemgetter(4)


class _Rows(NamedTuple):
    """Encoded spans of requests of one shape: rows of `row_bytes`, `spans_per_row` each."""

    data: bytes | memoryview
    """The rows (a memoryview of `RowLayout.fill`'s array, format `B`)."""
    row_bytes: int
    spans_per_row: int

    @property
    def spans(self) -> int:
        return len(self.data) // self.row_bytes * self.spans_per_row


def _phase_times(record: _RequestRecord) -> tuple[int, list[int]]:
    """A sampled request's shape (the `_DECODED`... bits) and its child spans' times
    (start, end, start, end... monotonic ns), in order: decode, then queue (batched lane)
    or engine (CPU lane), then encode; each only if that phase happened."""
    (*_, lane, _, _, _, start_ns, decoded_ns, queued_ns, compute_start_ns, compute_end_ns,
     batch_samples, encode_start_ns, end_ns) = record  # fmt: skip
    shape = 0
    times: list[int] = []
    if decoded_ns:
        shape = _DECODED
        times += (start_ns, decoded_ns)
    if queued_ns:
        # NOTE: a request that never reached an engine (its deadline passed in the queue,
        # or its caller left) waited until the request ended: an error span.
        if compute_start_ns:
            shape |= _QUEUED
            times += (queued_ns, compute_start_ns)
        else:
            shape |= _QUEUE_LEFT
            times += (queued_ns, end_ns)
    elif compute_start_ns and lane == "cpu":
        shape |= _ENGINE | batch_samples << _SAMPLES_SHIFT
        times += (compute_start_ns, compute_end_ns)
    if encode_start_ns:
        shape |= _ENCODED
        times += (encode_start_ns, end_ns)
    return shape, times


def _code_column(table: np.ndarray, codes: np.ndarray, field: int) -> list[Any]:
    """One field of packed records' codes (`RequestTracer._codes_table`) as a list: the
    same object `len(codes)` times when they share one code (the usual chunk: one model,
    all OK), with no gather of Python objects."""
    first = int(codes[0])
    if (codes == first).all():
        return [table[first, field]] * len(codes)
    return table[codes, field].tolist()  # type: ignore[no-any-return]


def _payload_pieces(
    encoded: Sequence[_Rows],
) -> Iterator[tuple[list[bytes | memoryview], int]]:
    """One chunk's encoded rows cut into OTLP payloads of about `OTLP_PAYLOAD_BYTES`, a
    group split at row (request) boundaries: each payload's span entries and span count,
    the last with what is left of the chunk."""
    entries: list[bytes | memoryview] = []
    size = spans = 0
    for rows in encoded:
        start = 0
        while start < len(rows.data):
            take = max(1, (OTLP_PAYLOAD_BYTES - size) // rows.row_bytes) * rows.row_bytes
            piece = rows.data[start : start + take]
            start += len(piece)
            entries.append(piece)
            size += len(piece)
            spans += len(piece) // rows.row_bytes * rows.spans_per_row
            if size >= OTLP_PAYLOAD_BYTES:
                yield entries, spans
                entries, size, spans = [], 0, 0
    if entries:
        yield entries, spans


def _remember(cache: dict[Any, _V], key: Any, value: _V) -> _V:
    """`cache[key] = value`, starting the cache over once it holds `_ATTRIBUTE_CACHE_SIZE`
    entries (attribute sets and request shapes are few; a flood of distinct ones must not
    grow memory); returns `value`."""
    if len(cache) >= _ATTRIBUTE_CACHE_SIZE:
        cache.clear()
    cache[key] = value
    return value


def monotonic_to_epoch_offset_ns() -> int:
    """`time.time_ns() - time.monotonic_ns()`, read back to back (converts span times)."""
    return time.time_ns() - time.monotonic_ns()


_KEY: Final = operator.itemgetter(0)
"""A metadata entry's key. NOTE: `"traceparent" in map(_KEY, metadata)` scans the
metadata in C: `_parent` (a Python frame and loop) runs only when there is one to read;
most calls carry none but a `user-agent` entry."""


def _parent(metadata: Sequence[tuple[str, str | bytes]]) -> tuple[int, int, bool] | None:
    """The trace id, span id and sampled flag of a valid incoming W3C `traceparent`."""
    for key, value in metadata:
        if key == "traceparent" and isinstance(value, str):
            parent = get_current_span(
                _PROPAGATOR.extract({"traceparent": value}, getter=_GETTER)
            ).get_span_context()
            if parent.is_valid:
                return parent.trace_id, parent.span_id, parent.trace_flags.sampled
            return None
    return None


class RequestTracer:
    """Records requests and batches on the hot path; a thread ships them as SDK spans.

    Args:
        settings: sampling and export settings.
        processors: SDK span processors that see every server span and every sampled
            child/batch span (`on_end` only), e.g. the SLO monitor's.
        exporter: receives the sampled spans (None = build one from `settings`, in the
            shipper process unless `settings.shipper` is `thread`).
        resource: the spans' resource (None = service name and version).
        offset_ns: `monotonic_to_epoch_offset_ns()` to date spans with (None = read now;
            the shipper process gets its server's).
        ship_thread: start the shipper thread (False: the owner calls `flush`, or the
            `export_*` methods as the shipper process does).
    """

    def __init__(
        self,
        settings: TracingSettings,
        *,
        processors: Sequence[SpanProcessor] = (),
        exporter: SpanExporter | None = None,
        resource: Resource | None = None,
        offset_ns: int | None = None,
        ship_thread: bool = True,
    ) -> None:
        if not 0.0 <= settings.sampling_ratio <= 1.0:
            raise ValueError(f"sampling ratio {settings.sampling_ratio} is outside 0..1")
        if settings.shipper not in SHIPPERS:
            raise ValueError(f"shipper {settings.shipper!r} is not one of {SHIPPERS}")
        self.settings = settings
        self.processors = list(processors)
        self._attribute_cache: dict[tuple[object, ...], tuple[dict[str, str | int], str]] = {}
        self._lane_engine_cache: dict[int, tuple[dict[str, str | int], str]] = {}
        self._line_layouts: dict[tuple[object, ...], tuple[str, int]] = {}
        self._otlp_layouts: dict[tuple[object, ...], _OtlpLayout] = {}
        self._line_rows: dict[tuple[object, ...], tuple[RowLayout, int]] = {}
        self._row_buffer = RowBuffer()
        """The shipper's encoded rows (under the ship lock): one chunk's at a time."""
        self._fast_processors = [p for p in self.processors if isinstance(p, RequestSpanProcessor)]
        self._generic_processors = [
            p for p in self.processors if not isinstance(p, RequestSpanProcessor)
        ]
        self._unsampled_direct = not self._generic_processors
        """Unsampled requests skip the records: the front door hands their fields to the
        `RequestSpanProcessor`s itself (at 10% sampling a record per request cost as
        much as at 100%: BENCHMARKS.md, "Eleventh session")."""
        self.resource = resource or Resource.create(
            {
                "service.name": settings.service_name
                or os.environ.get("OTEL_SERVICE_NAME", "batchwire"),
                "service.version": batchwire.__version__,
            }
        )
        # NOTE: read once: spans of one server share one clock mapping, so a child never
        # lands outside its parent because the two were shipped at different times.
        self._offset_ns = monotonic_to_epoch_offset_ns() if offset_ns is None else offset_ns
        self._child: ShipperProcess | None = None
        """The shipper process (None: this process encodes and exports)."""
        self._codes_sent = 0
        """Packed records' codes the shipper process has been told."""
        self.exporter: SpanExporter | None = exporter
        """Where sampled spans go (None: the shipper process's, or not built yet)."""
        if exporter is None:
            if settings.shipper == "process" and not self._generic_processors:
                check_destination(settings)
                self._child = self._start_child()
            if self._child is None:
                self.exporter = build_exporter(settings)
        self._resource_json = _dumps(dict(self.resource.attributes))
        self._otlp_head: OtlpHead | None = None
        self.scope = InstrumentationScope(S.SCOPE, batchwire.__version__)
        self._bound = round(settings.sampling_ratio * (1 << 64))
        self._records: deque[tuple[object, ...]] = deque()
        self._packed: deque[bytes] = deque()
        """`record_request`'s records (`_PACK`), each appended in one call."""
        self._request_ids: deque[str] = deque()
        """The request ids of packed records that have one, appended before the record."""
        self._codes: dict[tuple[str, str, str, str, str], int] = {}
        self._code_fields: list[tuple[str, str, str, str, str]] = []
        """Code -> (method, model, version, lane, status) of packed records."""
        self._code_lock = threading.Lock()
        self._code_table = np.empty((0, 5), object)
        self._ratio = settings.sampling_ratio
        self._all_sampled = self._ratio >= 1.0
        """Every request without a `traceparent` is sampled: no draw needed."""
        self._rng = np.random.default_rng()
        """Draws the ids of packed records and of encoded child spans (the shipper's, under
        the ship lock)."""
        self._max = settings.max_buffered
        self.dropped = 0
        """Records dropped because the shipper fell behind."""
        self.exported_spans = 0
        self._wake = threading.Event()
        self._ship_lock = threading.Lock()
        """Held while shipping: one shipment at a time (thread and `flush`)."""
        self._stopping = False
        self._thread: threading.Thread | None = None
        if ship_thread:
            self._thread = threading.Thread(
                target=self._ship_loop, name="trace-shipper", daemon=True
            )
            self._thread.start()

    def _start_child(self) -> ShipperProcess | None:
        """The shipper process, started; None (logged) when it cannot be."""
        try:
            return ShipperProcess.start(
                self.settings, dict(self.resource.attributes), self.resource.schema_url,
                self._offset_ns,
            )  # fmt: skip
        except (OSError, ShipperProcessError) as exc:
            logger.error("cannot start the trace shipper process (%s): shipping in-process", exc)
            return None

    @property
    def shipper_pid(self) -> int | None:
        """The shipper process's PID (None: spans are encoded in this process)."""
        return self._child.pid if self._child is not None else None

    def shipper_cpu_s(self) -> float:
        """CPU seconds the shipper process has used (0.0 without one)."""
        return self._child.cpu_s() if self._child is not None else 0.0

    # ------------------------------------------------------------ hot path (event loop)
    def begin(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> TraceHandle:
        """Ids and the sampling decision for a new server span (continuing `traceparent`)."""
        parent = _parent(metadata) if metadata and "traceparent" in map(_KEY, metadata) else None
        if parent is not None:
            return TraceHandle(parent[0], random.getrandbits(64), parent[1], parent[2])
        trace_id = random.getrandbits(128)
        return TraceHandle(
            trace_id, random.getrandbits(64), 0, (trace_id & _RATIO_MASK) < self._bound
        )

    def record_request(
        self,
        metadata: Sequence[tuple[str, str | bytes]] | None,
        method: str,
        model: str,
        version: str,
        lane: str,
        samples: int,
        request_id: str,
        status: str,
        start_ns: int,
        decoded_ns: int,
        compute_start_ns: int,
        compute_end_ns: int,
        encode_start_ns: int,
        end_ns: int,
    ) -> None:
        """`end_request(begin(metadata), ...)` of a CPU-lane request (never queued, a batch
        of its own `samples`), in one call and with no `TraceHandle` or `RequestTiming`:
        for a request that nothing needed its ids for while it ran (no batch links to it).
        Monotonic times; 0 = that phase did not happen.

        The record is packed (`_PACK`): one `bytes`, its strings as one code; the shipper
        draws its ids (unless it continues a `traceparent`), the trace id consistent with
        the sampling decision taken here (the same ratio `begin` applies to the trace id:
        its low 64 bits are below the ratio's bound exactly when sampled).
        """
        parent = _parent(metadata) if metadata and "traceparent" in map(_KEY, metadata) else None
        sampled = (self._all_sampled or _random() < self._ratio) if parent is None else parent[2]
        if not sampled and self._unsampled_direct:
            for processor in self._fast_processors:
                processor.on_request_end(model, status, end_ns - start_ns)
            return
        packed = self._packed
        if len(packed) >= self._max:
            self.dropped += 1
            return
        code = self._codes.get((method, model, version, lane, status))
        if code is None:
            code = self._new_code((method, model, version, lane, status))
            if code is None:  # too many distinct ones: the tuple record (the general way)
                # NOTE: `begin` draws the sampling decision again: past `_MAX_CODES` distinct
                # keys, requests of a new key are sampled at about ratio² (rare; kept simple).
                timing = RequestTiming(
                    compute_start_ns=compute_start_ns, compute_end_ns=compute_end_ns,
                    batch_samples=samples if compute_start_ns else 0,
                    batch_requests=1 if compute_start_ns else 0,
                )  # fmt: skip
                self.end_request(
                    self.begin(metadata), method, model, version, lane, samples, request_id,
                    status, start_ns, decoded_ns, timing, encode_start_ns, end_ns,
                )  # fmt: skip
                return
        flags = _P_SAMPLED if sampled else 0
        if parent is None:
            trace_hi = trace_lo = parent_id = 0
        else:
            trace_id, parent_id, _ = parent
            flags |= _P_PARENT
            trace_hi, trace_lo = trace_id >> 64, trace_id & _RATIO_MASK
        if request_id:
            flags |= _P_REQUEST_ID
            self._request_ids.append(request_id)  # NOTE: before its record (`_drain_packed`)
        packed.append(
            _PACK(
                flags, code, samples, trace_hi, trace_lo, parent_id, start_ns, decoded_ns,
                compute_start_ns, compute_end_ns, encode_start_ns, end_ns,
            )
        )  # fmt: skip

    def _new_code(self, key: tuple[str, str, str, str, str]) -> int | None:
        """The code of a new packed (method, model, version, lane, status); None when
        `_MAX_CODES` are taken (a flood of distinct model names must not grow memory)."""
        with self._code_lock:
            code = self._codes.get(key)
            if code is None:
                if len(self._code_fields) >= _MAX_CODES:
                    return None
                code = len(self._code_fields)
                self._code_fields.append(key)  # NOTE: before the code is handed out
                self._codes[key] = code
            return code

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
        """Record one finished request (monotonic times; 0 = that phase did not happen).

        An unsampled one, when no SDK span processor wants its span, only reaches the
        `RequestSpanProcessor`s, here and now (`record_request` likewise)."""
        if not handle.sampled and self._unsampled_direct:
            for processor in self._fast_processors:
                processor.on_request_end(model, status, end_ns - start_ns)
            return
        if len(self._records) >= self._max:
            self.dropped += 1
            return
        if timing is None:
            queued_ns = compute_start_ns = compute_end_ns = batch_samples = 0
        else:
            queued_ns, compute_start_ns, compute_end_ns, batch_samples = (
                timing.queued_ns, timing.compute_start_ns, timing.compute_end_ns,
                timing.batch_samples,
            )  # fmt: skip
        self._records.append(
            (
                _REQUEST, handle.trace_id, handle.span_id, handle.parent_span_id, handle.sampled,
                method, model, version, lane, samples, request_id, status, start_ns, decoded_ns,
                queued_ns, compute_start_ns, compute_end_ns, batch_samples, encode_start_ns,
                end_ns,
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
        """Ship everything recorded so far now (blocks until exported, including what the
        shipper thread had already taken): `_ship` under the ship lock, the one way in
        for the thread, `shutdown` and callers alike."""
        with self._ship_lock:
            self._ship()

    def shutdown(self) -> None:
        """Ship what is left, stop the thread (and the shipper process), shut the exporter
        and processors down."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
        self.flush()
        with self._ship_lock:
            if self._child is not None:
                self._child.close()
                self._child = None
        if self.exporter is not None:
            self.exporter.shutdown()
        for processor in self.processors:
            processor.shutdown()

    def _ship_loop(self) -> None:
        interval = self.settings.flush_interval_s
        while not self._stopping:
            self._wake.wait(interval)
            try:
                self.flush()
            except Exception:  # a broken exporter must not kill the thread
                logger.exception("trace shipping failed")

    def _ship(self) -> None:
        records = self._records
        if not records and not self._packed:
            return
        if self._child is not None:
            self._ship_to_child(self._child)
            return
        exporter = self.exporter
        if exporter is None:  # the shipper process is gone
            exporter = self.exporter = build_exporter(self.settings)
        generic = self._generic_processors
        if not generic and self._ship_encoded(exporter, self._drain_packed(), self._drain_chunks()):
            return
        exported: list[SpanData] = []
        unpacked: list[Any] = self._packed_records()
        for i in range(len(unpacked) + len(records)):
            if i % SHIP_YIELD_EVERY == SHIP_YIELD_EVERY - 1:
                _hand_over_gil()
            record = unpacked[i] if i < len(unpacked) else records.popleft()
            if record[0] == _REQUEST:
                request = cast(_RequestRecord, record)
                self._feed_fast_processors(request)
                if not request[4] and not generic:  # not sampled
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

    def _ship_to_child(self, child: ShipperProcess) -> None:
        """`_ship` with a shipper process: every request reaches the fast processors
        here; the sampled ones and the batches go to the child, which encodes and exports
        them (`export_packed`, `export_records`); returns once it has."""
        try:
            for rows, request_ids, _ in self._drain_packed_rows():
                fields = self._code_fields
                known = len(fields)
                if known > self._codes_sent:  # (the chunk's codes are all among them)
                    child.send(("codes", fields[self._codes_sent : known]))
                    self._codes_sent = known
                child.send(("packed", rows.tobytes(), request_ids))
            for requests, batches in self._drain_chunks():
                if requests or batches:
                    child.send(("records", requests, batches))
            self.exported_spans += child.sync()
        except ShipperProcessError as exc:
            logger.error(
                "%s: shipping in-process from now on (spans it had not exported are lost)",
                exc,
            )
            child.kill()
            self._child = None  # `_ship` builds the exporter the next time it has records

    # ------------------------------------------------------------ shipper process
    def add_codes(self, fields: Sequence[tuple[str, str, str, str, str]]) -> None:
        """The shipper process: the next packed records' codes (in order)."""
        with self._code_lock:
            for key in fields:
                self._codes[key] = len(self._code_fields)
                self._code_fields.append(key)

    def export_packed(self, rows: bytes, request_ids: list[str]) -> None:
        """The shipper process: export sampled packed records (`_drain_packed_rows`)."""
        columns = self._packed_columns(
            np.frombuffer(rows, _PACKED_DTYPE), request_ids, self._codes_table()
        )
        self._export_received([columns], [])

    def export_records(self, requests: list[Any], batches: list[Any]) -> None:
        """The shipper process: export sampled request records and batch records."""
        self._export_received([], [(requests, batches)])

    def _export_received(
        self,
        packed: list[tuple[list[Any], Callable[[int], Any]]],
        chunks: list[tuple[list[Any], list[Any]]],
    ) -> None:
        with self._ship_lock:
            if not self._ship_encoded(self.exporter, packed, chunks):
                raise TypeError(f"the shipper process cannot export to {self.exporter!r}")

    def _ship_encoded(
        self, exporter: SpanExporter | None, packed: _PackedChunks, chunks: _RecordChunks
    ) -> bool:
        """Encode and export straight from the records (`_ship_lines`, `_ship_otlp`) when
        the exporter is one of batchwire's own; False (nothing taken) otherwise."""
        if isinstance(exporter, JsonLinesSpanExporter):
            self._ship_lines(exporter, packed, chunks)
            return True
        if isinstance(exporter, OtlpPayloadExporter):
            self._ship_otlp(exporter, packed, chunks)
            return True
        return False

    def _ship_lines(
        self, exporter: JsonLinesSpanExporter, packed: _PackedChunks, chunks: _RecordChunks
    ) -> None:
        """`_ship` for the JSON-lines file with no SDK processor: request records go
        straight to text, a chunk at a time (`_encode_columns`), with no `SpanData` in
        between; one write per chunk, whose first line carries the resource. `packed`
        and `chunks` as `_drain_packed` and `_drain_chunks` yield them."""
        # NOTE: each chunk is written before the next is encoded (into the same row buffer).
        for columns, record_of in packed:
            pieces, spans = self._request_pieces(columns, record_of)
            self._count_export(exporter.write_pieces(pieces), spans)
        for requests, batches in chunks:
            pieces, spans = [], 0
            resource_json = self._resource_json
            if requests:
                pieces, spans = self._request_pieces(
                    list(zip(*requests, strict=True)), requests.__getitem__
                )
                resource_json = "{}"
            for record in batches:
                batch = self._batch_spans(record)
                lines = [span_line(batch[0], resource_json), *map(span_line, batch[1:]), ""]
                pieces.append("\n".join(lines).encode())
                resource_json = "{}"
                spans += len(batch)
            if pieces:
                self._count_export(exporter.write_pieces(pieces), spans)

    def _request_pieces(
        self, columns: Sequence[Any], record: Callable[[int], Any]
    ) -> tuple[list[bytes | memoryview], int]:
        """Requests given as `_encode_columns` takes them, as JSON lines to write (the
        first carrying the resource), and their span count."""
        text, spans = self._request_lines(record(0), self._resource_json)
        pieces: list[bytes | memoryview] = [text.encode() + b"\n"]
        rest = [column[1:] for column in columns]
        encoded = self._encode_columns(
            rest, lambda i: record(i + 1), otlp=False, buffer=self._row_buffer
        )
        for rows in encoded:
            pieces.append(rows.data)
            spans += rows.spans
        return pieces, spans

    def _ship_otlp(
        self, exporter: OtlpPayloadExporter, packed: _PackedChunks, chunks: _RecordChunks
    ) -> None:
        """`_ship` for OTLP with no SDK processor: request records go straight to encoded
        spans, a chunk at a time (`_encode_requests`), sent in payloads of at most about
        `OTLP_PAYLOAD_BYTES` (a payload ends between two requests, and at the end of a
        chunk: the next chunk's rows reuse its memory). `packed` and `chunks` as in
        `_ship_lines`."""
        head = self._otlp_head
        if head is None:
            head = self._otlp_head = otlp_head(self.resource, self.scope)
        for encoded in self._otlp_groups(packed, chunks):
            for entries, spans in _payload_pieces(encoded):
                payload = otlp_payload(head, entries)
                self._count_export(exporter.export_payload(payload, spans), spans)

    def _otlp_groups(self, packed: _PackedChunks, chunks: _RecordChunks) -> Iterator[list[_Rows]]:
        """`_ship_otlp`'s encoded requests and batches, a chunk at a time: a chunk's rows
        are in the row buffer until the next chunk is asked for."""
        buffer = self._row_buffer
        for columns, example in packed:
            yield self._encode_columns(columns, example, otlp=True, buffer=buffer)
        for requests, batches in chunks:
            encoded = self._encode_requests(requests, otlp=True, buffer=buffer)
            for record in batches:
                batch = self._batch_spans(record)
                data = b"".join(map(_span_bytes, batch))
                encoded.append(_Rows(data, len(data), len(batch)))
            yield encoded

    def _drain_packed(
        self, general: bool = False
    ) -> Iterator[tuple[list[Any], Callable[[int], Any]]]:
        """`_drain_packed_rows`, each chunk as `_packed_columns`."""
        for rows, request_ids, table in self._drain_packed_rows(general):
            yield self._packed_columns(rows, request_ids, table)

    def _drain_packed_rows(
        self, general: bool = False
    ) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
        """Take every packed record so far, `_PACKED_CHUNK` at a time, handing the GIL
        over between chunks: each reaches the fast processors (in bulk); yields the
        sampled ones (rows of `_PACKED_DTYPE`, their request ids, the codes' table).
        `general`: all of them, and the caller feeds the processors (`_ship`'s general
        path).

        NOTE: request ids are appended before their records, so the ids of the records
        taken are all there, first in line (others may follow: records not taken yet)."""
        packed, ids_left = self._packed, self._request_ids
        left = len(packed)
        while left > 0:
            take = min(left, _PACKED_CHUNK)
            rows = np.frombuffer(b"".join([packed.popleft() for _ in range(take)]), _PACKED_DTYPE)
            left -= take
            flags = rows["flags"]
            with_id = np.flatnonzero(flags & _P_REQUEST_ID)
            request_ids: list[str] = [""] * take
            for i in with_id.tolist():
                request_ids[i] = ids_left.popleft()
            table = self._codes_table()
            codes = rows["code"]
            if self._fast_processors and not general:
                models, statuses = (_code_column(table, codes, i) for i in (1, 4))
                durations = (rows["end"] - rows["start"]).tolist()
                for processor in self._fast_processors:
                    processor.on_requests_end(models, statuses, durations)
            sampled = (flags & _P_SAMPLED) != 0
            if not general and not sampled.all():
                chosen = np.flatnonzero(sampled)
                rows = rows[chosen]
                request_ids = [request_ids[i] for i in chosen.tolist()]
            if len(rows):
                yield rows, request_ids, table
            if left > 0:
                _hand_over_gil()

    def _codes_table(self) -> np.ndarray:
        """Code -> (method, model, version, lane, status), as an object array (cached)."""
        fields = self._code_fields
        table = self._code_table
        if len(table) != len(fields):
            table = np.empty((len(fields), 5), object)
            table[:] = fields[: len(table)]
            self._code_table = table
        return table

    def _packed_columns(
        self, rows: np.ndarray, request_ids: list[str], table: np.ndarray
    ) -> tuple[list[Any], Callable[[int], Any]]:
        """Packed records as the columns of `_RequestRecord`s (`_encode_columns`), ids
        drawn, and a function of a row giving its record (a tuple of Python values)."""
        n = len(rows)
        flags = rows["flags"]
        sampled = (flags & _P_SAMPLED) != 0
        trace_hi, trace_lo = rows["trace_hi"].copy(), rows["trace_lo"].copy()
        new = (flags & _P_PARENT) == 0
        if new.any():
            rng, bound = self._rng, self._bound
            trace_hi[new] = rng.integers(0, 1 << 64, int(np.count_nonzero(new)), np.uint64)
            # The low 64 bits decide sampling (`begin`): below the bound exactly if sampled.
            for mask, low, high in (
                (new & sampled, 0, max(bound, 1)),
                (new & ~sampled, min(bound, (1 << 64) - 1), 1 << 64),
            ):
                count = int(np.count_nonzero(mask))
                if count:
                    trace_lo[mask] = rng.integers(low, high, count, np.uint64)
        span = self._rng.integers(0, 1 << 64, n, np.uint64)
        parent = rows["parent"]
        codes = rows["code"]
        fields = [_code_column(table, codes, i) for i in range(5)]
        samples = rows["samples"].astype(np.int64)
        first_samples = int(samples[0])
        samples_list = [first_samples] * n if (samples == first_samples).all() else samples.tolist()
        compute_start = rows["compute_start"]
        times = [
            rows["start"], rows["decoded"], np.zeros(n, np.int64), compute_start,
            rows["compute_end"], np.where(compute_start != 0, samples, 0), rows["encode_start"],
            rows["end"],
        ]  # fmt: skip
        traces = np.concatenate([be64(trace_hi), be64(trace_lo)], axis=1)
        columns: list[Any] = [
            (), traces, span, parent, sampled, *fields[:4], samples_list, request_ids,
            fields[4], *times,
        ]  # fmt: skip

        def record(i: int) -> _RequestRecord:
            return (
                _REQUEST, int(trace_hi[i]) << 64 | int(trace_lo[i]), int(span[i]),
                int(parent[i]), bool(sampled[i]), fields[0][i], fields[1][i], fields[2][i],
                fields[3][i], int(samples[i]), request_ids[i], fields[4][i],
                *[int(t[i]) for t in times],
            )  # fmt: skip

        return columns, record

    def _packed_records(self) -> list[_RequestRecord]:
        """Every packed record so far as a `_RequestRecord` (the general path: SDK
        processors see unsampled requests too)."""
        out: list[_RequestRecord] = []
        for columns, record in self._drain_packed(general=True):
            out += map(record, range(len(columns[2])))
        return out

    def _drain_chunks(self) -> Iterator[tuple[list[Any], list[Any]]]:
        """Take every record recorded so far, `SHIP_CHUNK` at a time, handing the GIL over
        between chunks: every request reaches the fast processors (in bulk, a chunk at a
        time); yields sampled requests, at least `SHIP_CHUNK` of them but for the last
        ones (encoding has a fixed cost per call: at a low sampling ratio a chunk holds a
        few), with the batches taken meanwhile (the fast paths).

        NOTE: typed `Any` (no `cast` calls: they cost a call per record here)."""
        records: deque[Any] = self._records
        left = len(records)
        sampled: list[Any] = []
        while left > 0:
            take = min(left, SHIP_CHUNK)
            chunk = [records.popleft() for _ in range(take)]
            left -= take
            requests = [r for r in chunk if r[0] == _REQUEST]
            batches = [r for r in chunk if r[0] != _REQUEST] if len(requests) < take else []
            if requests and self._fast_processors:
                models = list(map(_MODEL, requests))
                statuses = list(map(_STATUS, requests))
                durations = list(map(operator.sub, map(_END, requests), map(_START, requests)))
                for processor in self._fast_processors:
                    processor.on_requests_end(models, statuses, durations)
            if all(map(_SAMPLED_FLAG, requests)):
                sampled += requests
            else:
                sampled += [r for r in requests if r[4]]
            if len(sampled) >= SHIP_CHUNK or batches or not left:
                yield sampled, batches
                sampled = []
            if left > 0:
                _hand_over_gil()

    def _feed_fast_processors(self, record: _RequestRecord) -> None:
        """Every request, sampled or not, reaches the fast processors (the SLO monitor's)
        as its fields: model, status, duration."""
        for processor in self._fast_processors:
            processor.on_request_end(record[6], record[11], record[19] - record[12])

    def _encode_requests(
        self, records: Sequence[Any], otlp: bool, buffer: RowBuffer | None = None
    ) -> list[_Rows]:
        """Sampled requests' spans, encoded a request shape at a time (`span_rows`): OTLP
        `ScopeSpans.spans` entries, or JSON lines (each ending in a newline, the resource
        `{}`). Groups come out in the order of their first request; within one, requests
        keep their order. The same text or bytes as `_request_lines` / `_request_otlp` of
        each record, but for the child span ids, drawn here all at once (a test compares
        the two)."""
        if not records:
            return []
        columns = list(zip(*records, strict=True))
        return self._encode_columns(columns, records.__getitem__, otlp, buffer)

    def _encode_columns(
        self,
        columns: Sequence[Any],
        record: Callable[[int], Any],
        otlp: bool,
        buffer: RowBuffer | None = None,
    ) -> list[_Rows]:
        """`_encode_requests` of requests given as the columns of their records (tuples
        per field, or arrays: times, span and parent ids; the trace ids as an `(n, 16)`
        byte array or ints), `record(i)` giving the i-th record itself (one per group);
        the rows in memory from `buffer` if given (`RowLayout.fill`), which this call
        reuses from its start: the rows of its previous call there are then overwritten."""
        if buffer is not None:
            buffer.reset()
        n = len(columns[5])
        if not n:
            return []
        # start, decoded, queued, compute start, compute end, (batch samples), encode, end
        times = np.array(columns[12:20], np.int64)
        epoch = times + self._offset_ns
        epoch[5] = EPOCH_NS_RANGE[0]  # (not a time)
        if epoch.min() < EPOCH_NS_RANGE[0] or epoch.max() >= EPOCH_NS_RANGE[1]:
            # Not 19 digits (a clock that is not Unix time): one record at a time.
            one = self._request_otlp if otlp else self._request_text
            return [
                _Rows(data, len(data), count) for data, count in map(one, map(record, range(n)))
            ]
        epoch_u64 = epoch.astype(np.uint64)
        _, decoded, queued, compute_start, _, batch_samples, encode_start, _ = times
        shapes = np.where(decoded != 0, _DECODED, 0)
        queued_any = queued != 0
        shapes |= np.where(queued_any, np.where(compute_start != 0, _QUEUED, _QUEUE_LEFT), 0)
        lanes = columns[8]
        if lanes.count(lanes[0]) == n:  # one lane (`count` compares by identity first)
            on_lane = np.full(n, lanes[0] == "cpu")
        else:
            on_lane = np.fromiter(map("cpu".__eq__, lanes), bool, n)
        engine = ~queued_any & (compute_start != 0) & on_lane
        shapes |= np.where(engine, _ENGINE | (batch_samples << _SAMPLES_SHIFT), 0)
        shapes |= np.where(encode_start != 0, _ENCODED, 0)
        parents = np.array(columns[3], np.uint64)
        request_ids: list[str] | list[bytes] | None = None
        widths: Sequence[int] = [0] * n
        if any(columns[10]):
            request_ids = (
                list(map(str.encode, columns[10]))
                if otlp
                else [_dumps(i) if i else "" for i in columns[10]]
            )
            widths = list(map(len, request_ids))  # (JSON is ASCII: characters = bytes)
        key_columns: list[Sequence[Any]] = [
            columns[5], columns[6], columns[7], columns[8], columns[9], columns[11],
            shapes.tolist(), (parents != 0).tolist(), widths,
        ]  # fmt: skip
        groups: dict[tuple[Any, ...], int] = {}
        code_array: np.ndarray | None = None  # each request's group (None: all in one)
        if all(column.count(column[0]) == n for column in key_columns):
            # One shape (the usual case): no key per request (`count` compares by identity
            # first, a few ns a value).
            groups[tuple(column[0] for column in key_columns)] = 0
        else:
            codes = [groups.setdefault(key, len(groups)) for key in zip(*key_columns, strict=True)]
            code_array = np.array(codes) if len(groups) > 1 else None
        traces = columns[1] if isinstance(columns[1], np.ndarray) else int_bytes(columns[1], 16)
        span_ids = be64(np.array(columns[2], np.uint64))
        parent_ids = be64(parents)
        # NOTE: few numpy calls per group, each over all its requests: a call costs about
        # 1 µs whatever its size, and large ones run with the GIL released.
        scale = 1 if otlp else 2  # bytes per id byte: raw, or two hex digits
        out: list[_Rows] = []
        for key, code in groups.items():
            # The group's requests: all of them (no copies), or those of its code.
            index = None if code_array is None else np.flatnonzero(code_array == code)
            first = 0 if index is None else int(index[0])
            rows, spans_per_row = self._row_layout(key, record(first), otlp)
            pairs = _PHASE_TIMES[key[6] & _SHAPE_BITS]
            m, k = (n if index is None else len(index)), len(pairs)
            # Ids: trace (16 bytes), span (8), parent (8, if any), the k children's (8 each).
            id_parts = [traces, span_ids] if index is None else [traces[index], span_ids[index]]
            if key[7]:
                id_parts.append(parent_ids if index is None else parent_ids[index])
            if k:
                drawn = self._rng.integers(0, 1 << 64, m * k, np.uint64)
                id_parts.append(drawn.view(np.uint8).reshape(m, 8 * k))
            ids = np.concatenate(id_parts, axis=1)
            if not otlp:
                ids = hex_digits(ids)
            trace, span = ids[:, : 16 * scale], ids[:, 16 * scale : 24 * scale]
            # Times: each distinct one once (a CPU-lane request's 8 span times are 6).
            used = sorted({0, 7, *chain.from_iterable(pairs)})
            group_times = epoch_u64[used] if index is None else epoch_u64[np.ix_(used, index)]
            encoded = (le64 if otlp else time_digits)(group_times.reshape(-1))
            at = {row: encoded[i * m : (i + 1) * m] for i, row in enumerate(used)}
            values = [trace, span]
            if key[7]:
                values.append(ids[:, 24 * scale : 32 * scale])
            values += (at[0], at[7])
            if key[8]:
                assert request_ids is not None
                chosen: list[Any] = (
                    request_ids if index is None else [request_ids[i] for i in index.tolist()]
                )
                if otlp:  # UTF-8 bytes
                    values.append(np.frombuffer(b"".join(chosen), np.uint8).reshape(m, key[8]))
                else:  # JSON strings
                    values.append(text_bytes(chosen, key[8]))
            first_child = (32 if key[7] else 24) * scale
            for p, (begin, end) in enumerate(pairs):
                child = ids[:, first_child + 8 * scale * p : first_child + 8 * scale * (p + 1)]
                values += (trace, child, span, at[begin], at[end])
            filled = rows.fill(values, buffer=buffer)
            data = memoryview(filled.reshape(-1))  # type: ignore[arg-type]
            out.append(_Rows(data, len(rows.template), spans_per_row))
        return out

    def _request_text(self, record: _RequestRecord) -> tuple[bytes, int]:
        """`_request_lines` with no resource, as UTF-8 with a final newline."""
        text, count = self._request_lines(record, "{}")
        return text.encode() + b"\n", count

    def _row_layout(
        self, key: tuple[Any, ...], record: _RequestRecord, otlp: bool
    ) -> tuple[RowLayout, int]:
        """The row layout of a group of `_encode_requests` and its spans per row (cached
        by the group's `key`)."""
        (method, model, version, lane, samples, status, shape, parent, width) = key
        if otlp:
            otlp_key = (method, model, version, lane, samples, status, parent, width, shape)
            layout = self._otlp_layouts.get(otlp_key)
            if layout is None:
                layout = self._otlp_layout(otlp_key, record, shape)
            return layout.rows, layout.spans
        found = self._line_rows.get(key)
        if found is None:
            line_key = (method, model, version, lane, samples, status, parent, bool(width),
                        shape, "{}")  # fmt: skip
            template, count = self._line_layouts.get(line_key) or self._line_layout(
                line_key, record, shape, "{}"
            )
            phases = len(_PHASE_TIMES[shape & _SHAPE_BITS])
            widths = [32, 16, *([16] if parent else []), 19, 19, *([width] if width else [])]
            widths += [32, 16, 16, 19, 19] * phases
            found = _remember(
                self._line_rows, key, (percent_layout(template, widths, b"\n"), count)
            )
        return found

    def _count_export(self, result: SpanExportResult, spans: int) -> None:
        if result is SpanExportResult.SUCCESS:
            self.exported_spans += spans
        else:
            logger.warning("exporting %d spans failed", spans)

    def _request_lines(self, record: _RequestRecord, resource_json: str) -> tuple[str, int]:
        """A sampled request's spans as JSON lines (no final newline) and their count.

        One `%` format per request: the text around the ids and times is a template
        compiled once per request shape (`_line_layout`). NOTE: the same spans, ids drawn
        in the same order and the same text as `span_line` of each of
        `_request_spans(record)` (a test compares the two).
        """
        (_, trace_id, span_id, parent_id, _, method, model, version, lane, samples, request_id,
         status, start_ns, *_, end_ns) = record  # fmt: skip
        shape, times = _phase_times(record)
        key = (method, model, version, lane, samples, status, bool(parent_id),
               bool(request_id), shape, resource_json)  # fmt: skip
        layout = self._line_layouts.get(key)
        if layout is None:
            layout = self._line_layout(key, record, shape, resource_json)
        offset = self._offset_ns
        trace = trace_id.to_bytes(16, "big").hex()
        span = span_id.to_bytes(8, "big").hex()
        values: list[object] = [trace, span]
        if parent_id:
            values.append(parent_id)
        values += (start_ns + offset, end_ns + offset)
        if request_id:
            values.append(_dumps(request_id))
        bits = random.getrandbits
        for i in range(0, len(times), 2):
            values += (trace, bits(64), span, times[i] + offset, times[i + 1] + offset)
        return layout[0] % tuple(values), layout[1]

    def _line_layout(
        self, key: tuple[object, ...], record: _RequestRecord, shape: int, resource_json: str
    ) -> tuple[str, int]:
        """The `%` template of `_request_lines` for the shape of `record` (cached by
        `key`): `span_line`'s layout with `%s` (the trace id and server span id in hex,
        the request id's JSON), `%016x` (other span ids) and `%d` (times) in it."""
        parent_id, method, request_id, status = record[3], record[5], record[10], record[11]
        attributes_json = self._base_server_attributes(record)[1].replace("%", "%%")
        if request_id:  # the request id's JSON is a value: `%s`
            attributes_json = f"{attributes_json[:-1]},{_REQUEST_ID_JSON}:%s}}"
        lines = [
            '{"trace_id":"%s","span_id":"%s","parent_span_id":'
            + ('"%016x"' if parent_id else "null")
            + f',"name":{_name_json(method).replace("%", "%%")},"kind":"SERVER",'
            '"start_ns":%d,"end_ns":%d'
            + _optional_fields_json(
                status in SERVER_ERROR_CODES, attributes_json,
                resource_json=resource_json.replace("%", "%%"),
            )
            + "}"
        ]  # fmt: skip
        for name, error, _, phase_json in self._phases(shape):
            lines.append(
                '{"trace_id":"%s","span_id":"%016x","parent_span_id":"%s",'
                f'"name":{_name_json(name).replace("%", "%%")},"kind":"INTERNAL",'
                '"start_ns":%d,"end_ns":%d'
                + _optional_fields_json(error, phase_json.replace("%", "%%"))
                + "}"
            )
        return _remember(self._line_layouts, key, ("\n".join(lines), len(lines)))

    def _request_otlp(self, record: _RequestRecord) -> tuple[bytes, int]:
        """A sampled request's spans as encoded `ScopeSpans.spans` entries (one bytes
        object) and their count.

        One `struct` pack per request: the bytes around the ids, times and request id are
        compiled once per request shape (`_otlp_layout`). NOTE: the same spans, ids drawn
        in the same order, as `_span_bytes` of each of `_request_spans(record)` (a test
        compares the two).
        """
        (_, trace_id, span_id, parent_id, _, method, model, version, lane, samples, request_id,
         status, start_ns, *_, end_ns) = record  # fmt: skip
        shape, times = _phase_times(record)
        raw_id = request_id.encode() if request_id else b""
        key = (method, model, version, lane, samples, status, bool(parent_id), len(raw_id),
               shape)  # fmt: skip
        layout = self._otlp_layouts.get(key)
        if layout is None:
            layout = self._otlp_layout(key, record, shape)
        offset = self._offset_ns
        trace = trace_id.to_bytes(16, "big")
        span = span_id.to_bytes(8, "big")
        values: list[object] = [trace, span]
        if parent_id:
            values.append(parent_id.to_bytes(8, "big"))
        values += (start_ns + offset, end_ns + offset)
        if raw_id:
            values.append(raw_id)
        bits = random.getrandbits
        for i in range(0, len(times), 2):
            values += (trace, bits(64).to_bytes(8, "big"), span, times[i] + offset,
                       times[i + 1] + offset)  # fmt: skip
        args = layout.constants.copy()
        args[1::2] = values
        return layout.pack(*args), layout.spans

    def _otlp_layout(
        self, key: tuple[object, ...], record: _RequestRecord, shape: int
    ) -> _OtlpLayout:
        """The `struct` layout of `_request_otlp` for the shape of `record` (cached by
        `key`): `_span_entry`'s fields, constant except ids, times and the request id."""
        parent, method, request_id, status = record[3], record[5], record[10], record[11]
        attributes = _otlp_attributes(*self._base_server_attributes(record))
        parent_field: list[bytes | str] = [b"\x22\x08", "8s"] if parent else []
        request_id_field: list[bytes | str] = []
        if request_id:
            raw = request_id.encode()
            attributes += _otlp_request_id(request_id)[: -len(raw)]
            request_id_field = [f"{len(raw)}s"]
        spans: list[list[bytes | str]] = [
            [
                b"\x0a\x10", "16s", b"\x12\x08", "8s",
                *parent_field,
                _otlp_name(method) + _KIND_SERVER + b"\x39", "Q", b"\x41", "Q",
                attributes, *request_id_field,
                (_STATUS_ERROR if status in SERVER_ERROR_CODES else b"")
                + (_FLAGS_REMOTE_PARENT if parent else _FLAGS_LOCAL),
            ]
        ]  # fmt: skip
        for name, error, phase_attributes, phase_json in self._phases(shape):
            spans.append(
                [
                    b"\x0a\x10", "16s", b"\x12\x08", "8s", b"\x22\x08", "8s",
                    _otlp_name(name) + _KIND_INTERNAL + b"\x39", "Q", b"\x41", "Q",
                    (_otlp_attributes(phase_attributes, phase_json) if phase_attributes
                     else b"") + (_STATUS_ERROR if error else b"") + _FLAGS_LOCAL,
                ]
            )  # fmt: skip
        return _remember(self._otlp_layouts, key, _otlp_compile(spans))

    def _request_spans(self, record: _RequestRecord) -> tuple[SpanData, list[SpanData] | None]:
        """A request's server span, and its children when it is sampled."""
        (_, trace_id, span_id, parent_id, sampled, method, *_) = record
        status, start_ns, end_ns = record[11], record[12], record[19]
        offset = self._offset_ns
        attributes, attributes_json = self._server_attributes(record)
        server = SpanData(
            method, trace_id, span_id, parent_id, bool(parent_id), True, start_ns + offset,
            end_ns + offset, status in SERVER_ERROR_CODES, sampled, attributes, (),
            attributes_json,
        )  # fmt: skip
        if not sampled:
            return server, None
        bits = random.getrandbits
        children = [
            SpanData(name, trace_id, bits(64), span_id, False, False, start + offset,
                     end + offset, error, True, attributes, (), attributes_json)
            for name, start, end, error, attributes, attributes_json in self._child_phases(record)
        ]  # fmt: skip
        return server, children

    def _child_phases(self, record: _RequestRecord) -> list[_Phase]:
        """The child spans of a sampled request, in order (see `_phase_times`)."""
        shape, times = _phase_times(record)
        return [
            (name, times[2 * i], times[2 * i + 1], error, attributes, attributes_json)
            for i, (name, error, attributes, attributes_json) in enumerate(self._phases(shape))
        ]

    def _phases(self, shape: int) -> list[tuple[str, bool, dict[str, str | int], str]]:
        """The child spans of a request shape (`_phase_times`): name, error, attributes and
        their JSON, in order."""
        phases: list[tuple[str, bool, dict[str, str | int], str]] = []
        if shape & _DECODED:
            phases.append((S.DECODE, False, _NO_ATTRIBUTES, "{}"))
        if shape & (_QUEUED | _QUEUE_LEFT):
            phases.append((S.QUEUE, bool(shape & _QUEUE_LEFT), _NO_ATTRIBUTES, "{}"))
        if shape & _ENGINE:
            phases.append((S.ENGINE, False, *self._lane_engine_attributes(shape >> _SAMPLES_SHIFT)))
        if shape & _ENCODED:
            phases.append((S.ENCODE, False, _NO_ATTRIBUTES, "{}"))
        return phases

    def _server_attributes(self, record: _RequestRecord) -> tuple[dict[str, str | int], str]:
        """A request's server-span attributes and their JSON, cached: most requests share
        them.

        NOTE: cached dicts are shared by many spans; nothing may modify them.
        """
        hit = self._base_server_attributes(record)
        request_id = record[10]
        if not request_id:
            return hit
        attributes, encoded = hit
        return (
            {**attributes, S.REQUEST_ID: request_id},
            f"{encoded[:-1]},{_REQUEST_ID_JSON}:{_dumps(request_id)}}}",
        )

    def _base_server_attributes(self, record: _RequestRecord) -> tuple[dict[str, str | int], str]:
        """The server-span attributes other than the request id, and their JSON (cached)."""
        (_, _, _, _, _, method, model, version, lane, samples, _, status, *_) = record
        key = (method, model, version, lane, samples, status)
        hit = self._attribute_cache.get(key)
        if hit is None:
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
            hit = _remember(self._attribute_cache, key, (attributes, _dumps(attributes)))
        return hit

    def _lane_engine_attributes(self, samples: int) -> tuple[dict[str, str | int], str]:
        """Attributes and attribute JSON of a CPU-lane engine span (cached)."""
        hit = self._lane_engine_cache.get(samples)
        if hit is None:
            attributes: dict[str, str | int] = {S.LANE: "cpu", S.BATCH_SIZE: samples}
            hit = _remember(self._lane_engine_cache, samples, (attributes, _dumps(attributes)))
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


def _optional_fields_json(
    error: bool, attributes_json: str, links_json: str = "[]", resource_json: str = "{}"
) -> str:
    """The end of a span line: the fields that are left out at their defaults (status
    `UNSET`, no attributes, no links, no resource), each with its leading comma.

    NOTE: the defaults are about 14% of a CPU-lane request's bytes (four spans); what a
    file of spans costs is mostly the bytes written (BENCHMARKS.md, "Twelfth session").
    """
    return (
        (',"status":"ERROR"' if error else "")
        + (f',"attributes":{attributes_json}' if attributes_json != "{}" else "")
        + (f',"links":{links_json}' if links_json != "[]" else "")
        + (f',"resource":{resource_json}' if resource_json != "{}" else "")
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
    attributes_json = span.attributes_json or (_dumps(attributes) if attributes else "{}")
    name = _name_json(span.name)
    return (
        f'{{"trace_id":"{span.trace_id:032x}","span_id":"{span.span_id:016x}",'
        f'"parent_span_id":{parent_id},"name":{name},'
        f'"kind":"{"SERVER" if span.server else "INTERNAL"}","start_ns":{span.start_ns},'
        f'"end_ns":{span.end_ns}'
        + _optional_fields_json(span.error, attributes_json, links_json, resource_json)
        + "}"
    )


_FDATASYNC: Final[Callable[[int], None]] = getattr(os, "fdatasync", os.fsync)
"""`fdatasync` where there is one (Linux), else `fsync`."""
_DROP_CACHE: Final = getattr(os, "POSIX_FADV_DONTNEED", None)
"""`posix_fadvise`'s advice to drop pages from the page cache (None: not on this OS)."""


class JsonLinesSpanExporter(SpanDataExporter):
    """Appends spans to a file, one JSON object per line; rotates to `<file>.1` when full.

    The resource is written once per export call (on its first span), not on every line.
    Every `sync_bytes` written, the data written since is written out (`fdatasync`) and
    dropped from the page cache: the writeback then runs in this process (the shipper
    process, at the lowest CPU priority) instead of in the kernel's flusher threads at
    normal priority, and a trace file, written once and read rarely, does not fill the
    page cache. With it, 100% tracing to the file cost about a point less of mlp64's
    throughput on this VM's ext4 (BENCHMARKS.md, "Twelfth session").

    Args:
        path: the file (its folder is created).
        max_bytes: rotate once the file is larger than this.
        sync_bytes: write out and drop from the cache every this many bytes written
            (None: leave both to the kernel).
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int = 256 * 1024 * 1024,
        sync_bytes: int | None = 4 * 1024 * 1024,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.sync_bytes = sync_bytes
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[bytes] | None = path.open("ab")
        self._synced = self._file.tell()
        """Where the data not yet written out starts."""
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
        """Append already formatted lines; rotate when full."""
        return self.write_pieces([text.encode()])

    def write_pieces(self, pieces: Sequence[bytes | memoryview]) -> SpanExportResult:
        """Append already formatted lines as UTF-8, in pieces written back to back (the
        tracer's fast path: no copy into one buffer); rotate when full."""
        with self._lock:
            file = self._file
            if file is None:
                return SpanExportResult.FAILURE
            for piece in pieces:
                file.write(piece)
            file.flush()
            size = file.tell()
            if self.sync_bytes is not None and size - self._synced >= self.sync_bytes:
                self._write_out(file, size)
            if size > self.max_bytes:
                file.close()
                rotated = self.path.with_name(self.path.name + ".1")
                # NOTE: not `replace`: renamed over another file, ext4 first writes this
                # one's data out (auto_da_alloc): 100-130 ms at 256 MiB here, against 13.
                rotated.unlink(missing_ok=True)
                self.path.rename(rotated)
                self._file = self.path.open("ab")
                self._synced = 0
        return SpanExportResult.SUCCESS

    def _write_out(self, file: IO[bytes], size: int) -> None:
        """Write the file's data out and drop what was written since the last time from
        the page cache."""
        fd = file.fileno()
        _FDATASYNC(fd)
        if _DROP_CACHE is not None:
            os.posix_fadvise(fd, self._synced, size - self._synced, _DROP_CACHE)
        self._synced = size

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


class OtlpHead(NamedTuple):
    """The encoded parts of an ExportTraceServiceRequest that its spans share."""

    resource: bytes
    """`ResourceSpans.resource` (1)."""
    scope: bytes
    """`ScopeSpans.scope` (1)."""
    schema_url: bytes
    """`ResourceSpans.schema_url` (3), b"" if empty."""


def otlp_head(resource: Resource, scope: InstrumentationScope) -> OtlpHead:
    """Encode a resource and scope once, for `otlp_payload`."""
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope as PbScope
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource

    pb_resource = PbResource()
    _set_attributes(pb_resource.attributes, resource.attributes)
    body = pb_resource.SerializeToString()
    scope_body = PbScope(name=scope.name, version=scope.version or "").SerializeToString()
    schema = resource.schema_url.encode()
    return OtlpHead(
        b"\x0a" + _varint(len(body)) + body,
        b"\x0a" + _varint(len(scope_body)) + scope_body,
        b"\x1a" + _varint(len(schema)) + schema if schema else b"",
    )


def otlp_payload(head: OtlpHead, spans: Sequence[bytes | memoryview]) -> bytes:
    """A serialized ExportTraceServiceRequest: one resource and scope (`head`) holding
    spans already encoded as `ScopeSpans.spans` entries (`_span_bytes`, `_request_otlp`,
    `_encode_requests`). The lengths are computed first: the spans are copied once."""
    scope_size = len(head.scope) + sum(map(len, spans))
    scope_tag = b"\x12" + _varint(scope_size)
    resource_size = len(head.resource) + len(scope_tag) + scope_size + len(head.schema_url)
    return b"".join(
        (b"\x0a", _varint(resource_size), head.resource, scope_tag, head.scope, *spans,
         head.schema_url)
    )  # fmt: skip


_OTLP_ATTRIBUTES: dict[str, bytes] = {}
"""Attribute set (as JSON) -> a serialized Span holding just those attributes."""
_OTLP_NAMES: dict[str, bytes] = {}
"""Span name -> its encoded `name` field."""
_STATUS_ERROR: Final = b"\x7a\x02\x18\x02"  # status (15) { code (3): STATUS_CODE_ERROR }
_FLAGS_LOCAL: Final = b"\x85\x01" + (0x100).to_bytes(4, "little")  # flags (16), fixed32
"""Span.flags: the parent, if any, is local (the SDK sets the has-is-remote bit)."""
_FLAGS_REMOTE_PARENT: Final = b"\x85\x01" + (0x300).to_bytes(4, "little")
"""Span.flags: the parent came from another process."""
_KIND_SERVER: Final = b"\x30\x02"  # kind (6): SPAN_KIND_SERVER
_KIND_INTERNAL: Final = b"\x30\x01"  # kind (6): SPAN_KIND_INTERNAL
_PACK_TIMES: Final = struct.Struct("<BQBQ").pack  # start (7) and end (8), fixed64
_LINK_FLAGS: Final = b"\x35" + (0x100).to_bytes(4, "little")  # Link.flags (6), fixed32
_REQUEST_ID_KEY: Final = (
    b"\x0a" + bytes([len(S.REQUEST_ID)]) + S.REQUEST_ID.encode()
)  # KeyValue.key (1)
_SAMPLES_KEY: Final = (
    b"\x0a" + bytes([len(S.REQUEST_SAMPLES)]) + S.REQUEST_SAMPLES.encode()
)  # KeyValue.key (1)


class _OtlpLayout(NamedTuple):
    """A request shape's spans as one `struct` format: constant byte strings alternate
    with the values (ids, times, request id) that `_request_otlp` fills in."""

    pack: Any
    """`struct.Struct.pack` of the whole format."""
    constants: list[object]
    """The pack arguments with the constants at the even places (values go between)."""
    spans: int
    rows: RowLayout
    """The same layout for `span_rows` (many requests at once)."""


def _otlp_compile(spans: Sequence[Sequence[bytes | str]]) -> _OtlpLayout:
    """Compile spans given as their fields in order (as `_span_entry` writes them):
    `bytes` are constant, `str` are the `struct` codes of values filled in per request
    (`"16s"`, `"8s"`, `"Q"`). Each span gets its `ScopeSpans.spans` tag and length."""
    constants: list[bytes] = [b""]
    codes: list[str] = []
    for fields in spans:
        size = sum(len(f) if isinstance(f, bytes) else struct.calcsize("<" + f) for f in fields)
        constants[-1] += b"\x12" + _varint(size)
        for field in fields:
            if isinstance(field, bytes):
                constants[-1] += field
            else:
                codes.append(field)
                constants.append(b"")
    layout = "".join(f"{len(c)}s{code}" for c, code in zip(constants, codes, strict=False))
    arguments: list[object] = [b""] * (2 * len(codes) + 1)
    arguments[0::2] = constants
    return _OtlpLayout(
        struct.Struct(f"<{layout}{len(constants[-1])}s").pack,
        arguments,
        len(spans),
        struct_layout(constants, codes),
    )


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _otlp_attributes(attributes: dict[str, str | int], attributes_json: str) -> bytes:
    """Attributes as encoded `Span.attributes` (9) fields, cached per attribute set (a
    model's server spans share theirs); `attributes_json` is the cache key ("" = compute)."""
    from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

    key = attributes_json or _dumps(attributes)
    encoded = _OTLP_ATTRIBUTES.get(key)
    if encoded is None:
        holder = PbSpan()
        _set_attributes(holder.attributes, attributes)
        encoded = _remember(_OTLP_ATTRIBUTES, key, holder.SerializeToString())
    return encoded


def _otlp_name(name: str) -> bytes:
    """A span name as its encoded `Span.name` (5) field (a handful of names, cached)."""
    encoded = _OTLP_NAMES.get(name)
    if encoded is None:
        raw = name.encode()
        encoded = _OTLP_NAMES[name] = b"\x2a" + _varint(len(raw)) + raw
    return encoded


def _span_entry(
    trace: bytes, span_id: int, parent: bytes, name: bytes, kind: bytes, start_ns: int,
    end_ns: int, attributes: bytes, links: bytes, error: bool, flags: bytes,
) -> bytes:  # fmt: skip
    """One span as a `ScopeSpans.spans` (2) entry: tag, length and the span's fields in
    field order. `trace` is the encoded trace id field, `parent` the encoded parent span id
    field (b"" = root) and the others encoded fields too, as `_span_bytes` makes them."""
    body = b"".join(
        (
            trace, b"\x12\x08", span_id.to_bytes(8, "big"), parent, name, kind,
            _PACK_TIMES(0x39, start_ns, 0x41, end_ns), attributes, links,
            _STATUS_ERROR if error else b"", flags,
        )
    )  # fmt: skip
    size = len(body)
    return (b"\x12" + bytes((size,)) if size < 0x80 else b"\x12" + _varint(size)) + body


def _span_bytes(span: SpanData) -> bytes:
    """An OTLP `Span` as a `ScopeSpans.spans` entry: the fields batchwire sets, as the
    SDK's `encode_spans` sets them (a test compares the two)."""
    links = b""
    if span.links:
        encoded = [_link_bytes(trace_id, span_id, n) for trace_id, span_id, n in span.links]
        links = b"".join(b"\x6a" + _varint(len(link)) + link for link in encoded)  # links (13)
    return _span_entry(
        b"\x0a\x10" + span.trace_id.to_bytes(16, "big"),
        span.span_id,
        b"\x22\x08" + span.parent_span_id.to_bytes(8, "big") if span.parent_span_id else b"",
        _otlp_name(span.name),
        _KIND_SERVER if span.server else _KIND_INTERNAL,
        span.start_ns,
        span.end_ns,
        _otlp_attributes(span.attributes, span.attributes_json) if span.attributes else b"",
        links,
        span.error,
        _FLAGS_REMOTE_PARENT if span.parent_remote else _FLAGS_LOCAL,
    )


def _key_value(key: bytes, value: bytes) -> bytes:
    """A `KeyValue`'s body: its encoded key field and an `AnyValue` body as `value` (2)."""
    return key + b"\x12" + _varint(len(value)) + value


def _otlp_request_id(request_id: str) -> bytes:
    """The `batchwire.request.id` attribute as an encoded `Span.attributes` (9) field."""
    raw = request_id.encode()
    attribute = _key_value(_REQUEST_ID_KEY, b"\x0a" + _varint(len(raw)) + raw)  # string_value
    return b"\x4a" + _varint(len(attribute)) + attribute


def _link_bytes(trace_id: int, span_id: int, samples: int) -> bytes:
    """An OTLP `Span.Link` to a member request's span, with its sample count."""
    attribute = _key_value(_SAMPLES_KEY, b"\x18" + _varint(samples))  # int_value (3)
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


def otlp_endpoint(settings: TracingSettings) -> str | None:
    """The OTLP/gRPC endpoint spans go to: the flag, else $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    or $OTEL_EXPORTER_OTLP_ENDPOINT; None = the JSON-lines file."""
    return (
        settings.otlp_endpoint
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or None
    )


def check_destination(settings: TracingSettings) -> None:
    """Fail now, not in the shipper process, when the trace file cannot be opened.

    Raises:
        OSError: its folder cannot be made or the file cannot be opened for appending.
    """
    if otlp_endpoint(settings) is None:
        settings.trace_file.parent.mkdir(parents=True, exist_ok=True)
        settings.trace_file.open("ab").close()


def build_exporter(settings: TracingSettings) -> SpanExporter:
    """OTLP/gRPC when an endpoint is configured (`otlp_endpoint`), else the JSON-lines
    file."""
    endpoint = otlp_endpoint(settings)
    if endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceResponse,
        )

        class _Exporter(OTLPSpanExporter, OtlpPayloadExporter):
            """The SDK's OTLP/gRPC exporter (channel, retries, back-off, its own metrics)
            sending requests that the tracer encoded (`otlp_payload`)."""

            def export_payload(self, payload: bytes, spans: int) -> SpanExportResult:
                # NOTE: `_export` hands its argument to `_count_data` and `_translate_data`
                # only, both overridden here to take (payload, spans).
                return self._export(cast(Any, (payload, spans)))

            def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
                return SpanDataExporter.export(self, spans)

            def _initialize_channel_and_stub(self) -> None:
                super()._initialize_channel_and_stub()  # type: ignore[no-untyped-call]
                # The stub sends the payload's bytes as they are (no serializer).
                self._client = cast(Any, _RawTraceStub(self._channel))

            def _translate_data(self, data: Any) -> Any:
                return data[0]

            def _count_data(self, data: Any) -> int:
                return int(data[1])

        class _RawTraceStub:
            """TraceService's stub with no request serializer: `Export` takes bytes."""

            def __init__(self, channel: Any) -> None:
                self.Export = channel.unary_unary(
                    "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                    request_serializer=None,
                    response_deserializer=ExportTraceServiceResponse.FromString,
                )

        insecure = endpoint.startswith("http://") or "://" not in endpoint
        logger.info("exporting spans to OTLP/gRPC %s", endpoint)
        return _Exporter(endpoint=endpoint, insecure=insecure)
    logger.info("writing spans to %s", settings.trace_file)
    return JsonLinesSpanExporter(settings.trace_file, settings.max_file_bytes)
