"""What monitoring costs: `mlp64` throughput at concurrency 32 with each monitoring setting.

    python -m loadtests.monitoring_overhead [--runs 3] [--concurrency 32] [--otlp]
        [--only SETTING ...] [--server-cpus 0|all|LIST]

Serves a fresh `mlp64` repository (with a drift block and a reference profile, so drift
runs too) once per setting and round, and drives it with perf_analyzer, which sends 256
inputs drawn from the reference distribution in turn (so drift raises no alert):

- `off`: `--no-monitoring` (the baseline: no metrics, SLO, drift or tracing);
- `metrics+slo+drift`: the default (tracing off);
- `tracing 10% file` / `tracing 100% file`: the default plus tracing, 1 in 10 or every
  request exported to the JSON-lines file;
- `tracing 100% otlp` (with `--otlp`): traced to an OTLP/gRPC receiver in this process.

Settings alternate within each round so drift in the box's load hits them alike. On a
2-core box one server process's throughput can differ from the next one's by tens of
percent (where the scheduler puts the event loop, grpc's poller thread and perf_analyzer);
`--server-cpus 0` pins each server to CPU 0 (perf_analyzer and the OTLP receiver stay
unpinned), which narrowed that spread in one test (BENCHMARKS.md, "Monitoring overhead");
`loadtests.monitoring_paired` compares within one process instead. Prints the median
throughput and p99 per setting and its ratio to `off`; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from batchwire.config import DriftConfig, load_model_config, write_model_config
from loadtests.perf_analyzer import (
    DEFAULT_TOOL,
    ROOT,
    launch_server,
    parse_cpus,
    pin_process,
    run_perf_analyzer,
)
from trainer.mlp64 import create_mlp64

#: The overhead targets of issue #5, as the smallest throughput ratio to `off`.
TARGETS = {"metrics+slo+drift": 0.98, "tracing 100% file": 0.90, "tracing 100% otlp": 0.90}


#: Distinct requests perf_analyzer cycles through (drawn from the reference distribution).
INPUT_ROWS = 256


def mlp64_with_drift(repository: Path, input_data: Path) -> None:
    """Write mlp64 with a drift block and a reference profile (inputs uniform in [0, 1)),
    and perf_analyzer input data drawn from the same distribution, so that drift is
    computed on in-distribution traffic and raises no alert (perf_analyzer's own random
    data is one tensor, generated once and sent with every request)."""
    from monitoring.drift import build_profile, write_profile

    version_dir = create_mlp64(repository)
    model_dir = version_dir.parent
    config = load_model_config(model_dir)
    config = config.model_copy(update={"drift": DriftConfig()})
    write_model_config(model_dir, config)
    rng = np.random.default_rng(0)
    write_profile(build_profile({"INPUT": rng.random((5000, 64), dtype=np.float32)}, None),
                  version_dir)  # fmt: skip
    rows = rng.random((INPUT_ROWS, 64), dtype=np.float32)
    steps = [{"INPUT": {"content": row.tolist(), "shape": [64]}} for row in rows]
    input_data.write_text(json.dumps({"data": steps}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--interval-ms", type=int, default=3000)
    parser.add_argument("--otlp", action="store_true", help="also trace to an OTLP receiver")
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SETTING",
        help="run only these settings (e.g. off 'tracing 100%% file'); `off` is always run",
    )
    parser.add_argument(
        "--server-cpus",
        default="all",
        help="CPUs to pin each server to, e.g. 0 or 0,1; `all`: no pinning (the default)",
    )
    parser.add_argument("--tool", type=Path, default=DEFAULT_TOOL)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "loadtests" / "results" / "monitoring_overhead.json"
    )
    args = parser.parse_args(argv)
    try:
        server_cpus = parse_cpus(args.server_cpus)
    except ValueError as exc:
        parser.error(f"--server-cpus: {exc}")

    work = Path(tempfile.mkdtemp(prefix="batchwire-overhead-"))
    repository = work / "repo"
    input_data = work / "inputs.json"
    mlp64_with_drift(repository, input_data)
    sink = None
    settings: dict[str, list[str]] = {
        "off": ["--no-monitoring"],
        "metrics+slo+drift": [],
        "tracing 10% file": ["--trace-sampling", "0.1", "--trace-file", str(work / "s10.jsonl")],
        "tracing 100% file": ["--trace-sampling", "1", "--trace-file", str(work / "spans.jsonl")],
    }
    if args.otlp:
        from loadtests.otlp_sink import OtlpSink

        sink = OtlpSink(keep_spans=False)
        settings["tracing 100% otlp"] = ["--trace-sampling", "1", "--otlp-endpoint", sink.endpoint]
    if args.only:
        unknown = set(args.only) - set(settings)
        if unknown:
            parser.error(f"unknown settings {sorted(unknown)}; choose from {sorted(settings)}")
        settings = {k: v for k, v in settings.items() if k == "off" or k in args.only}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    unstable = dict.fromkeys(settings, 0)
    try:
        for round_ in range(args.runs):
            for name, extra in settings.items():
                proc, address, _ = launch_server(repository, *extra)
                try:
                    if server_cpus is not None:
                        pin_process(proc.pid, server_cpus)
                    result = run_perf_analyzer(
                        args.tool, address, args.concurrency, args.interval_ms, model="mlp64",
                        input_data=input_data,
                    )  # fmt: skip
                except RuntimeError as exc:  # perf_analyzer: "failed to obtain stable ..."
                    unstable[name] += 1
                    print(f"round {round_ + 1} {name:>20}: no stable measurement ({exc})"[:200],
                          file=sys.stderr, flush=True)  # fmt: skip
                    continue
                finally:
                    proc.terminate()
                    proc.wait(timeout=60)
                runs[name].append(result)
                print(
                    f"round {round_ + 1} {name:>20}: {result['throughput_infer_s']:8.0f} infer/s"
                    f" p99 {result['p99_us'] / 1000:6.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        if sink is not None:
            sink.stop()

    runs = {name: results for name, results in runs.items() if results}
    if "off" not in runs:
        print("no stable measurement of the baseline", file=sys.stderr)
        return 1
    base = statistics.median(r["throughput_infer_s"] for r in runs["off"])
    pinned = "not pinned" if server_cpus is None else f"pinned to CPU {args.server_cpus}"
    print(
        f"mlp64, perf_analyzer -b 1 --concurrency-range {args.concurrency}, "
        f"median of the stable runs of {args.runs} per setting; server {pinned}"
    )
    print(f"{'setting':>20} {'infer/s':>9} {'p99 ms':>7} {'vs off':>7} {'target':>7}")
    table = []
    for name, results in runs.items():
        throughput = statistics.median(r["throughput_infer_s"] for r in results)
        p99_ms = statistics.median(r["p99_us"] for r in results) / 1000
        ratio = throughput / base
        target = TARGETS.get(name)
        met = "" if target is None else ("met" if ratio >= target else "MISSED")
        print(
            f"{name:>20} {throughput:>9.0f} {p99_ms:>7.2f} {ratio:>7.3f} "
            f"{'' if target is None else f'>={target}':>7} {met}"
            + (f" ({unstable[name]} unstable runs left out)" if unstable[name] else "")
        )
        table.append(
            {"setting": name, "median_infer_s": throughput, "median_p99_ms": p99_ms,
             "ratio_vs_off": ratio, "target_ratio": target, "runs": results,
             "unstable_runs": unstable[name]}
        )  # fmt: skip
    write_results(
        args.out, "loadtests.monitoring_overhead", argv, server_cpus=args.server_cpus,
        results=table,
    )  # fmt: skip
    return 0


def write_results(out: Path, module: str, argv: list[str] | None, **fields: Any) -> None:
    """Write a benchmark's JSON: date, machine and command, then `fields`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "command": f"python -m {module} " + " ".join(argv or sys.argv[1:]),
    }
    out.write_text(json.dumps({**header, **fields}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
