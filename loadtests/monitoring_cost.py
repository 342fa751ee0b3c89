"""What each monitoring setting costs per request, measured in-process.

    python -m loadtests.monitoring_cost [--blocks 15] [--calls 2000] [--end-to-end]

`monitoring_overhead` measures throughput ratios end to end; on this shared 2-core box
one run's ratio spreads by +-10%, which cannot settle a 2% target. This benchmark measures
the cost itself: the CPU time of the thread that calls `ModelInfer` of `mlp64` (a
CPU-lane model: the inline fast path answers without awaiting) on one server per setting,
all in this process, with no network and no load generator. Settings alternate in blocks
of `--calls` calls (the same 256 in-distribution inputs as `monitoring_overhead`); a
traced setting's block ends with `tracer.flush()`, so the shipping of its spans (encoding,
and for OTLP the export call to a receiver in this process) is counted on the same thread
(the tracer's own thread is parked). What is not counted: work done once a second (SLO and
drift evaluation, metrics scrapes), and the receiver's side of the OTLP export.

With `--end-to-end` it also measures the CPU of the event-loop thread of a real
`--no-monitoring` server per request at concurrency 32 (perf_analyzer; /proc over the
ModelStatistics count), which is what bounds throughput there (the loop holds the GIL),
and prints each setting's estimated throughput ratio `loop / (loop + added)`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loadtests.monitoring_overhead import INPUT_ROWS, TARGETS, mlp64_with_drift, write_results
from loadtests.perf_analyzer import DEFAULT_TOOL, ROOT, launch_server, run_perf_analyzer

MODEL = "mlp64"


class _Context:
    """The two things the inline path asks of a `grpc.aio.ServicerContext`."""

    def invocation_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> None:
        return None


def _requests(inputs: Path) -> list[Any]:
    """`monitoring_overhead`'s perf_analyzer inputs as ModelInferRequests."""
    from protos import grpc_service_pb2 as pb

    requests = []
    for step in json.loads(inputs.read_text())["data"]:
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 64])
        request.raw_input_contents.append(
            np.asarray(step["INPUT"]["content"], np.float32).tobytes()
        )
        requests.append(request)
    return requests


async def measure(blocks: int, calls: int, work: Path) -> dict[str, list[float]]:
    """Median-ready samples: µs of thread CPU per call, per setting and block."""
    from loadtests.otlp_sink import OtlpSink
    from monitoring.hub import MonitoringSettings
    from monitoring.tracing import TracingSettings
    from server.app import ServeSettings, start_server

    repository, inputs = work / "repo", work / "inputs.json"
    mlp64_with_drift(repository, inputs)
    sink = OtlpSink(keep_spans=False)

    def traced(ratio: float, **where: Any) -> MonitoringSettings:
        # NOTE: the shipper thread: the flush's encoding is then CPU time of this process,
        # counted with the calling thread's (a shipper process's would go uncounted).
        tracing = TracingSettings(
            sampling_ratio=ratio, flush_interval_s=3600, shipper="thread", **where
        )
        return MonitoringSettings(metrics_port=None, tracing=tracing)

    settings: dict[str, MonitoringSettings | None] = {
        "off": None,
        "metrics+slo+drift": MonitoringSettings(metrics_port=None),
        "tracing 10% file": traced(0.1, trace_file=work / "s10.jsonl"),
        "tracing 100% file": traced(1.0, trace_file=work / "spans.jsonl"),
        "tracing 100% otlp": traced(1.0, otlp_endpoint=sink.endpoint),
    }
    servers = {
        name: await start_server(
            ServeSettings(model_repository=repository, port=0, monitoring=monitoring)
        )
        for name, monitoring in settings.items()
    }
    requests = _requests(inputs)
    context = _Context()
    samples: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _ in range(blocks):
            for name, server in servers.items():
                handler = server.servicer.ModelInfer
                tracer = server.monitoring.tracer if server.monitoring else None
                started = time.thread_time_ns()
                for i in range(calls):
                    call = handler(requests[i % INPUT_ROWS], context)
                    try:
                        call.send(None)
                    except StopIteration:
                        pass
                    else:  # pragma: no cover - the inline path never awaits
                        raise RuntimeError("ModelInfer awaited: not the inline path")
                if tracer is not None:
                    tracer.flush()
                samples[name].append((time.thread_time_ns() - started) / calls / 1000)
            await asyncio.sleep(0)  # let the servers' own tasks run between blocks
    finally:
        for server in servers.values():
            await server.stop(1.0)
        sink.stop()
    return samples


def loop_cpu_per_request(tool: Path, concurrency: int, work: Path) -> float:
    """µs of the event-loop thread's CPU per request of a `--no-monitoring` server at
    `concurrency` (perf_analyzer), over the requests its ModelStatistics counted."""
    import grpc

    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pb_grpc

    repository, inputs = work / "repo", work / "inputs.json"
    proc, address, _ = launch_server(repository, "--no-monitoring")
    tick = os.sysconf("SC_CLK_TCK")

    def loop_ticks() -> int:
        stat = Path(f"/proc/{proc.pid}/task/{proc.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()  # after the thread's name
        return int(fields[11]) + int(fields[12])  # utime + stime

    try:
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            def count() -> int:
                stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL))
                return sum(s.inference_count for s in stats.model_stats)

            before, ticks = count(), loop_ticks()
            run_perf_analyzer(tool, address, concurrency, 3000, model=MODEL, input_data=inputs)
            ticks, served = loop_ticks() - ticks, count() - before
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return ticks / tick / served * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--blocks", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--end-to-end", action="store_true")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tool", type=Path, default=DEFAULT_TOOL)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "loadtests" / "results" / "monitoring_cost.json"
    )
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="batchwire-cost-"))
    samples = asyncio.run(measure(args.blocks, args.calls, work))
    loop_us = loop_cpu_per_request(args.tool, args.concurrency, work) if args.end_to_end else None
    base = statistics.median(samples["off"])
    print(
        f"{MODEL}, ModelInfer called in-process, thread CPU per call, median of {args.blocks}"
        f" blocks of {args.calls}"
        + (
            ""
            if loop_us is None
            else f"; event loop of a --no-monitoring server at "
            f"concurrency {args.concurrency}: {loop_us:.0f} µs per request"
        )  # fmt: skip
    )
    print(f"{'setting':>20} {'µs/call':>8} {'added':>7} {'est. ratio':>10} {'target':>7}")
    table = []
    for name, values in samples.items():
        median = statistics.median(values)
        added = median - base
        ratio = None if loop_us is None else loop_us / (loop_us + added)
        target = TARGETS.get(name)
        verdict = ""
        if ratio is not None and target is not None:
            verdict = "met" if ratio >= target else "MISSED"
        print(
            f"{name:>20} {median:>8.2f} {added:>+7.2f} "
            f"{'' if ratio is None else f'{ratio:.3f}':>10} "
            f"{'' if target is None else f'>={target}':>7} {verdict}"
        )
        table.append(
            {"setting": name, "median_us_per_call": median, "added_us": added,
             "estimated_ratio": ratio, "target_ratio": target, "blocks_us": values}
        )  # fmt: skip
    write_results(
        args.out, "loadtests.monitoring_cost", argv, loop_us_per_request=loop_us, results=table
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
