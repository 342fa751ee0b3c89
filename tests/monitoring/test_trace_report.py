"""`batchwire trace-report`: joins, percentile bands, slowest requests, files and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batchwire.cli import main
from batchwire.types import RequestTiming
from monitoring.trace_report import bands, build_report, join, load_spans
from monitoring.tracing import JsonLinesSpanExporter, RequestTracer, TracingSettings

MS = 1_000_000
METHOD = "inference.GRPCInferenceService/ModelInfer"


def span(
    span_id: str,
    name: str,
    start_ms: float,
    end_ms: float,
    *,
    parent: str | None = None,
    kind: str = "INTERNAL",
    attributes: dict[str, Any] | None = None,
    links: list[dict[str, Any]] | None = None,
    trace_id: str = "t",
) -> dict[str, Any]:
    return {"trace_id": trace_id, "span_id": span_id, "parent_span_id": parent, "name": name,
            "kind": kind, "start_ns": int(start_ms * MS), "end_ns": int(end_ms * MS),
            "status": "UNSET", "attributes": attributes or {}, "links": links or [],
            "resource": {}}  # fmt: skip


def batched_request(i: int, queue_ms: float, model: str = "digits") -> list[dict[str, Any]]:
    """Server span i: decode 0.1, queue `queue_ms`, (compute in its batch), encode 0.1."""
    sid = f"s{i}"
    total = 0.1 + queue_ms + 1.0 + 0.1 + 0.2  # 0.2 ms "other"
    attrs = {"batchwire.model.name": model, "batchwire.lane": "batched",
             "rpc.response.status_code": "OK"}  # fmt: skip
    return [
        span(sid, METHOD, 0, total, kind="SERVER", attributes=attrs, trace_id=f"t{i}"),
        span(f"{sid}d", "decode", 0, 0.1, parent=sid),
        span(f"{sid}q", "queue", 0.1, 0.1 + queue_ms, parent=sid),
        span(f"{sid}e", "encode", total - 0.3, total - 0.2, parent=sid),
    ]


def batch(batch_id: str, members: list[int], engine_ms: float = 1.0) -> list[dict[str, Any]]:
    links = [{"trace_id": f"t{i}", "span_id": f"s{i}",
              "attributes": {"batchwire.request.samples": 2}} for i in members]  # fmt: skip
    attrs = {"batchwire.batch.size": 2 * len(members), "batchwire.batch.padded_size": 2 *
             len(members), "batchwire.batch.requests": len(members)}  # fmt: skip
    return [
        span(batch_id, "batch", 5, 5 + engine_ms, attributes=attrs, links=links),
        span(f"{batch_id}x", "engine", 5, 5 + engine_ms, parent=batch_id),
    ]


@pytest.fixture
def spans() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(100):  # queue times 0..99 ms: the bands split them exactly
        out += batched_request(i, float(i))
    for b in range(10):
        out += batch(f"b{b}", list(range(b * 10, b * 10 + 10)))
    return out


def test_join_finds_every_component(spans: list[dict[str, Any]]) -> None:
    requests = {r.span_id: r for r in join(spans)}
    assert len(requests) == 100
    r = requests["s7"]
    assert r.decode_ms == pytest.approx(0.1) and r.queue_ms == pytest.approx(7.0)
    assert r.compute_ms == pytest.approx(1.0) and r.encode_ms == pytest.approx(0.1)
    assert r.other_ms == pytest.approx(0.2, abs=1e-5)  # ns rounding of the fixture
    assert r.batch is not None and r.batch.span_id == "b0" and r.batch.requests == 10


def test_bands_split_by_rank_and_average_each_component(spans: list[dict[str, Any]]) -> None:
    result = {b.label: b for b in bands(join(spans))}
    assert [result[k].count for k in ("p0-p50", "p50-p90", "p90-p99", "p99-p99.9")] == [
        50, 40, 9, 1,
    ]  # fmt: skip
    assert result["p0-p50"].mean_ms["queue"] == pytest.approx(24.5)  # mean of 0..49
    assert result["p99-p99.9"].mean_ms["queue"] == pytest.approx(99.0)
    assert result["p0-p50"].mean_ms["compute"] == pytest.approx(1.0)
    assert result["p99-p99.9"].mean_total_ms == pytest.approx(0.1 + 99 + 1 + 0.1 + 0.2)


def test_slowest_requests_name_their_batch(spans: list[dict[str, Any]]) -> None:
    report = build_report(spans, top=3)
    slowest = report["models"]["digits"]["slowest"]
    assert [r["span_id"] for r in slowest] == ["s99", "s98", "s97"]
    assert slowest[0]["batch"]["span_id"] == "b9"


def test_cpu_lane_and_missing_batches(spans: list[dict[str, Any]]) -> None:
    attrs = {"batchwire.model.name": "mlp64", "batchwire.lane": "cpu",
             "rpc.response.status_code": "OK"}  # fmt: skip
    lane = [span("c1", METHOD, 0, 1.0, kind="SERVER", attributes=attrs),
            span("c1x", "engine", 0.2, 0.5, parent="c1")]  # fmt: skip
    orphan = batched_request(500, 3.0)  # no batch span links to it
    report = build_report([*spans, *lane, *orphan])
    assert report["models"]["mlp64"]["slowest"][0]["compute_ms"] == pytest.approx(0.3)
    assert report["models"]["digits"]["missing_compute"] == 1
    assert build_report(spans, model="mlp64")["models"] == {}


def test_malformed_lines_are_counted(tmp_path: Path, spans: list[dict[str, Any]]) -> None:
    path = tmp_path / "spans.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in spans[:8]) + "\nnot json\n{}\n\n")
    loaded, malformed = load_spans([path])
    assert len(loaded) == 8 and malformed == 2


def test_cli_reads_a_real_tracer_file_and_writes_png_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "spans.jsonl"
    tracer = RequestTracer(TracingSettings(flush_interval_s=3600),
                           exporter=JsonLinesSpanExporter(path))  # fmt: skip
    try:
        for i in range(20):
            timing = RequestTiming(queued_ns=1_000, compute_start_ns=1_000 + i * 1000,
                                   compute_end_ns=2_000 + i * 1000, batch_samples=1,
                                   batch_requests=1)  # fmt: skip
            tracer.end_request(tracer.begin(None), METHOD, "digits", "1", "batched", 1, "", "OK",
                               0, 500, timing, 3_000 + i * 1000, 4_000 + i * 1000)  # fmt: skip
    finally:
        tracer.shutdown()
    out_json, png = tmp_path / "report.json", tmp_path / "report.png"
    assert main(["trace-report", str(path), "--json", str(out_json), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "model digits: 20 requests" in text and "p0-p50" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out_json.read_text())
    assert report["models"]["digits"]["requests"] == 20
    # No batch spans were recorded here, so compute is unknown for every request.
    assert report["models"]["digits"]["missing_compute"] == 20


def test_cli_fails_on_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace-report", str(tmp_path / "nope.jsonl")]) == 1
    assert "no such file" in capsys.readouterr().err
