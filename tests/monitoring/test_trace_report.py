"""`batchwire trace-report`: joins, percentile bands, slowest requests, files and the CLI.

The synthetic spans below follow the span contract literally (names, attributes, ids and
the JSON-lines layout are spelled out here, not taken from `monitoring/spans.py`), so a
renamed span or attribute breaks these tests; the last tests read a file written by the
real tracer and exporter.
"""

from __future__ import annotations

import itertools
import json
import struct
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batching.batcher import ExecutedBatch
from batchwire.cli import main
from batchwire.types import RequestTiming
from monitoring.trace_report import (
    bands,
    build_report,
    expand_paths,
    join,
    load_spans,
    render,
)
from monitoring.tracing import JsonLinesSpanExporter, RequestTracer, TracingSettings

MS = 1_000_000
EPOCH_NS = 1_795_000_000_000_000_000
METHOD = "inference.GRPCInferenceService/ModelInfer"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class SpanWriter:
    """Builds spans in the exporter's JSON-lines layout with unique hex ids."""

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.spans: list[dict[str, Any]] = []

    def new_trace(self) -> str:
        return f"{next(self._ids):032x}"

    def span(
        self,
        trace_id: str,
        name: str,
        start_ms: float,
        end_ms: float,
        *,
        parent: str | None = None,
        kind: str = "INTERNAL",
        status: str = "UNSET",
        attributes: dict[str, Any] | None = None,
        links: list[dict[str, Any]] | None = None,
        span_id: str | None = None,
    ) -> str:
        span_id = span_id or f"{next(self._ids):016x}"
        self.spans.append(
            {"trace_id": trace_id, "span_id": span_id, "parent_span_id": parent, "name": name,
             "kind": kind, "start_ns": EPOCH_NS + round(start_ms * MS),
             "end_ns": EPOCH_NS + round(end_ms * MS), "status": status,
             "attributes": attributes or {}, "links": links or [],
             "resource": {"service.name": "batchwire"}}
        )  # fmt: skip
        return span_id

    def request(
        self,
        *,
        model: str = "digits",
        lane: str = "batched",
        status: str = "OK",
        decode_ms: float = 0.1,
        queue_ms: float = 0.0,
        engine_ms: float = 0.0,
        encode_ms: float = 0.1,
        other_ms: float = 0.2,
        compute_ms_in_batch: float = 0.0,
        trace_id: str | None = None,
        span_id: str | None = None,
    ) -> tuple[str, str]:
        """A server span and its children; returns (trace id, server span id).

        `engine_ms` > 0 adds a CPU-lane `engine` child; `compute_ms_in_batch` only widens
        the server span by the time the batch's engine span will cover.
        """
        trace_id = trace_id or self.new_trace()
        compute_ms = engine_ms or compute_ms_in_batch
        total_ms = decode_ms + queue_ms + compute_ms + encode_ms + other_ms
        attrs = {"rpc.system.name": "grpc", "rpc.system": "grpc",
                 "rpc.service": "inference.GRPCInferenceService", "rpc.method": METHOD,
                 "rpc.response.status_code": status, "rpc.grpc.status_code": 0,
                 "batchwire.model.name": model, "batchwire.model.version": "1",
                 "batchwire.lane": lane, "batchwire.request.samples": 1}  # fmt: skip
        server = self.span(
            trace_id, METHOD, 0, total_ms, kind="SERVER", attributes=attrs, span_id=span_id,
            status="ERROR" if status not in ("OK", "INVALID_ARGUMENT") else "UNSET",
        )  # fmt: skip
        t = 0.0
        self.span(trace_id, "decode", t, t + decode_ms, parent=server)
        t += decode_ms
        if queue_ms:
            self.span(trace_id, "queue", t, t + queue_ms, parent=server)
            t += queue_ms
        if engine_ms:
            self.span(trace_id, "engine", t, t + engine_ms, parent=server)
        t += compute_ms + other_ms
        if status == "OK":
            self.span(trace_id, "encode", t, t + encode_ms, parent=server)
        return trace_id, server

    def batch(
        self, members: list[tuple[str, str]], engine_ms: float, padded_size: int, model: str
    ) -> str:
        """A `batch` root span linking each member's server span, and its `engine` child."""
        trace_id = self.new_trace()
        links = [{"trace_id": t, "span_id": s, "attributes": {"batchwire.request.samples": 1}}
                 for t, s in members]  # fmt: skip
        attrs = {"batchwire.batch.size": len(members), "batchwire.batch.padded_size": padded_size,
                 "batchwire.batch.requests": len(members), "batchwire.lane": "batched",
                 "batchwire.model.name": model, "batchwire.model.version": "1"}  # fmt: skip
        batch_id = self.span(trace_id, "batch", 50, 50 + engine_ms, attributes=attrs, links=links)
        self.span(trace_id, "engine", 50, 50 + engine_ms, parent=batch_id)
        return batch_id


N = 1000
"""Requests of the main fixture: request i waits i ms in the queue, so ranks are known."""


@pytest.fixture
def writer() -> SpanWriter:
    """1000 batched digits requests (queue i ms), in 100 batches of 10 consecutive ones;
    batch b's engine takes 1 + b / 100 ms and was padded to 16 samples."""
    out = SpanWriter()
    requests = [
        out.request(queue_ms=float(i), compute_ms_in_batch=1 + (i // 10) / 100) for i in range(N)
    ]
    for b in range(N // 10):
        out.batch(requests[b * 10 : b * 10 + 10], 1 + b / 100, 16, "digits")
    return out


def test_join_finds_every_component(writer: SpanWriter) -> None:
    requests = join(writer.spans)
    assert len(requests) == N
    r = requests[7]
    assert r.decode_ms == pytest.approx(0.1) and r.queue_ms == pytest.approx(7.0)
    assert r.compute_ms == pytest.approx(1.0) and r.encode_ms == pytest.approx(0.1)
    assert r.other_ms == pytest.approx(0.2) and r.unattributed_ms == 0.0
    assert r.total_ms == pytest.approx(8.4)
    assert (r.model, r.lane, r.status) == ("digits", "batched", "OK")
    assert r.batch is not None
    assert (r.batch.size, r.batch.padded_size, r.batch.requests) == (10, 16, 10)


def test_bands_split_by_rank_and_average_each_component(writer: SpanWriter) -> None:
    result = bands(join(writer.spans))
    assert [b.label for b in result] == ["p0-p50", "p50-p90", "p90-p99", "p99-p99.9", "p99.9-p100"]
    assert [b.count for b in result] == [500, 400, 90, 9, 1]
    # Queue times are the ranks: each band's mean queue is the mean of its ranks.
    expected_queue = [249.5, 699.5, 944.5, 994.0, 999.0]
    assert [b.mean_ms["queue"] for b in result] == pytest.approx(expected_queue)
    # Compute is 1 + batch/100 for batch = rank // 10.
    ranks = ((0, 500), (500, 900), (900, 990), (990, 999), (999, 1000))
    expected_compute = [1 + np.mean(np.arange(lo, hi) // 10) / 100 for lo, hi in ranks]
    assert [b.mean_ms["compute"] for b in result] == pytest.approx(expected_compute)
    for band, queue, compute in zip(result, expected_queue, expected_compute, strict=True):
        assert band.mean_ms["decode"] == pytest.approx(0.1)
        assert band.mean_ms["encode"] == pytest.approx(0.1)
        assert band.mean_ms["other"] == pytest.approx(0.2)
        assert band.mean_ms["unattributed"] == 0.0 and band.missing_compute == 0
        assert band.mean_total_ms == pytest.approx(0.4 + queue + compute)
        assert sum(band.mean_ms.values()) == pytest.approx(band.mean_total_ms)
    assert result[-1].max_total_ms == pytest.approx(0.4 + 999 + 1.99)


def test_empty_bands_are_left_out() -> None:
    out = SpanWriter()
    for i in range(10):
        out.request(queue_ms=float(i), engine_ms=1.0, lane="cpu")
    # 10 requests: ranks 0-4, 5-8, 9 (p90-p99); p99 and above hold nobody.
    assert [(b.label, b.count) for b in bands(join(out.spans))] == [
        ("p0-p50", 5), ("p50-p90", 4), ("p90-p99", 1),
    ]  # fmt: skip
    assert bands([]) == []


def test_slowest_requests_name_their_trace_and_batch(writer: SpanWriter) -> None:
    report = build_report(writer.spans, top=3)
    assert report["all"] is None  # one model: no pooled group
    slowest = report["models"]["digits"]["slowest"]
    servers = [s for s in writer.spans if s["kind"] == "SERVER"]
    assert [r["trace_id"] for r in slowest] == [servers[i]["trace_id"] for i in (999, 998, 997)]
    batches = [s for s in writer.spans if s["name"] == "batch"]
    for r in slowest:
        assert r["batch"]["span_id"] == batches[99]["span_id"]
        assert r["batch"]["engine_ms"] == pytest.approx(1.99)
        batch = r["batch"]
        assert (batch["size"], batch["padded_size"], batch["requests"]) == (10, 16, 10)
        assert (r["model"], r["lane"], r["status"]) == ("digits", "batched", "OK")
    assert slowest[0]["queue_ms"] == pytest.approx(999.0)
    assert slowest[0]["other_ms"] == pytest.approx(0.2)
    text = render(report)
    assert f"{servers[999]['trace_id']} OK batched: 1001.390 ms" in text
    batch_id = batches[99]["span_id"]
    assert f"batch {batch_id}: 10 req, 10 samples (padded 16), engine 1.990 ms" in text


def test_cpu_lane_compute_is_the_engine_child() -> None:
    out = SpanWriter()
    out.request(model="mlp64", lane="cpu", engine_ms=0.3, other_ms=0.5)
    (r,) = join(out.spans)
    assert r.lane == "cpu" and r.batch is None and r.queue_ms == 0.0
    assert r.compute_ms == pytest.approx(0.3) and r.other_ms == pytest.approx(0.5)


def test_missing_batch_spans_leave_compute_unknown_and_are_counted() -> None:
    out = SpanWriter()
    joined = [out.request(queue_ms=2.0, compute_ms_in_batch=1.0) for _ in range(3)]
    out.batch(joined, 1.0, 3, "digits")
    out.request(queue_ms=2.0, compute_ms_in_batch=1.0)  # its batch span was not exported
    out.request(status="DEADLINE_EXCEEDED", queue_ms=5.0)  # never computed: compute 0
    requests = {r.status: r for r in join(out.spans)}
    assert requests["DEADLINE_EXCEEDED"].compute_ms == 0.0
    report = build_report(out.spans)
    group = report["models"]["digits"]
    assert group["missing_compute"] == 1 and group["requests"] == 5
    assert group["by_status"] == {"OK": 4, "DEADLINE_EXCEEDED": 1}
    (missing,) = [r for r in group["slowest"] if r["status"] == "OK" and r["compute_ms"] is None]
    assert missing["unattributed_ms"] == pytest.approx(1.2) and missing["other_ms"] == 0.0
    (band,) = [b for b in group["bands"] if b["missing_compute"]]
    assert sum(band["mean_ms"].values()) == pytest.approx(band["mean_total_ms"])
    text = render(report)
    assert "1 successful requests have no compute span" in text and "unattributed" in text


def test_links_join_by_trace_and_span_id() -> None:
    """Span ids are unique only within a trace: a link must not join a namesake."""
    out = SpanWriter()
    linked = out.request(queue_ms=1.0, compute_ms_in_batch=1.0, span_id="00000000000000aa")
    out.request(queue_ms=1.0, compute_ms_in_batch=1.0, span_id="00000000000000aa")
    out.batch([linked], 1.0, 1, "digits")
    by_trace = {r.trace_id: r for r in join(out.spans)}
    assert by_trace[linked[0]].compute_ms == pytest.approx(1.0)
    assert [r.compute_ms for t, r in by_trace.items() if t != linked[0]] == [None]


def test_several_models_get_their_own_groups_and_a_pooled_one() -> None:
    out = SpanWriter()
    digits = [out.request(queue_ms=4.0, compute_ms_in_batch=2.0) for _ in range(4)]
    out.batch(digits, 2.0, 4, "digits")
    for _ in range(6):
        out.request(model="mlp64", lane="cpu", engine_ms=0.5)
    report = build_report(out.spans, top=2)
    assert sorted(report["models"]) == ["digits", "mlp64"]
    assert report["models"]["digits"]["bands"][0]["mean_ms"]["queue"] == pytest.approx(4.0)
    assert report["models"]["mlp64"]["by_lane"] == {"cpu": 6}
    pooled = report["all"]
    assert pooled["requests"] == 10 and pooled["by_lane"] == {"cpu": 6, "batched": 4}
    assert [r["model"] for r in pooled["slowest"]] == ["digits", "digits"]
    only = build_report(out.spans, model="mlp64")
    assert list(only["models"]) == ["mlp64"] and only["all"] is None and only["requests"] == 6
    assert build_report(out.spans, model="nope")["models"] == {}


def test_malformed_lines_are_counted(tmp_path: Path, writer: SpanWriter) -> None:
    path = tmp_path / "spans.jsonl"
    good = "\n".join(json.dumps(s) for s in writer.spans[:8])
    bad = ["not json", "[]", "{}", '{"span_id": "a", "name": "x", "start_ns": "soon", "end_ns": 1}',
           json.dumps(writer.spans[0])[:40]]  # fmt: skip
    path.write_text(good + "\n" + "\n".join(bad) + "\n\n   \n")
    loaded, malformed = load_spans([path])
    assert len(loaded) == 8 and malformed == len(bad)
    assert build_report(loaded, malformed=malformed)["malformed_lines"] == len(bad)


def test_globs_read_worker_files_but_not_report_outputs(tmp_path: Path) -> None:
    for name in ("spans.jsonl.w0", "spans.jsonl.w1", "spans.jsonl.w0.png", "spans.jsonl.json"):
        (tmp_path / name).write_text("")
    paths = expand_paths([str(tmp_path / "spans.jsonl*"), str(tmp_path / "spans.jsonl.w1")])
    assert [p.name for p in paths] == ["spans.jsonl.w0", "spans.jsonl.w1"]
    assert expand_paths([str(tmp_path / "none*")]) == [tmp_path / "none*"]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _write_real_trace(path: Path, requests: int, batch_size: int) -> None:
    """Spans written by the real tracer and exporter: `requests` batched requests (request
    i queued i µs), joined in batches of `batch_size` that each took 200 µs."""
    tracer = RequestTracer(TracingSettings(flush_interval_s=3600),
                           exporter=JsonLinesSpanExporter(path))  # fmt: skip
    try:
        handles = [tracer.begin(None) for _ in range(requests)]
        for first in range(0, requests, batch_size):
            members = handles[first : first + batch_size]
            start_ns = 1_000_000 + first * 1_000
            tracer.record_batch("digits", "1", ExecutedBatch(
                name="digits/1", inputs={}, outputs={}, samples=len(members),
                padded_samples=len(members), member_samples=[1] * len(members),
                traces=[h.link for h in members], start_ns=start_ns, end_ns=start_ns + 200_000,
                error=None))  # fmt: skip
            for i, handle in enumerate(members, start=first):
                timing = RequestTiming(
                    queued_ns=start_ns - i * 1_000,
                    compute_start_ns=start_ns,
                    compute_end_ns=start_ns + 200_000,
                    batch_samples=len(members),
                    batch_requests=len(members),
                )
                tracer.end_request(handle, METHOD, "digits", "1", "batched", 1, f"r{i}", "OK",
                                   timing.queued_ns - 50_000, timing.queued_ns - 10_000, timing,
                                   timing.compute_end_ns + 30_000,
                                   timing.compute_end_ns + 40_000)  # fmt: skip
    finally:
        tracer.shutdown()


def test_cli_reads_a_real_tracer_file_and_writes_png_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spans.jsonl"
    _write_real_trace(path, requests=40, batch_size=8)
    with path.open("a") as file:
        file.write("{truncated\n")
    out_json = tmp_path / "out" / "report.json"
    assert main(["trace-report", str(path), "--top", "2", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "1 malformed lines skipped" in text and "model digits: 40 requests" in text
    assert "p0-p50" in text and "unattributed" not in text
    report = json.loads(out_json.read_text())
    group = report["models"]["digits"]
    assert group["requests"] == 40 and group["missing_compute"] == 0
    for r in group["slowest"]:  # request i waited i µs: the slowest waited longest
        assert r["compute_ms"] == pytest.approx(0.2) and r["batch"]["requests"] == 8
        assert r["decode_ms"] == pytest.approx(0.04) and r["encode_ms"] == pytest.approx(0.01)
        assert r["other_ms"] == pytest.approx(0.04, abs=1e-6)
    assert [r["queue_ms"] for r in group["slowest"]] == pytest.approx([0.039, 0.038])
    assert sum(b["count"] for b in group["bands"]) == 40
    width, height = _png_size(tmp_path / "spans.jsonl.png")  # the default: next to the input
    assert width > 100 and height > 100


def test_cli_png_path_and_no_png(tmp_path: Path, writer: SpanWriter) -> None:
    path = tmp_path / "spans.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in writer.spans))
    png = tmp_path / "plots" / "bands.png"
    assert main(["trace-report", str(path), "--png", str(png)]) == 0
    assert _png_size(png)[0] > 100
    assert main(["trace-report", str(path), "--no-png"]) == 0
    assert not (tmp_path / "spans.jsonl.png").exists()


def test_cli_without_matplotlib_still_prints(
    tmp_path: Path, writer: SpanWriter, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    path = tmp_path / "spans.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in writer.spans[:200]))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` -> ImportError
    assert main(["trace-report", str(path)]) == 0
    captured = capsys.readouterr()
    assert "pip install 'batchwire[loadtest]'" in captured.err
    assert "model digits" in captured.out
    assert not (tmp_path / "spans.jsonl.png").exists()


def test_cli_fails_on_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace-report", str(tmp_path / "nope.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err
