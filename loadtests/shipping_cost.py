"""What the trace shipper spends per CPU-lane request it exports, with nothing else running.

    python -m loadtests.shipping_cost [--records 3200] [--rounds 30] [--instructions]

Records `--records` CPU-lane requests as the inline lane does (`record_request`, packed,
100% sampled, the times of one request in a 200 ms window), then has another thread run
`RequestTracer.flush` on them, as the shipper does: once per round, for the JSON-lines
file (on /dev/shm where there is one, so that the disk's writeback does not count) and
for OTLP (the payloads built and dropped: the export call and the collector do not count).
Prints, per exporter, the flushing thread's CPU time and minor page faults per record
(medians of the rounds). With `--instructions` it also counts the instructions of three
flushes under valgrind's callgrind (`callgrind_control`, this process re-run under it),
which repeat to a few per record where CPU times move by 5-10% on this shared box: the
measure to compare commits by (BENCHMARKS.md, "Eighth session").

In a loaded server the same flush costs about twice its CPU time here (the records and
the encoder's tables are no longer in the shipper's caches), and the event loop slows
down by more than that (BENCHMARKS.md, "Seventh session"); this isolates the shipper's
own work.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from loadtests.monitoring_overhead import write_results
from loadtests.perf_analyzer import ROOT

EXPORTERS = ("file", "otlp")
METHOD = "inference.GRPCInferenceService/ModelInfer"


def _tracer(exporter: str, work: Path) -> Any:
    from opentelemetry.sdk.trace.export import SpanExportResult

    from monitoring.tracing import OtlpPayloadExporter, RequestTracer, TracingSettings

    class Dropped(OtlpPayloadExporter):
        """Builds every payload as the OTLP exporter gets it, and drops it."""

        def export_payload(self, payload: bytes, spans: int) -> SpanExportResult:
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    if exporter == "file":
        return RequestTracer(
            TracingSettings(
                sampling_ratio=1.0, flush_interval_s=3600, trace_file=work / "spans.jsonl"
            )
        )
    return RequestTracer(
        TracingSettings(sampling_ratio=1.0, flush_interval_s=3600), exporter=Dropped()
    )


def record(tracer: Any, records: int) -> None:
    """`records` CPU-lane requests, as `_inline_infer` records them (one metadata entry)."""
    metadata = (("user-agent", "grpc-c++/1.67.0"),)
    start = time.monotonic_ns()
    step = 200_000_000 // max(records, 1)  # spread over one 200 ms shipping interval
    for i in range(records):
        t = start + i * step
        compute = (t + 20_000, t + 60_000)  # decode 20 µs, engine 40 µs, encode 10 µs
        tracer.record_request(metadata, METHOD, "mlp64", "1", "cpu", 1, "", "OK", t,
                              compute[0], *compute, compute[1], t + 70_000)  # fmt: skip


def _in_thread(tracer: Any) -> tuple[float, int]:
    """Flush in a thread of its own (the shipper's arena and caches); its CPU seconds and
    minor faults."""
    out: list[tuple[float, int]] = []

    def flush() -> None:
        faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        cpu = time.thread_time()
        tracer.flush()
        out.append(
            (
                time.thread_time() - cpu,
                resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults,
            )
        )

    shipper = threading.Thread(target=flush)
    shipper.start()
    shipper.join()
    return out[0]


def measure_cpu(exporter: str, records: int, rounds: int, work: Path) -> dict[str, float]:
    """Medians over the rounds (after one warm-up): µs of CPU and minor faults a record."""
    tracer = _tracer(exporter, work)
    try:
        record(tracer, records)
        _in_thread(tracer)
        cpu, faults = [], []
        for _ in range(rounds):
            record(tracer, records)
            seconds, faulted = _in_thread(tracer)
            cpu.append(seconds / records * 1e6)
            faults.append(faulted / records)
            if exporter == "file":  # empty it (appended to: the exporter's handle goes on)
                os.truncate(work / "spans.jsonl", 0)
    finally:
        tracer.shutdown()
    return {"cpu_us": statistics.median(cpu), "minor_faults": statistics.median(faults)}


def measure_instructions(exporter: str, records: int, work: Path) -> float:
    """Instructions a record of three flushes (median), counted by callgrind in a re-run of
    this module under valgrind."""
    out_dir = work / f"callgrind-{exporter}"
    out_dir.mkdir()
    result = work / f"instructions-{exporter}.txt"
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no",
        f"--callgrind-out-file={out_dir}/callgrind.%p", sys.executable, "-m",
        "loadtests.shipping_cost", "--child", exporter, "--records", str(records),
        "--work", str(work), "--result", str(result),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0 or not result.exists():
        raise RuntimeError(f"{exporter}: the run under callgrind failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(out_dir)
    return float(result.read_text())


def child(exporter: str, records: int, work: Path, result: Path) -> None:
    """Under callgrind: count three flushes of `records` (after one uncounted)."""
    from loadtests.monitoring_instructions import Callgrind

    callgrind = Callgrind(work / f"callgrind-{exporter}")
    tracer = _tracer(exporter, work / "child")
    try:
        record(tracer, records)
        tracer.flush()
        callgrind.control("-i", "on")
        counts = []
        for _ in range(3):
            record(tracer, records)
            callgrind.control("-z")
            tracer.flush()
            counts.append(callgrind.dump_now()[0] / records)
    finally:
        tracer.shutdown()
    result.write_text(str(statistics.median(counts)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--records", type=int, default=3200)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--instructions", action="store_true",
                        help="also count instructions (needs valgrind)")  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=ROOT / "loadtests" / "results" / "shipping_cost.json"
    )
    parser.add_argument("--child", choices=EXPORTERS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.records < 1 or args.rounds < 1:
        parser.error("--records and --rounds must be at least 1")
    if args.child is not None:
        child(args.child, args.records, args.work, args.result)
        return 0
    if args.instructions and shutil.which("callgrind_control") is None:
        parser.error("--instructions needs valgrind (Debian: apt-get install valgrind)")
    shm = Path("/dev/shm")
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(
        prefix="batchwire-shipping-", dir=shm if shm.is_dir() else None
    ) as tmp:
        work = Path(tmp)
        for exporter in EXPORTERS:
            results[exporter] = measure_cpu(exporter, args.records, args.rounds, work)
            if args.instructions:
                results[exporter]["instructions"] = measure_instructions(
                    exporter, args.records, work
                )
    print(f"{args.records} packed CPU-lane records (4 spans each) flushed by a thread, "
          f"medians of {args.rounds} rounds; per record:")  # fmt: skip
    print(f"{'exporter':>9} {'CPU µs':>7} {'minor faults':>13} {'instructions':>13}")
    for exporter, r in results.items():
        counted = f"{r['instructions']:,.0f}" if "instructions" in r else "-"
        print(f"{exporter:>9} {r['cpu_us']:>7.2f} {r['minor_faults']:>13.3f} {counted:>13}")
    write_results(args.out, "loadtests.shipping_cost", argv, records=args.records,
                  rounds=args.rounds, results=results)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
