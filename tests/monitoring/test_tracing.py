"""Tracing: sampling, parent continuation, span layout, batch links, the JSON-lines file."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind

from batching.batcher import DynamicBatcher, ExecutedBatch
from batching.policy import BatchPolicy
from batchwire.types import RequestTiming
from monitoring import spans as S
from monitoring.tracing import (
    JsonLinesSpanExporter,
    OtlpPayloadExporter,
    RequestSpanProcessor,
    RequestTracer,
    SpanData,
    TraceHandle,
    TracingSettings,
    span_line,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class MemoryExporter(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


class Payloads(OtlpPayloadExporter):
    """Keeps the OTLP payloads the tracer's fast path exports, with their span counts."""

    def __init__(self) -> None:
        self.payloads: list[tuple[bytes, int]] = []

    def export_payload(self, payload: bytes, spans: int) -> SpanExportResult:
        self.payloads.append((payload, spans))
        return SpanExportResult.SUCCESS


class Ended(SpanProcessor):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


def make_tracer(ratio: float = 1.0) -> tuple[RequestTracer, MemoryExporter, Ended]:
    exporter, ended = MemoryExporter(), Ended()
    settings = TracingSettings(sampling_ratio=ratio, flush_interval_s=3600)
    return RequestTracer(settings, processors=[ended], exporter=exporter), exporter, ended


def finish(
    tracer: RequestTracer,
    handle: TraceHandle,
    status: str = "OK",
    lane: str = "batched",
    timing: RequestTiming | None = None,
) -> None:
    timing = timing or RequestTiming(
        queued_ns=1_200,
        compute_start_ns=1_500,
        compute_end_ns=1_800,
        batch_samples=4,
        batch_requests=2,
    )
    tracer.end_request(handle, "inference.GRPCInferenceService/ModelInfer", "digits", "1", lane,
                       2, "req-7", status, 1_000, 1_100, timing, 1_900, 2_000)  # fmt: skip


def test_request_spans_follow_the_rpc_conventions_and_continue_the_traceparent() -> None:
    tracer, exporter, ended = make_tracer()
    try:
        handle = tracer.begin([("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")])
        finish(tracer, handle)
        tracer.flush()
    finally:
        tracer.shutdown()
    by_name = {s.name: s for s in exporter.spans}
    server = by_name["inference.GRPCInferenceService/ModelInfer"]
    assert server.kind is SpanKind.SERVER
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_ID
    assert server.parent.is_remote
    attrs = dict(server.attributes or {})
    assert attrs[S.RPC_SYSTEM_NAME] == attrs[S.RPC_SYSTEM] == "grpc"
    assert attrs[S.RPC_METHOD] == "inference.GRPCInferenceService/ModelInfer"
    assert attrs[S.RPC_SERVICE] == "inference.GRPCInferenceService"
    assert attrs[S.RPC_RESPONSE_STATUS_CODE] == "OK" and attrs[S.RPC_GRPC_STATUS_CODE] == 0
    assert attrs[S.MODEL_NAME] == "digits" and attrs[S.MODEL_VERSION] == "1"
    assert attrs[S.LANE] == "batched" and attrs[S.REQUEST_SAMPLES] == 2
    assert set(by_name) == {server.name, S.DECODE, S.QUEUE, S.ENCODE}
    for name in (S.DECODE, S.QUEUE, S.ENCODE):
        child = by_name[name]
        assert child.parent is not None and child.parent.span_id == server.context.span_id
        assert child.context.trace_id == server.context.trace_id
        assert server.start_time <= child.start_time <= child.end_time <= server.end_time
    # Durations are the recorded monotonic intervals, whatever the epoch offset.
    assert by_name[S.QUEUE].end_time - by_name[S.QUEUE].start_time == 300
    assert by_name[S.DECODE].end_time - by_name[S.DECODE].start_time == 100
    assert server.end_time - server.start_time == 1_000
    assert [s.name for s in ended.spans].count(server.name) == 1


def test_unsampled_parent_reaches_processors_but_not_the_exporter() -> None:
    tracer, exporter, ended = make_tracer(ratio=1.0)
    try:
        handle = tracer.begin([("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-00")])
        assert not handle.sampled and handle.link is None
        finish(tracer, handle)
        tracer.flush()
    finally:
        tracer.shutdown()
    assert exporter.spans == []
    assert len(ended.spans) == 1 and ended.spans[0].kind is SpanKind.SERVER
    assert not ended.spans[0].context.trace_flags.sampled


@pytest.mark.parametrize("ratio", [0.0, 0.25, 1.0])
def test_sampling_ratio_decides_new_traces(ratio: float) -> None:
    tracer, _, _ = make_tracer(ratio)
    try:
        sampled = sum(tracer.begin(None).sampled for _ in range(4000))
    finally:
        tracer.shutdown()
    assert abs(sampled / 4000 - ratio) < 0.05


@pytest.mark.parametrize(("parent", "status"), [(True, "OK"), (False, "OK"), (False, "INTERNAL")])
def test_record_request_records_what_begin_and_end_request_record(
    parent: bool, status: str
) -> None:
    """The inline lane's one call makes the record that `begin` then `end_request` make,
    but for the ids, which the shipper draws (packed records), unless a `traceparent` gives
    the trace id."""
    tracer = RequestTracer(TracingSettings(flush_interval_s=3600), exporter=MemoryExporter())
    metadata = [("user-agent", "x")]
    if parent:
        metadata.append(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"))
    ran = status == "OK"
    compute = (1_200, 1_300) if ran else (0, 0)
    method = "inference.GRPCInferenceService/ModelInfer"
    try:
        random.seed(3)
        tracer.record_request(metadata, method, "digits", "1", "cpu", 2 if ran else 0, "req-7",
                              status, 1_000, compute[0] or 2_000, *compute,
                              compute[1] or 2_000, 2_000)  # fmt: skip
        random.seed(3)
        timing = RequestTiming()
        if ran:
            timing = RequestTiming(compute_start_ns=1_200, compute_end_ns=1_300,
                                   batch_samples=2, batch_requests=1)  # fmt: skip
        tracer.end_request(tracer.begin(metadata), method, "digits", "1", "cpu",
                           timing.batch_samples, "req-7", status, 1_000,
                           compute[0] or 2_000, timing, compute[1] or 2_000, 2_000)  # fmt: skip
        (ours,) = tracer._packed_records()
        (theirs,) = tracer._records
        tracer._records.clear()
    finally:
        tracer.shutdown()
    ids = slice(2, 3) if parent else slice(1, 3)  # the ids that are drawn
    assert ours[: ids.start] + ours[ids.stop :] == theirs[: ids.start] + theirs[ids.stop :]
    assert (ours[1] == int(TRACE_ID, 16)) == parent and ours[4]
    assert all(isinstance(value, int) and value > 0 for value in ours[1:3])


def test_server_errors_mark_the_span_and_client_errors_do_not() -> None:
    tracer, exporter, _ = make_tracer()
    try:
        finish(tracer, tracer.begin(None), status="INTERNAL")
        finish(tracer, tracer.begin(None), status="INVALID_ARGUMENT")
        tracer.flush()
    finally:
        tracer.shutdown()
    servers = [s for s in exporter.spans if s.kind is SpanKind.SERVER]
    status = {dict(s.attributes or {})[S.RPC_RESPONSE_STATUS_CODE]: s.status for s in servers}
    assert not status["INTERNAL"].is_ok
    assert status["INVALID_ARGUMENT"].is_ok


def test_cpu_lane_request_gets_an_engine_child_and_no_queue() -> None:
    tracer, exporter, _ = make_tracer()
    try:
        timing = RequestTiming(compute_start_ns=1_200, compute_end_ns=1_300, batch_samples=2,
                               batch_requests=1)  # fmt: skip
        finish(tracer, tracer.begin(None), lane="cpu", timing=timing)
        tracer.flush()
    finally:
        tracer.shutdown()
    names = sorted(s.name for s in exporter.spans if s.kind is not SpanKind.SERVER)
    assert names == [S.DECODE, S.ENCODE, S.ENGINE]


class SumEngine:
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUT": inputs["IN"].sum(axis=1, keepdims=True)}

    def warmup(self) -> None:
        pass


class TracingObserver:
    def __init__(self, tracer: RequestTracer) -> None:
        self.tracer = tracer
        self.batches: list[ExecutedBatch] = []

    def on_batch(self, batch: ExecutedBatch) -> None:
        self.batches.append(batch)
        self.tracer.record_batch("sum", "1", batch)


@pytest.mark.asyncio
async def test_batch_span_links_to_exactly_its_member_requests() -> None:
    tracer, exporter, _ = make_tracer()
    observer = TracingObserver(tracer)
    # A long queue delay and a preferred size of 6 samples: the 3 requests of 2 samples
    # share one batch, the 4th (alone, 1 sample) goes in a second one at close.
    policy = BatchPolicy(max_batch_size=6, preferred_batch_sizes=(6,), max_queue_delay_ns=10**9)
    batcher = DynamicBatcher([SumEngine()], policy, name="sum/1", observer=observer)
    batcher.start()
    handles = [tracer.begin(None) for _ in range(4)]
    unsampled = TraceHandle(1, 2, 0, sampled=False)
    try:
        first = [
            batcher.submit({"IN": np.ones((2, 3), np.float32)}, trace=h.link) for h in handles[:3]
        ]
        results = await asyncio.gather(*first)
        assert all(r["OUT"].shape == (2, 1) for r in results)
        last = asyncio.ensure_future(
            batcher.submit({"IN": np.ones((1, 3), np.float32)}, trace=handles[3].link)
        )
        other = asyncio.ensure_future(
            batcher.submit({"IN": np.ones((1, 3), np.float32)}, trace=unsampled.link)
        )
        await asyncio.sleep(0)
        await batcher.close(drain=True)
        await asyncio.gather(last, other)
    finally:
        await asyncio.to_thread(tracer.shutdown)
    batches = [s for s in exporter.spans if s.name == S.BATCH]
    assert len(batches) == len(observer.batches) == 2
    linked = [{(k.context.trace_id, k.context.span_id) for k in b.links} for b in batches]
    assert linked[0] == {(h.trace_id, h.span_id) for h in handles[:3]}
    assert linked[1] == {(handles[3].trace_id, handles[3].span_id)}  # not the unsampled one
    attrs = dict(batches[0].attributes or {})
    assert attrs[S.BATCH_SIZE] == 6 and attrs[S.BATCH_REQUESTS] == 3
    assert attrs[S.BATCH_PADDED_SIZE] == 6 and attrs[S.LANE] == "batched"
    assert dict(batches[1].attributes or {})[S.BATCH_REQUESTS] == 2
    engines = [s for s in exporter.spans if s.name == S.ENGINE]
    assert {e.parent.span_id for e in engines if e.parent} == {b.context.span_id for b in batches}


def test_json_lines_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "spans" / "out.jsonl"
    exporter = JsonLinesSpanExporter(path)
    tracer = RequestTracer(TracingSettings(flush_interval_s=3600), exporter=exporter)
    try:
        handle = tracer.begin([("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")])
        finish(tracer, handle)
    finally:
        tracer.shutdown()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 4
    server = next(r for r in rows if r["kind"] == "SERVER")
    assert server["trace_id"] == TRACE_ID and server["parent_span_id"] == PARENT_ID
    assert server["end_ns"] - server["start_ns"] == 1_000
    assert server["attributes"][S.MODEL_NAME] == "digits"
    assert {r["parent_span_id"] for r in rows if r["kind"] != "SERVER"} == {server["span_id"]}


def test_json_lines_file_rotates(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    tracer = RequestTracer(
        TracingSettings(flush_interval_s=3600),
        exporter=JsonLinesSpanExporter(path, max_bytes=2_000),
    )
    try:
        for _ in range(20):
            finish(tracer, tracer.begin(None))
            tracer.flush()
    finally:
        tracer.shutdown()
    rotated = path.with_name("out.jsonl.1")
    assert rotated.exists() and rotated.stat().st_size > 2_000
    assert path.stat().st_size <= 2_000 + 4_000  # at most one flush past the limit


@pytest.mark.parametrize("sync_bytes", [1_000, None])
def test_the_file_is_written_out_and_dropped_from_the_cache_every_sync_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync_bytes: int | None
) -> None:
    """Each time `sync_bytes` more were written: one fdatasync, then the range written
    since the last one dropped from the page cache; ranges follow each other, and a
    rotated file starts again at 0. None: neither."""
    from monitoring import tracing

    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(tracing, "_FDATASYNC", lambda fd: calls.append(("sync", fd)))
    monkeypatch.setattr(
        tracing.os, "posix_fadvise", lambda fd, start, size, advice: calls.append(
            ("drop", fd, start, size, advice))
    )  # fmt: skip
    monkeypatch.setattr(tracing, "_DROP_CACHE", 4)
    path = tmp_path / "out.jsonl"
    exporter = JsonLinesSpanExporter(path, max_bytes=5_000, sync_bytes=sync_bytes)
    written = []
    for i in range(40):
        line = f'{{"n":{i},"pad":"{"x" * 300}"}}\n'.encode()
        written.append(line)
        exporter.write_pieces([line[:10], line[10:]])
    exporter.shutdown()
    text = path.with_name("out.jsonl.1").read_bytes() + path.read_bytes()
    assert text == b"".join(written[-len(text.splitlines()) :])  # nothing lost or reordered
    if sync_bytes is None:
        assert calls == []
        return
    syncs = [c for c in calls if c[0] == "sync"]
    drops = [c for c in calls if c[0] == "drop"]
    assert len(syncs) == len(drops) > 4 and calls[::2] == syncs  # each sync, then its drop
    position = 0
    for _, _, start, size, advice in drops:
        assert advice == 4 and size >= sync_bytes
        assert start in (position, 0)  # where the last one ended, or a new file
        position = start + size
    assert any(start == 0 for _, _, start, _, _ in drops[1:])  # after the rotation


def test_writing_out_works_on_this_os(tmp_path: Path) -> None:
    """The real fdatasync and posix_fadvise calls, after every write."""
    path = tmp_path / "out.jsonl"
    exporter = JsonLinesSpanExporter(path, sync_bytes=1)
    for i in range(3):
        assert exporter.write(f'{{"n":{i}}}\n') is SpanExportResult.SUCCESS
    exporter.shutdown()
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_a_request_dropped_in_the_queue_gets_a_queue_span_until_it_ended() -> None:
    tracer, exporter, _ = make_tracer()
    try:
        timing = RequestTiming(queued_ns=1_200)  # its deadline passed before any batch ran
        tracer.end_request(tracer.begin(None), "inference.GRPCInferenceService/ModelInfer",
                           "digits", "1", "batched", 1, "", "DEADLINE_EXCEEDED", 1_000, 1_100,
                           timing, 0, 9_000)  # fmt: skip
        tracer.flush()
    finally:
        tracer.shutdown()
    queue = next(s for s in exporter.spans if s.name == S.QUEUE)
    assert queue.end_time - queue.start_time == 7_800  # queued at 1 200, request ended at 9 000
    assert not queue.status.is_ok
    assert S.ENCODE not in {s.name for s in exporter.spans}


FAST_PATH_CASES = pytest.mark.parametrize(
    ("lane", "status", "timing", "parent"),
    [
        (
            "cpu",
            "OK",
            RequestTiming(
                compute_start_ns=1_200, compute_end_ns=1_300, batch_samples=2, batch_requests=1
            ),
            True,
        ),  # fmt: skip
        (
            "batched",
            "OK",
            RequestTiming(
                queued_ns=1_150, compute_start_ns=1_200, compute_end_ns=1_800, batch_samples=4
            ),
            False,
        ),  # fmt: skip
        ("batched", "DEADLINE_EXCEEDED", RequestTiming(queued_ns=1_150), False),
        ("", "INTERNAL", None, False),
    ],
)
"""Requests of each lane and outcome, for the fast paths that skip `SpanData`."""


def one_record(
    tracer: RequestTracer, lane: str, status: str, timing: RequestTiming | None, parent: bool,
    request_id: str = "req-7",
) -> Any:  # fmt: skip
    """Record one finished request (a FAST_PATH_CASES case) and take its record back."""
    metadata = [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")] if parent else None
    handle = tracer.begin(metadata)
    encode = 1_900 if status == "OK" else 0
    method = "inference.GRPCInferenceService/ModelInfer"
    tracer.end_request(handle, method, "digits", "1", lane, 2, request_id, status,
                       1_000, 1_100, timing, encode, 2_000)  # fmt: skip
    return tracer._records.popleft()


#: Request ids for the fast paths: none, plain, and one whose UTF-8 is longer than its
#: text, with a `%` that the JSON template must not read as a conversion.
REQUEST_IDS = pytest.mark.parametrize("request_id", ["req-7", "", "ü%d-1"])


def both_paths(
    case: tuple[str, str, RequestTiming | None, bool, str],
    fast: Callable[[RequestTracer, Any], Any],
    slow: Callable[[SpanData, list[SpanData]], Any],
) -> tuple[list[Any], list[Any]]:
    """What a fast path makes of two requests of one shape (the second reuses what the
    first compiled), and what the span builders make of them, the same ids drawn."""
    tracer = RequestTracer(
        TracingSettings(flush_interval_s=3600), exporter=MemoryExporter()
    )  # (the exporter is not used: both are built here)
    fasts, slows = [], []
    try:
        for seed in (7, 8):
            record = one_record(tracer, *case)
            random.seed(seed)
            fasts.append(fast(tracer, record))
            random.seed(seed)
            server, children = tracer._request_spans(record)
            assert children is not None
            slows.append(slow(server, children))
    finally:
        tracer.shutdown()
    return fasts, slows


@FAST_PATH_CASES
@REQUEST_IDS
def test_the_files_fast_path_writes_what_span_line_writes(
    lane: str, status: str, timing: RequestTiming | None, parent: bool, request_id: str
) -> None:
    def lines(server: SpanData, children: list[SpanData]) -> tuple[str, int]:
        text = [span_line(server, '{"service.name":"x"}'), *map(span_line, children)]
        return "\n".join(text), len(text)

    fast, slow = both_paths(
        (lane, status, timing, parent, request_id),
        lambda tracer, record: tracer._request_lines(record, '{"service.name":"x"}'),
        lines,
    )
    assert fast == slow and fast[0] != fast[1]
    assert [json.loads(line)["name"] for line in fast[0][0].splitlines()][0].endswith("ModelInfer")


def test_span_lines_leave_out_fields_at_their_defaults() -> None:
    """Status UNSET, no attributes, no links and no resource are not written; the
    structural fields always are; set ones are written."""
    plain = SpanData("decode", 1, 2, 3, False, False, 10, 20, False, True, {}, ())
    line = json.loads(span_line(plain))
    assert line == {"trace_id": f"{1:032x}", "span_id": f"{2:016x}",
                    "parent_span_id": f"{3:016x}", "name": "decode", "kind": "INTERNAL",
                    "start_ns": 10, "end_ns": 20}  # fmt: skip
    full = plain._replace(parent_span_id=0, server=True, error=True, attributes={"a": 1},
                          links=((4, 5, 6),))  # fmt: skip
    line = json.loads(span_line(full, '{"service.name":"x"}'))
    assert line["parent_span_id"] is None and line["kind"] == "SERVER"
    assert line["status"] == "ERROR" and line["attributes"] == {"a": 1}
    assert line["links"] == [
        {"trace_id": f"{4:032x}", "span_id": f"{5:016x}", "attributes": {S.REQUEST_SAMPLES: 6}}
    ]
    assert line["resource"] == {"service.name": "x"}


def _span_fields(span: object) -> tuple[object, ...]:
    from google.protobuf.json_format import MessageToDict

    fields = MessageToDict(span)  # type: ignore[arg-type]
    fields.pop("status", None) if not fields.get("status") else None
    fields["attributes"] = sorted((a["key"], str(a["value"])) for a in fields.get("attributes", []))
    return tuple(sorted((k, str(v)) for k, v in fields.items()))


def test_otlp_encoding_matches_the_sdks_encoder() -> None:
    from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import encode_spans
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from monitoring.tracing import _span_bytes, otlp_head, otlp_payload, readable_span

    tracer, _, _ = make_tracer()
    try:
        parent = tracer.begin([("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")])
        finish(tracer, parent)  # batched: decode, queue, encode
        timing = RequestTiming(compute_start_ns=1_200, compute_end_ns=1_300, batch_samples=2,
                               batch_requests=1)  # fmt: skip
        finish(tracer, tracer.begin(None), lane="cpu", timing=timing, status="INTERNAL")
        records = list(tracer._records)
        spans = []
        for record in records:
            server, children = tracer._request_spans(record)
            spans += [server, *(children or [])]
        batch = ExecutedBatch(  # a batch span with links
            name="digits/1", inputs={}, outputs=None, samples=4, padded_samples=4,
            member_samples=[2, 2], traces=[parent.link, (5, 6)], start_ns=1_500, end_ns=1_800,
            error=None,
        )  # fmt: skip
        tracer.record_batch("digits", "1", batch)
        spans += tracer._batch_spans(tracer._records[-1])
        payload = otlp_payload(
            otlp_head(tracer.resource, tracer.scope), list(map(_span_bytes, spans))
        )
        ours = ExportTraceServiceRequest.FromString(payload)  # what the OTLP exporter sends
        sdk = encode_spans([readable_span(s, tracer.resource, tracer.scope) for s in spans])
    finally:
        tracer._records.clear()
        tracer.shutdown()
    assert ours.resource_spans[0].resource == sdk.resource_spans[0].resource
    mine = sorted(map(_span_fields, ours.resource_spans[0].scope_spans[0].spans))
    theirs = sorted(map(_span_fields, sdk.resource_spans[0].scope_spans[0].spans))
    assert len(mine) == len(spans) == 10 and mine == theirs


@FAST_PATH_CASES
@REQUEST_IDS
def test_the_otlp_fast_path_encodes_what_the_span_encoder_encodes(
    lane: str, status: str, timing: RequestTiming | None, parent: bool, request_id: str
) -> None:
    from monitoring.tracing import _span_bytes

    def encoded(server: SpanData, children: list[SpanData]) -> tuple[bytes, int]:
        spans = (server, *children)
        return b"".join(map(_span_bytes, spans)), len(spans)

    fast, slow = both_paths(
        (lane, status, timing, parent, request_id),
        lambda tracer, record: tracer._request_otlp(record),
        encoded,
    )
    assert fast == slow and fast[0] != fast[1]


@FAST_PATH_CASES
def test_request_records_hold_no_object_the_cycle_collector_tracks(
    lane: str, status: str, timing: RequestTiming | None, parent: bool
) -> None:
    """Records wait up to a flush interval for the shipper: made of ints and strings only,
    they leave the collector's view at its first pass instead of being scanned at each."""
    import gc

    tracer = RequestTracer(TracingSettings(flush_interval_s=3600), exporter=MemoryExporter())
    try:
        record = one_record(tracer, lane, status, timing, parent)
        gc.collect()
        assert not gc.is_tracked(record)
    finally:
        tracer.shutdown()


def ship_backlog(tracer: RequestTracer) -> list[TraceHandle]:
    """Record 100 requests (4 spans each: server, decode, queue, encode) and one batch of
    the first two (2 spans), flush, shut the tracer down; the requests' handles."""
    try:
        handles = [tracer.begin(None) for _ in range(100)]
        for handle in handles:
            finish(tracer, handle)
        batch = ExecutedBatch(
            name="digits/1", inputs={}, outputs=None, samples=4, padded_samples=4,
            member_samples=[2, 2], traces=[handles[0].link, handles[1].link], start_ns=1_500,
            end_ns=1_800, error=None,
        )  # fmt: skip
        tracer.record_batch("digits", "1", batch)
        tracer.flush()
    finally:
        tracer.shutdown()
    return handles


def test_a_backlog_is_exported_in_bounded_otlp_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from monitoring import tracing

    monkeypatch.setattr(tracing, "OTLP_PAYLOAD_BYTES", 4096)
    exporter = Payloads()
    tracer = RequestTracer(TracingSettings(flush_interval_s=3600), exporter=exporter)
    handles = ship_backlog(tracer)
    assert len(exporter.payloads) > 1
    requests = [ExportTraceServiceRequest.FromString(p) for p, _ in exporter.payloads]
    spans = [s for r in requests for s in r.resource_spans[0].scope_spans[0].spans]
    assert [n for _, n in exporter.payloads] == [
        len(r.resource_spans[0].scope_spans[0].spans) for r in requests
    ]
    assert all(len(p) < 4096 + 2048 for p, _ in exporter.payloads)
    assert len(spans) == 100 * 4 + 2 and tracer.exported_spans == len(spans)
    resources = [
        {kv.key: kv.value.string_value for kv in r.resource_spans[0].resource.attributes}
        for r in requests
    ]
    assert all(r == resources[0] for r in resources) and resources[0]["service.name"]
    servers = {s.span_id for s in spans if s.kind == s.SPAN_KIND_SERVER}
    assert servers == {h.span_id.to_bytes(8, "big") for h in handles}
    (batch_span,) = [s for s in spans if s.name == S.BATCH]
    assert {link.span_id for link in batch_span.links} == {
        handles[0].span_id.to_bytes(8, "big"),
        handles[1].span_id.to_bytes(8, "big"),
    }


@pytest.mark.parametrize("path", ["lines", "otlp", "sdk"])
def test_shipping_hands_the_gil_over_every_few_records(
    path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog is shipped in stretches with the GIL handed over between them (else the
    event loop waits a whole switch interval, 5 ms, each time it comes back from epoll
    during a flush), on each of the three shipping paths: chunks of `SHIP_CHUNK` records
    on the fast paths, `SHIP_YIELD_EVERY` records on the general one."""
    from monitoring import tracing

    exporter: SpanExporter
    processors: list[SpanProcessor] = []
    if path == "lines":
        exporter = JsonLinesSpanExporter(tmp_path / "spans.jsonl")
    elif path == "otlp":
        exporter = Payloads()
    else:  # an SDK span processor takes the general path
        exporter, processors = MemoryExporter(), [Ended()]
    tracer = RequestTracer(
        TracingSettings(flush_interval_s=3600), processors=processors, exporter=exporter
    )
    left_at_handover: list[int] = []
    monkeypatch.setattr(
        tracing, "_hand_over_gil", lambda: left_at_handover.append(len(tracer._records))
    )
    monkeypatch.setattr(tracing, "SHIP_CHUNK", 16)
    try:
        for _ in range(100):
            finish(tracer, tracer.begin(None))
        tracer.flush()
    finally:
        tracer.shutdown()
    if path == "sdk":
        every = tracing.SHIP_YIELD_EVERY
        assert 1 < every < 100
        # Handed over each time before taking record number every, 2 * every... (1-based).
        assert left_at_handover == [100 - k * every + 1 for k in range(1, 100 // every + 1)]
    else:  # after each chunk but the last
        assert left_at_handover == [100 - k * 16 for k in range(1, 100 // 16 + 1)]
    assert tracer.exported_spans == 100 * 4


def test_sampled_requests_are_encoded_a_full_chunk_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a low sampling ratio a chunk holds few sampled requests: they are gathered over
    chunks and encoded `SHIP_CHUNK` or more at a time (encoding has a fixed cost per call),
    while every request still reaches the SLO feed and nothing sampled is lost."""
    from monitoring import tracing

    encoded: list[int] = []
    encode = RequestTracer._encode_columns

    def counting(
        self: RequestTracer,
        columns: Sequence[Any],
        record: Callable[[int], Any],
        otlp: bool,
        buffer: Any = None,
    ) -> Any:
        encoded.append(len(columns[5]))  # requests (columns of their records)
        return encode(self, columns, record, otlp, buffer)

    monkeypatch.setattr(RequestTracer, "_encode_columns", counting)
    monkeypatch.setattr(tracing, "SHIP_CHUNK", 16)
    seen: list[int] = []

    class Counting(tracing.RequestSpanProcessor):
        def on_request_end(self, model: str, status: str, duration_ns: int) -> None:
            seen.append(duration_ns)

    tracer = RequestTracer(
        TracingSettings(sampling_ratio=0.25, flush_interval_s=3600),
        processors=[Counting()],
        exporter=JsonLinesSpanExporter(tmp_path / "spans.jsonl"),
    )
    random.seed(5)
    try:
        handles = [tracer.begin(None) for _ in range(400)]
        for handle in handles:
            finish(tracer, handle)
        tracer.flush()
    finally:
        tracer.shutdown()
    sampled = sum(h.sampled for h in handles)
    assert 40 < sampled < 160 and len(seen) == 400
    # One line with the resource per write, then the rest encoded together.
    assert sum(encoded) + len(encoded) == sampled
    assert all(n >= 16 - 1 for n in encoded[:-1]) and len(encoded) < 400 // 16
    spans = (tmp_path / "spans.jsonl").read_text().splitlines()
    assert len(spans) == sampled * 4 == tracer.exported_spans


def test_flush_waits_for_what_the_shipper_thread_already_took() -> None:
    """`flush` returns only once every record so far is exported, including those the
    shipper thread took and is still exporting."""
    import threading

    entered, release = threading.Event(), threading.Event()

    class Blocking(MemoryExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            entered.set()
            assert release.wait(30)
            return super().export(spans)

    exporter = Blocking()
    tracer = RequestTracer(
        TracingSettings(flush_interval_s=0.01), processors=[Ended()], exporter=exporter
    )
    try:
        finish(tracer, tracer.begin(None))
        assert entered.wait(30)  # the shipper thread holds the record, in export
        assert not tracer._records
        flusher = threading.Thread(target=tracer.flush)
        flusher.start()
        flusher.join(0.2)
        still_waiting = flusher.is_alive()
        release.set()
        flusher.join(30)
        assert still_waiting and not flusher.is_alive()
        assert len(exporter.spans) == 4
    finally:
        release.set()
        tracer.shutdown()


def test_a_backlog_is_written_to_the_file_in_bounded_pieces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's fast path writes once per chunk of `SHIP_CHUNK` records (the GIL is
    handed over between chunks), each write's first line carries the resource, and
    nothing is lost."""
    from monitoring import tracing

    class Writes(JsonLinesSpanExporter):
        def __init__(self, path: Path) -> None:
            super().__init__(path)
            self.writes: list[str] = []

        def write_pieces(self, pieces: Sequence[bytes | memoryview]) -> SpanExportResult:
            self.writes.append(b"".join(pieces).decode())
            return super().write_pieces(pieces)

    monkeypatch.setattr(tracing, "SHIP_CHUNK", 16)
    exporter = Writes(tmp_path / "spans.jsonl")
    tracer = RequestTracer(TracingSettings(flush_interval_s=3600), exporter=exporter)
    handles = ship_backlog(tracer)  # 100 requests, 4 spans each, then a batch
    assert [len(w.splitlines()) for w in exporter.writes] == [16 * 4] * 6 + [4 * 4 + 2]
    for text in exporter.writes:
        assert text.endswith("\n")
        lines = [json.loads(line) for line in text.splitlines()]
        assert lines[0]["resource"]["service.name"]
        assert all("resource" not in line for line in lines[1:])
    spans = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
    assert len(spans) == 100 * 4 + 2 and tracer.exported_spans == len(spans)
    assert {s["span_id"] for s in spans if s["kind"] == "SERVER"} == {
        f"{h.span_id:016x}" for h in handles
    }


def mixed_records(tracer: RequestTracer) -> list[Any]:
    """Requests of every FAST_PATH_CASES case and request id, interleaved, three of each:
    several shapes in one chunk."""
    cases = [
        (*case, request_id)
        for case in FAST_PATH_CASES.args[1]
        for request_id in REQUEST_IDS.args[1]
    ]
    return [one_record(tracer, *case) for _ in range(3) for case in cases]


def _without_child_ids(span: dict[str, Any]) -> str:
    """A span as JSON, its id blanked when it is a child (ids drawn in another order)."""
    if span["kind"] != "SERVER":
        span = {**span, "span_id": ""}
    return json.dumps(span, sort_keys=True)


@pytest.mark.parametrize("offset", ["unix", "not unix"])
def test_requests_encoded_by_shape_are_what_each_record_makes(offset: str) -> None:
    """`_encode_requests` (a chunk at once, grouped by request shape) writes the same
    lines as `_request_lines` of each record, but for the child span ids, which are
    fresh; a clock that is not 19-digit Unix time takes the record-by-record path."""
    tracer = RequestTracer(TracingSettings(flush_interval_s=3600), exporter=MemoryExporter())
    try:
        if offset == "not unix":
            tracer._offset_ns = 0
        records = mixed_records(tracer)
        rows = tracer._encode_requests(records, otlp=False)
        text = b"".join(bytes(r.data) for r in rows).decode()
        expected = "".join(tracer._request_lines(r, "{}")[0] + "\n" for r in records)
    finally:
        tracer.shutdown()
    ours = [json.loads(line) for line in text.splitlines()]
    theirs = [json.loads(line) for line in expected.splitlines()]
    assert sum(r.spans for r in rows) == len(ours) == len(theirs) > len(records)
    assert sorted(map(_without_child_ids, ours)) == sorted(map(_without_child_ids, theirs))
    children = [s["span_id"] for s in ours if s["kind"] != "SERVER"]
    assert len(set(children)) == len(children) and all(len(c) == 16 for c in children)
    if offset == "unix":  # one group per case, in the order of first appearance
        assert len(rows) == len(records) // 3
        assert ours[0]["span_id"] == theirs[0]["span_id"]


def test_otlp_requests_encoded_by_shape_are_what_each_record_makes() -> None:
    """`_encode_requests` for OTLP: the same spans as `_request_otlp` of each record, but
    for the child span ids, in entries that a payload can be cut between (`row_bytes`)."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from monitoring.tracing import otlp_head, otlp_payload

    tracer = RequestTracer(TracingSettings(flush_interval_s=3600), exporter=MemoryExporter())
    try:
        records = mixed_records(tracer)
        rows = tracer._encode_requests(records, otlp=True)
        head = otlp_head(tracer.resource, tracer.scope)
        # Every group cut into single requests: each piece parses on its own.
        pieces = [
            r.data[i : i + r.row_bytes] for r in rows for i in range(0, len(r.data), r.row_bytes)
        ]
        ours = ExportTraceServiceRequest.FromString(otlp_payload(head, pieces))
        theirs = ExportTraceServiceRequest.FromString(
            otlp_payload(head, [tracer._request_otlp(r)[0] for r in records])
        )
    finally:
        tracer.shutdown()

    def spans(request: Any) -> list[str]:
        out = []
        for span in request.resource_spans[0].scope_spans[0].spans:
            fields = MessageToDict(span)
            if fields.get("kind") != "SPAN_KIND_SERVER":
                fields["spanId"] = ""
            out.append(json.dumps(fields, sort_keys=True))
        return sorted(out)

    assert len(pieces) == len(records)
    assert spans(ours) == spans(theirs)
    assert sum(r.spans for r in rows) == len(ours.resource_spans[0].scope_spans[0].spans)


def record_lane_requests(tracer: RequestTracer, count: int) -> list[tuple[bool, str, str]]:
    """`record_request` (packed records) of `count` CPU-lane requests of mixed shapes: with
    and without a `traceparent`, request id, failure; returns (parent, request id, status)
    of each, in order."""
    method = "inference.GRPCInferenceService/ModelInfer"
    cases = [
        (parent, request_id, status)
        for parent in (False, True)
        for request_id in ("", "req-7", "ü%d-1")
        for status in ("OK", "INTERNAL")
    ]
    made = []
    for i in range(count):
        parent, request_id, status = cases[i % len(cases)]
        metadata = [("user-agent", "x")]
        if parent:
            metadata.append(("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"))
        ran = status == "OK"
        start = 1_000 + i
        compute = (start + 200, start + 300) if ran else (0, 0)
        tracer.record_request(metadata, method, "digits", "1", "cpu", 2 if ran else 0,
                              request_id, status, start, compute[0] or start + 900, *compute,
                              compute[1] or start + 900, start + 900)  # fmt: skip
        made.append((parent, request_id, status))
    return made


@pytest.mark.parametrize("otlp", [False, True])
def test_packed_requests_encode_as_their_records_do(otlp: bool) -> None:
    """Packed records (`record_request`) come out of the shipper as columns that encode
    to what each record encodes to on its own (but for child span ids), with their
    request ids paired back in order and the ids drawn fresh per request."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from monitoring.tracing import otlp_head, otlp_payload

    tracer = RequestTracer(TracingSettings(flush_interval_s=3600), exporter=MemoryExporter())
    try:
        made = record_lane_requests(tracer, 300)  # two chunks
        records: list[Any] = []
        ours: list[str] = []
        theirs: list[str] = []
        head = otlp_head(tracer.resource, tracer.scope)
        for columns, record in tracer._drain_packed():
            chunk = [record(i) for i in range(len(columns[2]))]
            records += chunk
            rows = tracer._encode_columns(columns, record, otlp)
            if otlp:
                pieces = [bytes(r.data) for r in rows]
                for payload, out in (
                    (otlp_payload(head, pieces), ours),
                    (otlp_payload(head, [tracer._request_otlp(r)[0] for r in chunk]), theirs),
                ):
                    spans = ExportTraceServiceRequest.FromString(payload).resource_spans[0]
                    out += [
                        json.dumps(_without_child_ids(span_dict(span)), sort_keys=True)
                        for span in spans.scope_spans[0].spans
                    ]
            else:
                text = b"".join(bytes(r.data) for r in rows).decode()
                expected = "".join(tracer._request_lines(r, "{}")[0] + "\n" for r in chunk)
                ours += map(_without_child_ids, map(json.loads, text.splitlines()))
                theirs += map(_without_child_ids, map(json.loads, expected.splitlines()))
        assert not tracer._packed and not tracer._request_ids
    finally:
        tracer.shutdown()
    assert len(records) == len(made) and sorted(ours) == sorted(theirs) and ours
    assert [(bool(r[3]), r[10], r[11]) for r in records] == made
    for record, (parent, _, _) in zip(records, made, strict=True):
        assert (record[1] == int(TRACE_ID, 16)) == parent
        assert record[3] == (int(PARENT_ID, 16) if parent else 0)
    assert len({r[2] for r in records}) == len(records)
    assert len({r[1] for r in records if not r[3]}) == len(records) // 2


@pytest.mark.parametrize("otlp", [False, True])
def test_chunks_reusing_the_row_buffer_each_reach_the_exporter_intact(
    otlp: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk's rows are encoded into memory the next chunk reuses: each is written (the
    file) or sent (OTLP, a payload ending with the chunk) before the next is encoded, so
    every request arrives with its own times, once."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from monitoring import tracing

    monkeypatch.setattr(tracing, "_PACKED_CHUNK", 8)
    exporter: Payloads | JsonLinesSpanExporter = (
        Payloads() if otlp else JsonLinesSpanExporter(tmp_path / "spans.jsonl")
    )
    tracer = RequestTracer(TracingSettings(flush_interval_s=3600), exporter=exporter)
    method = "inference.GRPCInferenceService/ModelInfer"
    try:
        for i in range(50):  # 7 chunks; request i starts at (i + 1) ms
            start = (i + 1) * 1_000_000
            tracer.record_request(None, method, "digits", "1", "cpu", 1, f"r{i:02d}", "OK",
                                  start, start + 100, start + 100, start + 300, start + 300,
                                  start + 400)  # fmt: skip
        tracer.flush()
    finally:
        tracer.shutdown()
    offset = tracer._offset_ns
    if isinstance(exporter, Payloads):
        assert len(exporter.payloads) == 7  # one per chunk
        servers = [
            (
                {kv.key: kv.value.string_value for kv in span.attributes}[S.REQUEST_ID],
                span.start_time_unix_nano - offset,
                span.end_time_unix_nano - offset,
            )
            for payload, _ in exporter.payloads
            for span in ExportTraceServiceRequest.FromString(payload)
            .resource_spans[0]
            .scope_spans[0]
            .spans
            if span.kind == span.SPAN_KIND_SERVER
        ]
    else:
        lines = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
        servers = [
            (s["attributes"][S.REQUEST_ID], s["start_ns"] - offset, s["end_ns"] - offset)
            for s in lines
            if s["kind"] == "SERVER"
        ]
    assert servers == [
        (f"r{i:02d}", (i + 1) * 1_000_000, (i + 1) * 1_000_000 + 400) for i in range(50)
    ]
    assert tracer.exported_spans == 50 * 4


def span_dict(span: Any) -> dict[str, Any]:
    """An OTLP span message as a dict, for `_without_child_ids`."""
    from google.protobuf.json_format import MessageToDict

    fields = MessageToDict(span)
    fields["kind"] = "SERVER" if fields.get("kind") == "SPAN_KIND_SERVER" else "INTERNAL"
    fields["span_id"] = fields.pop("spanId")
    return fields


@pytest.mark.parametrize("sdk_processor", [False, True])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 1.0])
def test_packed_requests_are_sampled_as_their_trace_ids_say(
    ratio: float, sdk_processor: bool
) -> None:
    """The lane decides sampling without a trace id; the shipper then draws one that
    `TraceIdRatioBased` would decide the same way (low 64 bits under the bound exactly
    when sampled), and only sampled requests are exported, while every request reaches
    the fast span processors: an unsampled one at once, with no record, unless an SDK
    span processor wants its span."""
    seen: list[str] = []

    class Models(RequestSpanProcessor):
        def on_request_end(self, model: str, status: str, duration_ns: int) -> None:
            seen.append(model)

    processors: list[SpanProcessor] = [Models(), *([Ended()] if sdk_processor else [])]
    tracer = RequestTracer(
        TracingSettings(sampling_ratio=ratio, flush_interval_s=3600),
        processors=processors,
        exporter=Payloads(),
    )
    bound = round(ratio * (1 << 64))
    try:
        method = "inference.GRPCInferenceService/ModelInfer"
        for _ in range(2000):
            tracer.record_request(None, method, "digits", "1", "cpu", 1, "", "OK",
                                  1_000, 1_100, 1_200, 1_300, 1_400, 1_500)  # fmt: skip
        records = tracer._packed_records()  # (the general path: no processor fed)
        unrecorded = len(seen)
        for _ in range(2000):
            tracer.record_request(None, method, "digits", "1", "cpu", 1, "", "OK",
                                  1_000, 1_100, 1_200, 1_300, 1_400, 1_500)  # fmt: skip
        tracer.flush()
    finally:
        tracer.shutdown()
    sampled = [r[4] for r in records]
    assert all(((r[1] & ((1 << 64) - 1)) < bound) == r[4] for r in records)
    if sdk_processor:  # every request recorded
        assert len(records) == 2000 and unrecorded == 0
    else:  # only the sampled ones
        assert all(sampled) and unrecorded == 2000 - len(records)
    assert abs(sum(sampled) / 2000 - ratio) < 0.05
    assert seen == ["digits"] * (unrecorded + 2000)  # and the second 2,000, all of them
    if not sdk_processor:
        assert tracer.exported_spans == pytest.approx(2000 * ratio * 4, rel=0.2, abs=0)


def test_packed_records_past_the_code_table_become_tuple_records(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Distinct (method, model, version, lane, status) are packed as a small code, up to
    `_MAX_CODES` of them (a flood of made-up model names must not grow memory); the next
    ones are recorded as tuples, and both reach the file."""
    from monitoring import tracing

    monkeypatch.setattr(tracing, "_MAX_CODES", 3)
    tracer = RequestTracer(
        TracingSettings(flush_interval_s=3600), exporter=JsonLinesSpanExporter(tmp_path / "s")
    )
    try:
        for i in range(5):
            tracer.record_request(None, "m", f"model-{i}", "1", "cpu", 1, "", "OK",
                                  1_000, 1_100, 1_200, 1_300, 1_400, 1_500)  # fmt: skip
        assert (len(tracer._packed), len(tracer._records)) == (3, 2)
        tracer.flush()
    finally:
        tracer.shutdown()
    spans = [json.loads(line) for line in (tmp_path / "s").read_text().splitlines()]
    models = sorted(s["attributes"]["batchwire.model.name"] for s in spans if s["kind"] == "SERVER")
    assert models == [f"model-{i}" for i in range(5)] and len(spans) == 5 * 4
