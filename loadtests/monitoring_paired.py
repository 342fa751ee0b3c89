"""What monitoring costs in throughput, measured in pairs of phases of one server.

    python -m loadtests.monitoring_paired [--pairs 30] [--phase-s 1.0] [--otlp]
        [--only SETTING ...]

`monitoring_overhead` starts one server process per setting and round. On this shared
2-core box that mixes two kinds of noise into its ratios: one server process runs tens of
percent faster or slower than the next (where the scheduler puts the event loop, grpc's
poller thread and perf_analyzer), and the host's speed drifts from second to second. This
benchmark takes both out: for each setting it starts one server *in this process* (built
as `batchwire serve` builds it, metrics endpoint included) and, while perf_analyzer keeps
`mlp64` at concurrency 32 for the whole run, switches the setting's monitoring on and off
every `--phase-s` seconds. Each pair is one phase with monitoring and one without, next
to each other in time (on-off, then off-on, alternating); a phase's throughput is what the
model's statistics counted during it over its length, and each pair gives one ratio.

- Switching off detaches the monitoring from the front door and from the versions'
  observers: the per-request work that `--no-monitoring` leaves out (SLO records, drift
  observations, trace records) for mlp64, whose requests all take the inline CPU lane
  (a batcher keeps the observer it was built with: batch spans would not switch off).
- A drift monitor thins the CPU lane's requests it observes by a stride estimated once a
  second from the requests it is shown (`DriftMonitor.lane_gap`): detached, it would take
  the lane for a slower one and, attached again, observe one request in 1.7 where steady
  traffic gave one in 10 (measured at ~10,000 infer/s with the then default budget of
  1,000 samples a second; one in 50 with today's 200): about a point of the default
  setting's ratio (BENCHMARKS.md, "Tenth session") that monitoring in steady traffic does
  not cost. The requests served while off are counted into that estimate
  (`MonitoringSwitch.credit`, every 50 ms).
- A traced phase ends only once its spans are shipped (`tracer.flush` in a worker thread
  while requests go on; the time it takes counts in the phase), so the shipping of a
  phase's spans is charged to that phase, and the next phase starts with nothing pending.
- What runs in both phases, and so is not in the ratio: the evaluation thread (SLO and
  drift alerts once a second, about a millisecond), the idle metrics endpoint and the idle
  shipper thread. `monitoring_overhead` includes them.
- The OTLP receiver (`--otlp`) is a separate process, as a collector would be.

Prints, per setting, the median of the pairs' ratios (with / without monitoring), their
quartiles, the pooled ratio (all requests over all the time of each kind) with its 95%
bootstrap interval, the verdict against issue #5's target (`met` only when the whole
interval is at or above it), and where the cost went: CPU per request of the event-loop
thread and of the whole server process, over the phases without and with monitoring;
writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from loadtests.monitoring_overhead import TARGETS, mlp64_with_drift, write_results
from loadtests.perf_analyzer import DEFAULT_TOOL, ROOT, launch_module, perf_analyzer_command

MODEL = "mlp64"
#: How often a phase credits the requests served while off to the drift monitors' rate
#: estimates (`MonitoringSwitch.credit`): well within their once-a-second estimate.
CREDIT_EVERY_S = 0.05
SETTINGS = ("metrics+slo+drift", "tracing 10% file", "tracing 100% file", "tracing 100% otlp")


@dataclass(frozen=True)
class Phase:
    """One phase: monitoring on or off, requests counted, seconds, and the CPU seconds of
    the event-loop thread and of the server (this whole process and its trace shipper
    process) meanwhile."""

    on: bool
    requests: int
    seconds: float
    loop_cpu_s: float
    process_cpu_s: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds


class MonitoringSwitch:
    """Attaches a running in-process server's monitoring, or detaches it.

    Detached, requests take the `--no-monitoring` path: the servicer has no monitoring
    and the loaded versions no observer. The objects stay alive (threads included) so
    that attaching again resumes where it stopped.
    """

    def __init__(self, server: Any) -> None:
        self._servicer = server.servicer
        self.monitoring = server.monitoring
        self.models = list(server.runtime.loaded())
        self._observers = [model.observer for model in self.models]
        self._lane_requests_off: list[int] | None = None
        """Each version's CPU-lane requests at the last `credit` (None: switched on)."""

    def set(self, on: bool) -> None:
        self._servicer._monitoring = self.monitoring if on else None
        for model, observer in zip(self.models, self._observers, strict=True):
            model.observer = observer if on else None
        # Drift's stride estimate must see the off phases' requests too (module docstring).
        if on:
            self.credit()
            self._lane_requests_off = None
        elif self._lane_requests_off is None:
            self._lane_requests_off = self._lane_counts()

    def credit(self) -> None:
        """While switched off: count the CPU-lane requests served since the last call in
        the drift monitors' rate estimates (`DriftMonitor.count_lane_requests`), as if they
        had been shown them."""
        then = self._lane_requests_off
        if then is None:
            return
        now = self._lane_counts()
        for observer, served, before in zip(self._observers, now, then, strict=True):
            drift = getattr(observer, "drift", None)
            if drift is not None and served > before:
                drift.count_lane_requests(served - before)
        self._lane_requests_off = now

    def _lane_counts(self) -> list[int]:
        """Requests each version's CPU lane has computed so far (0 without one)."""
        return [m.lane.requests_total if m.lane is not None else 0 for m in self.models]

    def served(self) -> int:
        """Successful requests so far, over every loaded version."""
        return sum(model.stats.success.count for model in self.models)

    def process_cpu_s(self) -> float:
        """CPU seconds of this process and of its trace shipper process, if any."""
        tracer = self.monitoring.tracer if self.monitoring is not None else None
        shipper = tracer.shipper_cpu_s() if tracer is not None else 0.0
        return time.process_time() + shipper

    async def settle(self) -> None:
        """Ship what the last traced phase recorded (no-op without a tracer)."""
        tracer = self.monitoring.tracer if self.monitoring is not None else None
        if tracer is not None:
            await asyncio.to_thread(tracer.flush)


async def measure_pairs(
    switch: MonitoringSwitch, pairs: int, phase_s: float
) -> list[tuple[Phase, Phase]]:
    """`pairs` pairs of phases (on-off, then off-on, alternating): (on, off) each.

    The caller keeps the server under load meanwhile. Leaves the monitoring detached."""
    out: list[tuple[Phase, Phase]] = []
    for i in range(pairs):
        phases: dict[bool, Phase] = {}
        for on in (True, False) if i % 2 == 0 else (False, True):
            switch.set(on)
            started, served = time.monotonic(), switch.served()
            loop_cpu, process_cpu = time.thread_time(), switch.process_cpu_s()
            # NOTE: woken every `CREDIT_EVERY_S` in both kinds of phase alike (`credit` does
            # nothing while on), so that the wake-ups cost both the same.
            end = started + phase_s
            while (left := end - time.monotonic()) > 0:
                await asyncio.sleep(min(left, CREDIT_EVERY_S))
                switch.credit()
            if on:
                switch.set(False)
                await switch.settle()
            phases[on] = Phase(
                on, switch.served() - served, time.monotonic() - started,
                time.thread_time() - loop_cpu, switch.process_cpu_s() - process_cpu,
            )  # fmt: skip
        out.append((phases[True], phases[False]))
    switch.set(False)
    return out


def summarize(pairs: list[tuple[Phase, Phase]], *, resamples: int = 2000) -> dict[str, Any]:
    """The with/without throughput ratios of the pairs: median and quartiles, the pooled
    ratio (all requests over all the time of each kind) and its 95% bootstrap interval
    (pairs resampled with replacement, seeded: the same pairs give the same interval)."""
    on = np.array([(p[0].requests, p[0].seconds) for p in pairs], dtype=np.float64)
    off = np.array([(p[1].requests, p[1].seconds) for p in pairs], dtype=np.float64)
    ratios = (on[:, 0] / on[:, 1]) / (off[:, 0] / off[:, 1])
    on_rate, off_rate = on[:, 0].sum() / on[:, 1].sum(), off[:, 0].sum() / off[:, 1].sum()
    picks = np.random.default_rng(0).integers(0, len(pairs), (resamples, len(pairs)))
    sums_on, sums_off = on[picks].sum(axis=1), off[picks].sum(axis=1)
    pooled = (sums_on[:, 0] / sums_on[:, 1]) / (sums_off[:, 0] / sums_off[:, 1])
    low, high = np.quantile(pooled, [0.025, 0.975]).tolist()
    q1, median, q3 = np.quantile(ratios, [0.25, 0.5, 0.75]).tolist()

    def cpu_us(on: bool, loop: bool) -> float:
        """µs of CPU (the event loop's, or the process's) per request, over every phase of
        one kind."""
        chosen = [p[0] if on else p[1] for p in pairs]
        cpu = sum(p.loop_cpu_s if loop else p.process_cpu_s for p in chosen)
        return cpu / sum(p.requests for p in chosen) * 1e6

    return {
        "median_ratio": median,
        "q1_ratio": q1,
        "q3_ratio": q3,
        "pooled_ratio": on_rate / off_rate,
        "pooled_ratio_95": [low, high],
        "off_infer_s": off_rate,
        "on_infer_s": on_rate,
        "off_loop_cpu_us": cpu_us(on=False, loop=True),
        "on_loop_cpu_us": cpu_us(on=True, loop=True),
        "off_process_cpu_us": cpu_us(on=False, loop=False),
        "on_process_cpu_us": cpu_us(on=True, loop=False),
        "pairs": [
            {"on_requests": on.requests, "on_s": on.seconds, "on_loop_cpu_s": on.loop_cpu_s,
             "on_process_cpu_s": on.process_cpu_s, "off_requests": off.requests,
             "off_s": off.seconds, "off_loop_cpu_s": off.loop_cpu_s,
             "off_process_cpu_s": off.process_cpu_s}
            for on, off in pairs
        ],
    }  # fmt: skip


def start_sink(bound_s: float) -> tuple[subprocess.Popen[str], str]:
    """An OTLP receiver in its own process (counting spans only); it and its endpoint."""
    proc, line = launch_module(
        ["loadtests.otlp_sink", "--port", "0", "--seconds", str(bound_s)], "OTLP sink on",
        "the OTLP sink",
    )  # fmt: skip
    assert proc.stdout is not None
    _drain(proc.stdout)  # its spans-per-second lines must not fill the pipe
    return proc, line.split()[-1]


def _drain(stream: IO[str]) -> None:
    threading.Thread(target=stream.read, daemon=True).start()


async def run_setting(
    monitoring: Any, repository: Path, inputs: Path, args: argparse.Namespace
) -> list[tuple[Phase, Phase]]:
    """Serve `mlp64` with `monitoring`, load it with perf_analyzer, measure the pairs."""
    from server.app import ServeSettings, start_server

    server = await start_server(
        ServeSettings(model_repository=repository, port=0, monitoring=monitoring)
    )
    switch = MonitoringSwitch(server)
    bound_s = args.warmup_s + args.pairs * 2 * args.phase_s * 2 + 60
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as tmp:
        # One measurement window longer than the run: perf_analyzer only generates load
        # here (the phases are counted by the server); it is stopped when they are done.
        command = perf_analyzer_command(
            args.tool, f"127.0.0.1:{server.port}", args.concurrency, int(bound_s * 1000),
            Path(tmp) / "report.csv", model=MODEL, input_data=inputs,
        )  # fmt: skip
        errors = Path(tmp) / "stderr.txt"
        with errors.open("w") as stderr:
            load = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 60
            while switch.served() < 10 * args.concurrency:  # load has started
                if load.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"perf_analyzer sent no load: {errors.read_text()!r}")
                await asyncio.sleep(0.05)
            await asyncio.sleep(args.warmup_s)
            pairs = await measure_pairs(switch, args.pairs, args.phase_s)
            if load.poll() is not None:
                raise RuntimeError(f"perf_analyzer stopped early: {errors.read_text()!r}")
        finally:
            load.terminate()
            load.wait(timeout=60)
            await server.stop(5.0)
    return pairs


def monitoring_settings(
    name: str,
    work: Path,
    otlp_endpoint: str | None = None,
    *,
    flush_interval_s: float = 0.2,
    evaluate_interval_s: float = 1.0,
    shipper: str = "process",
) -> Any:
    """The `MonitoringSettings` of one of `SETTINGS` (trace files under `work`; the
    shipper's and the evaluation thread's intervals and where spans are encoded as
    given)."""
    from monitoring.hub import MonitoringSettings
    from monitoring.tracing import TracingSettings

    where: dict[str, tuple[float, dict[str, Any]]] = {
        "tracing 10% file": (0.1, {"trace_file": work / "s10.jsonl"}),
        "tracing 100% file": (1.0, {"trace_file": work / "spans.jsonl"}),
        "tracing 100% otlp": (1.0, {"otlp_endpoint": otlp_endpoint}),
    }
    tracing = None
    if name in where:
        ratio, destination = where[name]
        tracing = TracingSettings(
            sampling_ratio=ratio,
            flush_interval_s=flush_interval_s,
            shipper=shipper,
            **destination,
        )
    return MonitoringSettings(
        metrics_port=0, tracing=tracing, evaluate_interval_s=evaluate_interval_s
    )


async def run(args: argparse.Namespace, work: Path) -> dict[str, list[tuple[Phase, Phase]]]:
    repository, inputs = work / "repo", work / "inputs.json"
    mlp64_with_drift(repository, inputs)
    sink = endpoint = None
    try:
        names = [n for n in SETTINGS if n != "tracing 100% otlp" or args.otlp]
        if args.only:
            names = [n for n in names if n in args.only]
        if "tracing 100% otlp" in names:
            sink, endpoint = start_sink(3600)
        results = {}
        for name in names:
            monitoring = monitoring_settings(name, work, endpoint)
            results[name] = await run_setting(monitoring, repository, inputs, args)
            summary = summarize(results[name])
            print(f"{name:>20}: median ratio {summary['median_ratio']:.3f}", file=sys.stderr,
                  flush=True)  # fmt: skip
        return results
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait(timeout=60)


def verdict(summary: dict[str, Any], target: float | None) -> str:
    """`met` when the pooled ratio's 95% interval lies at or above the target, `MISSED`
    when it lies below, `unsure` when it straddles it."""
    if target is None:
        return ""
    low, high = summary["pooled_ratio_95"]
    if low >= target:
        return "met"
    return "MISSED" if high < target else "unsure"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--phase-s", type=float, default=1.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--otlp", action="store_true", help="also trace to an OTLP receiver")
    parser.add_argument("--only", nargs="+", metavar="SETTING", choices=SETTINGS)
    parser.add_argument("--tool", type=Path, default=DEFAULT_TOOL)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "loadtests" / "results" / "monitoring_paired.json"
    )
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.phase_s <= 0:
        parser.error("--pairs must be at least 1 and --phase-s positive")
    if not args.tool.exists():
        parser.error(f"{args.tool} is missing: make perf-analyzer")

    with tempfile.TemporaryDirectory(prefix="batchwire-paired-") as tmp:
        results = asyncio.run(run(args, Path(tmp)))
    print(
        f"{MODEL}, perf_analyzer -b 1 --concurrency-range {args.concurrency}; one in-process "
        f"server per setting, {args.pairs} pairs of {args.phase_s:g} s phases with and "
        f"without its monitoring"
    )
    print(f"{'':>20} {'infer/s':>17}  {'ratio with/without':^44}  "
          f"{'CPU µs/request, without -> with':^31}")  # fmt: skip
    print(f"{'setting':>20} {'without':>8} {'with':>8}  {'median':>6} {'q1-q3':>11} "
          f"{'pooled':>6} {'95%':>11} {'target':>6}  {'event loop':>14} {'process':>14}  "
          f"verdict")  # fmt: skip
    table = []
    for name, pairs in results.items():
        summary = summarize(pairs)
        target = TARGETS.get(name)
        low, high = summary["pooled_ratio_95"]
        print(
            f"{name:>20} {summary['off_infer_s']:>8.0f} {summary['on_infer_s']:>8.0f}  "
            f"{summary['median_ratio']:>6.3f} {summary['q1_ratio']:.3f}-{summary['q3_ratio']:.3f} "
            f"{summary['pooled_ratio']:>6.3f} {low:.3f}-{high:.3f} "
            f"{'' if target is None else f'>={target}':>6}  "
            f"{summary['off_loop_cpu_us']:>5.0f} -> {summary['on_loop_cpu_us']:<5.0f} "
            f"{summary['off_process_cpu_us']:>5.0f} -> {summary['on_process_cpu_us']:<5.0f}  "
            f"{verdict(summary, target)}"
        )
        table.append({"setting": name, "target_ratio": target, **summary})
    write_results(
        args.out, "loadtests.monitoring_paired", argv, pairs=args.pairs, phase_s=args.phase_s,
        concurrency=args.concurrency, results=table,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
