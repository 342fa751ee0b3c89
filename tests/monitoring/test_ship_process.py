"""The trace shipper process: the same spans as the in-process shipper, the SLO feed kept
in the server, a fallback when the process dies, and its exit on shutdown."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from batching.batcher import ExecutedBatch
from batchwire.types import RequestTiming
from monitoring import spans as S
from monitoring.tracing import (
    RequestSpanProcessor,
    RequestTracer,
    TracingSettings,
    monotonic_to_epoch_offset_ns,
)

METHOD = "inference.GRPCInferenceService/ModelInfer"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")]


class Models(RequestSpanProcessor):
    """Counts the requests the fast path hands over, by status."""

    def __init__(self) -> None:
        self.statuses: list[str] = []

    def on_request_end(self, model: str, status: str, duration_ns: int) -> None:
        self.statuses.append(status)


def record_traffic(tracer: RequestTracer, requests: int) -> None:
    """CPU-lane requests (packed; some with request ids, one continuing a traceparent, one
    failed), a batched request and its batch (tuple records)."""
    t = 1_000_000
    for i in range(requests):
        tracer.record_request(
            TRACEPARENT if i == 7 else None, METHOD, "digits", "1", "cpu", 1 + i % 2,
            f"r{i}" if i % 3 == 0 else "", "INTERNAL" if i == 11 else "OK",
            t + i, t + i + 100, t + i + 200, t + i + 300, t + i + 400, t + i + 500,
        )  # fmt: skip
    handle = tracer.begin(None)  # (unsampled, its batch is not recorded)
    timing = RequestTiming(
        queued_ns=t + 10, compute_start_ns=t + 50, compute_end_ns=t + 90, batch_samples=2,
        batch_requests=1,
    )  # fmt: skip
    tracer.record_batch("digits", "1", ExecutedBatch(
        name="digits/1", inputs={}, outputs={}, samples=2, padded_samples=4, member_samples=[2],
        traces=[handle.link], start_ns=t + 50, end_ns=t + 90, error=None,
    ))  # fmt: skip
    tracer.end_request(
        handle, METHOD, "digits", "1", "batched", 2, "b", "OK", t, t + 5, timing, t + 95, t + 99
    )


def shape(path: Path) -> list[tuple[Any, ...]]:
    """The spans of a JSON-lines file with their ids replaced by what they refer to: each
    span's fields, its parent's name (or the incoming parent), and its links' targets'
    names, sorted (ids are drawn independently by each tracer)."""
    spans = [json.loads(line) for line in path.read_text().splitlines()]
    names = {s["span_id"]: s["name"] for s in spans}
    out = []
    for s in spans:
        parent = s["parent_span_id"]
        links = [(names.get(link["span_id"]), link["attributes"][S.REQUEST_SAMPLES])
                 for link in s.get("links", [])]  # fmt: skip
        out.append((
            s["name"], s["kind"], s.get("status", "UNSET"), s["start_ns"], s["end_ns"],
            json.dumps(s.get("attributes", {}), sort_keys=True),
            s["trace_id"] if s["trace_id"] == TRACE_ID else "",
            parent if parent == PARENT_ID else names.get(parent), tuple(sorted(links)),
        ))  # fmt: skip
    return sorted(out)


def test_the_shipper_process_writes_what_the_shipper_thread_writes(tmp_path: Path) -> None:
    """The same records give the same spans (names, times, attributes, parents, links)
    whether the server's thread or its shipper process encodes them."""
    offset = monotonic_to_epoch_offset_ns()
    counts = {}
    for shipper in ("process", "thread"):
        settings = TracingSettings(
            trace_file=tmp_path / f"{shipper}.jsonl", flush_interval_s=3600, shipper=shipper
        )
        tracer = RequestTracer(settings, offset_ns=offset)
        try:
            assert (tracer.shipper_pid is not None) == (shipper == "process")
            record_traffic(tracer, 3000)
            tracer.flush()
            counts[shipper] = tracer.exported_spans
        finally:
            tracer.shutdown()
    process, thread = shape(tmp_path / "process.jsonl"), shape(tmp_path / "thread.jsonl")
    assert process == thread
    # 3,000 CPU-lane requests of 4 spans; a batched one of 3 (decode, queue, encode) + 1;
    # a batch and its engine span.
    assert len(process) == counts["process"] == counts["thread"] == 3000 * 4 + 4 + 2
    continued = [s for s in process if s[6] == TRACE_ID and s[1] == "SERVER"]
    assert len(continued) == 1 and continued[0][7] == PARENT_ID


def test_every_request_reaches_the_span_processors_in_the_server(tmp_path: Path) -> None:
    """With a shipper process, the server's shipper thread still hands every request,
    sampled or not, to the `RequestSpanProcessor`s (the SLO monitor's): they live here."""
    models = Models()
    settings = TracingSettings(
        sampling_ratio=0.5, trace_file=tmp_path / "s.jsonl", flush_interval_s=3600
    )
    tracer = RequestTracer(settings, processors=[models])
    try:
        assert tracer.shipper_pid is not None
        record_traffic(tracer, 1000)
        tracer.flush()
    finally:
        tracer.shutdown()
    assert sorted(models.statuses) == ["INTERNAL"] + ["OK"] * 1000
    servers = [s for s in shape(tmp_path / "s.jsonl") if s[1] == "SERVER"]
    assert 350 < len(servers) < 650  # about half sampled


def test_the_shipper_process_runs_at_the_lowest_priority(tmp_path: Path) -> None:
    tracer = RequestTracer(TracingSettings(trace_file=tmp_path / "s.jsonl", flush_interval_s=3600))
    try:
        record_traffic(tracer, 10)
        tracer.flush()  # answered: the process is up and in its loop
        pid = tracer.shipper_pid
        assert pid is not None
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    finally:
        tracer.shutdown()


def test_a_dead_shipper_process_is_replaced_by_shipping_in_process(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """If the shipper process dies, the server logs it and ships in its own thread from
    then on: later spans still reach the file."""
    path = tmp_path / "s.jsonl"
    tracer = RequestTracer(TracingSettings(trace_file=path, flush_interval_s=3600))
    try:
        record_traffic(tracer, 10)
        tracer.flush()
        pid = tracer.shipper_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)  # dead (left for Popen to reap)
        before = tracer.exported_spans
        for i in range(100):  # CPU-lane requests only: all taken, then found undeliverable
            tracer.record_request(None, METHOD, "digits", "1", "cpu", 1, "", "OK",
                                  i, i + 1, i + 2, i + 3, i + 4, i + 5)  # fmt: skip
        tracer.flush()  # the process is found dead: this shipment is lost
        assert tracer.shipper_pid is None
        assert "shipping in-process from now on" in caplog.text
        record_traffic(tracer, 100)
        tracer.flush()
    finally:
        tracer.shutdown()
    assert tracer.exported_spans == before + 100 * 4 + 6
    lines = path.read_text().splitlines()
    assert len(lines) == tracer.exported_spans


def test_the_shipper_process_exits_on_shutdown(tmp_path: Path) -> None:
    tracer = RequestTracer(TracingSettings(trace_file=tmp_path / "s.jsonl", flush_interval_s=3600))
    pid = tracer.shipper_pid
    assert pid is not None
    record_traffic(tracer, 10)
    tracer.shutdown()  # ships, closes the process's stdin, waits for it
    assert tracer.shipper_pid is None
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 10 * 4 + 6
    with pytest.raises(ChildProcessError):  # reaped: no longer a child of this process
        os.waitpid(pid, os.WNOHANG)


def test_an_unwritable_trace_file_fails_when_the_tracer_is_made(tmp_path: Path) -> None:
    """The shipper process opens the file, but the server finds out first."""
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError):
        RequestTracer(TracingSettings(trace_file=tmp_path / "file" / "s.jsonl"))


def test_the_command_line_picks_the_shipper() -> None:
    """`batchwire serve --trace-shipper`: the process by default, passed on to workers."""
    from batchwire.cli import _monitoring_argv, build_parser, monitoring_settings

    parser = build_parser()
    for flags, expected in (([], "process"), (["--trace-shipper", "thread"], "thread")):
        args = parser.parse_args(["serve", "--trace-sampling", "1", *flags])
        settings = monitoring_settings(args)
        assert settings is not None and settings.tracing is not None
        assert settings.tracing.shipper == expected
        args.workers = 2
        for argv in _monitoring_argv(args):
            assert argv[argv.index("--trace-shipper") + 1] == expected
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--trace-shipper", "fork"])
