"""What monitoring costs per request, in instructions counted by valgrind's callgrind.

    python -m loadtests.monitoring_instructions [--pairs 4] [--requests 3000] [--otlp]
        [--only SETTING ...] [--rate 6000]

`monitoring_paired` measures the throughput ratio itself, but on this shared 2-core box a
phase's throughput moves by several percent from one second to the next, and 90 pairs
still leave a 95% interval about 5 points wide: too wide to tell a 2% cost from a 4% one.
Instruction counts do not move with the host. For each setting this runs one in-process
server (built as `monitoring_paired` builds it) under `valgrind --tool=callgrind`, loads
it with perf_analyzer (outside valgrind, `mlp64` at concurrency 32, the same 256 inputs)
and counts the instructions the whole server process executes (every thread) over phases
of `--requests` requests with its monitoring switched on and off, in pairs, as
`monitoring_paired` switches it (on-off, then off-on). A pair's ratio is the instructions
per request without monitoring over those with it: what the throughput ratio would be if
an instruction cost the same time in both phases. That is the assumption to keep in mind:
cache misses are not counted, and work that stalls on memory costs more than its count;
numpy's vectorised loops run several instructions a cycle where the interpreter runs one
or two, so numpy-heavy work (drift scores, span encoding) costs less than its count.

Under valgrind the server runs about ten times slower, so what monitoring does per unit of
*time* is rescaled to the same share of requests as at `--rate` requests a second (what
this box serves without valgrind):

- drift's sample budget (`max_samples_per_s`) is divided by the slowdown measured during
  the warm-up, and the CPU lane's `lane_stride` is re-estimated over two seconds of it, so
  the same share of requests reaches the drift monitor as at `--rate`;
- spans are encoded in the server's shipper thread (`--trace-shipper thread`): the
  default shipper process's instructions would not be counted, so the count includes the
  encoding that process takes off the server;
- the trace shipper's cadence (every 200 ms) is replaced by a flush every `--rate / 5`
  requests, done by the harness (the shipper thread is parked), so a flush encodes as many
  records as it would at `--rate`; an on phase ends with a flush of what is left, and the
  SLO monitor counts what was fed (`SloMonitor.fold`);
- the evaluation thread (SLO burn rates and drift scores, once a second at any rate) is
  parked; one `Monitoring.evaluate()` is counted on its own (load paused, less the same
  time idle, median of three) and added to the with-monitoring side as
  `evaluation / --rate` per request.

Prints, per setting, the median instructions per request without and with monitoring, what
monitoring adds per request (in all, and on the event loop's thread alone), the median pair
ratio, the evaluation's share, the estimated ratio `without / (with + evaluation / rate)`
against issue #5's target, and writes JSON. Needs `valgrind` (callgrind,
`callgrind_control`) and perf_analyzer; a setting takes about 3 minutes at the defaults.
Compare commits within one run (or runs side by side): the baseline per request moves by a
few percent with how the slowed server and perf_analyzer interleave.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.monitoring_overhead import TARGETS, mlp64_with_drift, write_results
from loadtests.monitoring_paired import (
    MODEL,
    SETTINGS,
    MonitoringSwitch,
    monitoring_settings,
    start_sink,
)
from loadtests.perf_analyzer import DEFAULT_TOOL, ROOT, perf_analyzer_command

#: The trace shipper's flush interval (TracingSettings' default), in seconds.
SHIP_INTERVAL_S = 0.2
#: The summary line of a callgrind dump: total instructions (Ir) counted.
_SUMMARY = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class Count:
    """One phase: monitoring on or off, requests served, instructions executed (by the
    whole process, and by its main thread: the event loop)."""

    on: bool
    requests: int
    instructions: int
    loop_instructions: int = 0

    @property
    def per_request(self) -> float:
        return self.instructions / self.requests

    @property
    def loop_per_request(self) -> float:
        return self.loop_instructions / self.requests


def dump_total(path: Path) -> int:
    """Instructions counted in one callgrind dump file.

    Raises:
        ValueError: the file has no summary line.
    """
    match = _SUMMARY.search(path.read_text(errors="replace"))
    if match is None:
        raise ValueError(f"{path}: no callgrind summary line")
    return int(match.group(1))


class Callgrind:
    """Zeroes and dumps the counters of this process, which runs under callgrind.

    `control` and `dump_now` block (for a caller with nothing else to run); the async
    methods run them in a thread, so that an event loop goes on serving meanwhile."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.pid = os.getpid()

    def control(self, *args: str) -> None:
        """`callgrind_control ARGS` on this process: `-i on` starts counting (the process
        starts under `--instr-atstart=no`), `-z` zeroes."""
        subprocess.run(
            ["callgrind_control", *args, str(self.pid)], check=True, stdout=subprocess.DEVNULL
        )

    def dump_now(self) -> tuple[int, int]:
        """Dump the counters; what they counted since the last zero or dump, in all and in
        the main thread (`--separate-threads=yes`: one file per thread, `-01` the main)."""
        before = set(self.out_dir.iterdir())
        self.control("-d")
        new = set(self.out_dir.iterdir()) - before
        main = [path for path in new if path.name.endswith("-01")]
        return sum(map(dump_total, new)), sum(map(dump_total, main))

    async def instrument(self) -> None:
        await asyncio.to_thread(self.control, "-i", "on")

    async def zero(self) -> None:
        await asyncio.to_thread(self.control, "-z")

    async def dump(self) -> tuple[int, int]:
        return await asyncio.to_thread(self.dump_now)


async def _served_at_least(
    switch: MonitoringSwitch, count: int, load: subprocess.Popen[bytes]
) -> None:
    """Wait until the server has served `count` requests in all."""
    deadline = time.monotonic() + 600
    while switch.served() < count:
        if load.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("perf_analyzer stopped sending load")
        await asyncio.sleep(0.02)


async def count_evaluation(
    hub: Any, switch: MonitoringSwitch, load: subprocess.Popen[bytes], callgrind: Callgrind
) -> int:
    """Instructions of one `Monitoring.evaluate()`: the median of three, each less what
    the same process does idle (counted alike), with the load generator stopped (SIGSTOP)
    and its requests in flight served first."""

    async def counted(evaluate: bool) -> int:
        await callgrind.zero()
        if evaluate:
            hub.evaluate()
        return (await callgrind.dump())[0]

    load.send_signal(signal.SIGSTOP)
    try:
        served = -1
        while served != switch.served():  # nothing in flight any more
            served = switch.served()
            await asyncio.sleep(0.5)
        counts = [await counted(True) - await counted(False) for _ in range(3)]
    finally:
        load.send_signal(signal.SIGCONT)
    return max(0, sorted(counts)[1])


async def child(args: argparse.Namespace) -> dict[str, Any]:
    """The process under callgrind: serve, load, count the phases."""
    from server.app import ServeSettings, start_server

    work = args.work
    # The evaluation thread and the shipper's timer parked: the harness does their work.
    parked = 3600.0
    # NOTE: spans encoded in the server's shipper thread: callgrind counts this process
    # only, and the default shipper process would take the encoding out of the count.
    monitoring = monitoring_settings(
        args.child, work, args.otlp_endpoint, flush_interval_s=parked,
        evaluate_interval_s=parked, shipper="thread",
    )  # fmt: skip
    server = await start_server(
        ServeSettings(model_repository=work / "repo", port=0, monitoring=monitoring)
    )
    switch = MonitoringSwitch(server)
    hub = switch.monitoring
    assert hub is not None
    tracer = hub.tracer
    callgrind = Callgrind(args.out_dir)
    command = perf_analyzer_command(
        args.tool, f"127.0.0.1:{server.port}", 32, 3_600_000, work / "report.csv",
        model=MODEL, input_data=work / "inputs.json",
    )  # fmt: skip
    load = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await _served_at_least(switch, 500, load)
        # The slowdown under valgrind, and drift's budget scaled by it (see the docstring).
        started, served = time.monotonic(), switch.served()
        await asyncio.sleep(3.0)
        valgrind_rate = (switch.served() - served) / (time.monotonic() - started)
        slowdown = args.rate / valgrind_rate
        drifts = hub.drift_monitors()
        for drift in drifts:
            drift._rate = drift._budget = drift.config.max_samples_per_s / slowdown
            drift._update_lane_stride()
        await asyncio.sleep(2.0)
        for drift in drifts:
            drift._update_lane_stride()
        switch.set(False)
        hub.slo.fold()
        if tracer is not None:
            await asyncio.to_thread(tracer.flush)
        await callgrind.instrument()
        evaluation = await count_evaluation(hub, switch, load, callgrind)
        flush_every = max(1, round(args.rate * SHIP_INTERVAL_S))
        pairs: list[tuple[Count, Count]] = []
        for i in range(args.pairs):
            counts: dict[bool, Count] = {}
            for on in (True, False) if i % 2 == 0 else (False, True):
                switch.set(on)
                await callgrind.zero()
                first = switch.served()
                end = first + args.requests
                while switch.served() < end:
                    await _served_at_least(switch, min(switch.served() + flush_every, end), load)
                    if on and tracer is not None:  # the shipper's cadence, in requests
                        await asyncio.to_thread(tracer.flush)
                if on:
                    switch.set(False)
                    if tracer is not None:
                        await asyncio.to_thread(tracer.flush)
                    hub.slo.fold()
                requests = switch.served() - first
                counts[on] = Count(on, requests, *await callgrind.dump())
            pairs.append((counts[True], counts[False]))
            print(
                f"{args.child}: pair {i}: {counts[True].per_request:,.0f} with, "
                f"{counts[False].per_request:,.0f} without", file=sys.stderr, flush=True,
            )  # fmt: skip
    finally:
        load.terminate()
        load.wait(timeout=60)
        await server.stop(5.0)
    return {
        "valgrind_infer_s": valgrind_rate,
        "slowdown": slowdown,
        "lane_strides": [drift.lane_stride for drift in drifts],
        "evaluation_instructions": evaluation,
        "pairs": [
            {"on_requests": on.requests, "on_instructions": on.instructions,
             "on_loop_instructions": on.loop_instructions, "off_requests": off.requests,
             "off_instructions": off.instructions,
             "off_loop_instructions": off.loop_instructions}
            for on, off in pairs
        ],
    }  # fmt: skip


def summarize(result: dict[str, Any], rate: float) -> dict[str, Any]:
    """Medians of a setting's pairs and the estimated throughput ratio."""
    pairs = [
        (Count(True, p["on_requests"], p["on_instructions"], p["on_loop_instructions"]),
         Count(False, p["off_requests"], p["off_instructions"], p["off_loop_instructions"]))
        for p in result["pairs"]
    ]  # fmt: skip
    on = statistics.median(c.per_request for c, _ in pairs)
    off = statistics.median(c.per_request for _, c in pairs)
    evaluation = result["evaluation_instructions"] / rate
    return {
        "off_per_request": off,
        "on_per_request": on,
        "added_per_request": on - off,
        "loop_added_per_request": statistics.median(c.loop_per_request for c, _ in pairs)
        - statistics.median(c.loop_per_request for _, c in pairs),
        "median_pair_ratio": statistics.median(o.per_request / c.per_request for c, o in pairs),
        "evaluation_per_request": evaluation,
        "estimated_ratio": off / (on + evaluation),
    }


def run_setting(
    name: str, args: argparse.Namespace, work: Path, endpoint: str | None
) -> dict[str, Any]:
    """Run the child for one setting under callgrind; its result."""
    out_dir = work / f"callgrind-{SETTINGS.index(name)}"
    out_dir.mkdir()
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", "--dump-instr=no",
        "--separate-threads=yes",
        f"--callgrind-out-file={out_dir}/callgrind.%p", sys.executable, "-m",
        "loadtests.monitoring_instructions", "--child", name, "--work", str(work),
        "--out-dir", str(out_dir), "--pairs", str(args.pairs), "--requests",
        str(args.requests), "--rate", str(args.rate), "--tool", str(args.tool),
    ]  # fmt: skip
    if endpoint is not None:
        command += ["--otlp-endpoint", endpoint]
    result_file = work / f"result-{SETTINGS.index(name)}.json"
    command += ["--result", str(result_file)]
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, timeout=3600)  # fmt: skip
    if done.returncode != 0 or not result_file.exists():
        tail = "\n".join(line for line in done.stderr.splitlines() if not line.startswith("=="))
        raise RuntimeError(f"{name}: the run under callgrind failed:\n{tail[-3000:]}")
    result: dict[str, Any] = json.loads(result_file.read_text())
    shutil.rmtree(out_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3000, help="requests per phase")
    parser.add_argument("--rate", type=float, default=6000.0,
                        help="requests a second this box serves without valgrind")  # fmt: skip
    parser.add_argument("--otlp", action="store_true", help="also trace to an OTLP receiver")
    parser.add_argument("--only", nargs="+", metavar="SETTING", choices=SETTINGS)
    parser.add_argument("--tool", type=Path, default=DEFAULT_TOOL)
    parser.add_argument(
        "--out", type=Path,
        default=ROOT / "loadtests" / "results" / "monitoring_instructions.json",
    )  # fmt: skip
    # The process under callgrind (internal).
    parser.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--otlp-endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.requests < 1 or args.rate <= 0:
        parser.error("--pairs and --requests must be at least 1 and --rate positive")
    if args.child is not None:
        result = asyncio.run(child(args))
        args.result.write_text(json.dumps(result))
        return 0
    missing = [t for t in ("valgrind", "callgrind_control") if shutil.which(t) is None]
    if missing:
        parser.error(f"needs {' and '.join(missing)} (Debian: apt-get install valgrind)")
    if not args.tool.exists():
        parser.error(f"{args.tool} is missing: make perf-analyzer")

    names = [n for n in SETTINGS if n != "tracing 100% otlp" or args.otlp]
    if args.only:
        names = [n for n in names if n in args.only]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="batchwire-instructions-") as tmp:
        work = Path(tmp)
        mlp64_with_drift(work / "repo", work / "inputs.json")
        sink = endpoint = None
        try:
            if "tracing 100% otlp" in names:
                sink, endpoint = start_sink(3600)
            for name in names:
                results[name] = run_setting(name, args, work, endpoint)
                print(f"{name:>20}: done", file=sys.stderr, flush=True)
        finally:
            if sink is not None:
                sink.terminate()
                sink.wait(timeout=60)
    print(
        f"{MODEL}, perf_analyzer -b 1 --concurrency-range 32; one in-process server per "
        f"setting under callgrind, {args.pairs} pairs of {args.requests}-request phases with "
        f"and without its monitoring; instructions of the whole server process per request "
        f"(medians); evaluation rescaled to {args.rate:g} requests a second"
    )
    print(f"{'setting':>20} {'without':>9} {'with':>9} {'added':>7} {'(loop)':>7} "
          f"{'pair ratio':>10} {'evaluation':>10} {'est. ratio':>10} {'target':>6}")  # fmt: skip
    table = []
    for name, result in results.items():
        summary = summarize(result, args.rate)
        target = TARGETS.get(name)
        print(
            f"{name:>20} {summary['off_per_request']:>9,.0f} {summary['on_per_request']:>9,.0f} "
            f"{summary['added_per_request']:>7,.0f} {summary['loop_added_per_request']:>7,.0f} "
            f"{summary['median_pair_ratio']:>10.4f} "
            f"{summary['evaluation_per_request']:>10,.0f} {summary['estimated_ratio']:>10.4f} "
            f"{'' if target is None else f'>={target}':>6}"
        )
        table.append({"setting": name, "target_ratio": target, **summary, **result})
    write_results(
        args.out, "loadtests.monitoring_instructions", argv, pairs=args.pairs,
        requests=args.requests, rate=args.rate, results=table,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
