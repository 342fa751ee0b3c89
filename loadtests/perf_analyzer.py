"""Run Triton's `perf_analyzer` against a batchwire server and record a table + JSON.

    python -m loadtests.perf_analyzer --model digits --concurrency 1 32 [--runs 3]
        [--address 127.0.0.1:PORT | --model-repository DIR] [--batch-size 1]
        [--out loadtests/results/perf_analyzer_digits.json]

Without `--address` it starts `batchwire serve --port 0` on the repository and stops it
afterwards. Each concurrency is measured `--runs` times; the table shows the median run
(by throughput) and the JSON keeps every run. Install the tool first: `make perf-analyzer`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOOL = ROOT / ".perf-analyzer" / "perf_analyzer"


#: Bound on one perf_analyzer process (its own windows end far sooner; -s 50 may retry).
PERF_ANALYZER_TIMEOUT_S: Final = 300
_SERVER_COUNTS: Final = re.compile(r"Inference count: (\d+)\s+Execution count: (\d+)")


def perf_analyzer_command(
    tool: Path,
    address: str,
    concurrency: int,
    interval_ms: int,
    report: Path,
    *,
    model: str,
    batch_size: int = 1,
    input_data: Path | None = None,
) -> list[str]:
    """perf_analyzer's command line for one measurement of `model` at one concurrency.

    `input_data`: a JSON file of request inputs (`--input-data`); None = perf_analyzer's
    default, one random tensor per input generated once and sent with every request.
    """
    return [
        str(tool), "-m", model, "-i", "grpc", "-u", address, "-b", str(batch_size),
        "--concurrency-range", str(concurrency), "-s", "50", "--percentile", "99",
        "-p", str(interval_ms),
        *(["--input-data", str(input_data)] if input_data is not None else []),
        "-f", str(report),
    ]  # fmt: skip


def parse_report(csv_text: str, stdout: str) -> dict[str, Any]:
    """One perf_analyzer run as numbers: the CSV row, plus mean batch size from its stdout.

    Server-side columns exist only when the server answers ModelStatistics; they are None
    otherwise, as is the mean batch size.
    """
    row = next(csv.DictReader(csv_text.splitlines()))

    def column(name: str) -> float | None:
        value = row.get(name)
        return float(value) if value not in (None, "") else None

    counts = _SERVER_COUNTS.search(stdout)
    mean_batch = None
    if counts and int(counts.group(2)) > 0:
        mean_batch = int(counts.group(1)) / int(counts.group(2))
    return {
        "throughput_infer_s": float(row["Inferences/Second"]),
        "p50_us": float(row["p50 latency"]),
        "p90_us": column("p90 latency"),
        "p99_us": float(row["p99 latency"]),
        "server_queue_us": column("Server Queue"),
        "server_compute_infer_us": column("Server Compute Infer"),
        "mean_batch_size": mean_batch,
    }


def run_perf_analyzer(
    tool: Path,
    address: str,
    concurrency: int,
    interval_ms: int,
    *,
    model: str,
    batch_size: int = 1,
    input_data: Path | None = None,
) -> dict[str, Any]:
    """One bounded perf_analyzer measurement; raises RuntimeError when it fails."""
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        report = Path(tmp) / "report.csv"
        cmd = perf_analyzer_command(
            tool, address, concurrency, interval_ms, report, model=model,
            batch_size=batch_size, input_data=input_data,
        )  # fmt: skip
        # Other work on this shared box shows here (2 cores: above ~2 means contention).
        load_avg_1m = os.getloadavg()[0]
        started = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PERF_ANALYZER_TIMEOUT_S)
        wall_s = time.monotonic() - started
        if proc.returncode != 0 or not report.exists():
            output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            raise RuntimeError(f"perf_analyzer failed ({proc.returncode}):\n{output}")
        result = parse_report(report.read_text(), proc.stdout)
    return {
        "command": " ".join(cmd[:-1] + ["report.csv"]),
        "concurrency": concurrency,
        "wall_s": round(wall_s, 2),
        "load_avg_1m_before": round(load_avg_1m, 2),
        **result,
    }


def launch_server(repository: Path, *extra: str) -> tuple[subprocess.Popen[str], str, str]:
    """Start `batchwire serve --port 0 --metrics-port 0 [extra...]`; return it, its address
    and its models line.

    Raises:
        RuntimeError: the server exits or prints something else first (it is killed).
    """
    proc, line = launch_module(
        ["batchwire", "--log-level", "WARNING", "serve", "--model-repository", str(repository),
         "--port", "0", "--metrics-port", "0", *extra],
        "serving on", "server",
    )  # fmt: skip
    return proc, line.split()[3], line.split("models:", 1)[1].split(";", 1)[0].strip()


def launch_module(args: list[str], ready: str, what: str) -> tuple[subprocess.Popen[str], str]:
    """Start `python -m ARGS...` in the repository and read its first line, which must
    contain `ready`; return the process (its stdout still open) and that line.

    Raises:
        RuntimeError: it exits or prints something else first (it is killed).
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if ready not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"{what} did not start: {line!r}")
    return proc, line


def pin_process(pid: int, cpus: set[int]) -> None:
    """Confine every thread of process `pid` to `cpus` (threads it starts later inherit
    the pinning of the thread that starts them).

    For `monitoring_overhead --server-cpus`: on a 2-core box shared with perf_analyzer,
    one unpinned server process's throughput can differ from the next one's (same
    setting) by tens of percent, depending on where the scheduler puts the event loop,
    grpc's poller thread and perf_analyzer (BENCHMARKS.md, "Monitoring overhead").
    """
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def parse_cpus(text: str) -> set[int] | None:
    """`--server-cpus` values: `all` (no pinning, None) or a comma-separated list of CPUs
    this machine has (e.g. `0` or `0,1`).

    Raises:
        ValueError: not `all`, not a list of integers, or a CPU this process cannot use.
    """
    if text == "all":
        return None
    cpus = {int(part) for part in text.split(",")}
    allowed = os.sched_getaffinity(0)
    if not cpus or not cpus <= allowed:
        raise ValueError(f"CPUs {sorted(cpus)} are not all among those available {sorted(allowed)}")
    return cpus


def start_server(repository: Path) -> tuple[subprocess.Popen[str], str]:
    """Start `batchwire serve --port 0` and return it with its address."""
    proc, address, _ = launch_server(repository)
    return proc, address


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="digits")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--interval-ms", type=int, default=3000)
    parser.add_argument("--address", help="an already running server (default: start one)")
    parser.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--tool", type=Path, default=DEFAULT_TOOL)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    server = None
    address = args.address
    if address is None:
        server, address = start_server(args.model_repository)
    results: list[dict[str, Any]] = []
    try:
        for concurrency in args.concurrency:
            runs = [
                run_perf_analyzer(
                    args.tool,
                    address,
                    concurrency,
                    args.interval_ms,
                    model=args.model,
                    batch_size=args.batch_size,
                )  # fmt: skip
                for _ in range(args.runs)
            ]
            median = sorted(runs, key=lambda r: r["throughput_infer_s"])[len(runs) // 2]
            results.append({"concurrency": concurrency, "median": median, "runs": runs})
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)

    print(f"perf_analyzer -m {args.model} -i grpc -b {args.batch_size}, median of {args.runs} runs")
    print(
        f"{'concurrency':>11} {'infer/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'all runs infer/s':>30}"
    )
    for r in results:
        m = r["median"]
        every = ", ".join(f"{x['throughput_infer_s']:.0f}" for x in r["runs"])
        print(
            f"{r['concurrency']:>11} {m['throughput_infer_s']:>10.0f} {m['p50_us'] / 1000:>8.2f}"
            f" {m['p99_us'] / 1000:>8.2f} {every:>30}"
        )
    out = args.out or ROOT / "loadtests" / "results" / f"perf_analyzer_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "model": args.model, "batch_size": args.batch_size, "results": results,
    }, indent=2))  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
