"""Side-by-side benchmark: batchwire, MLServer, PyTriton and a bare grpc.aio servicer on mlp64.

    python -m loadtests.bench [--servers batchwire mlserver pytriton bare bare-ort]
        [--concurrency 1 32]
        [--runs 3] [--interval-ms 3000] [--out loadtests/results/bench.json]
        [--openloop-rates R ...] [--openloop-duration-s 8]

`make bench` runs it after creating every environment (`loadtests/peers/setup.sh`, the
perf_analyzer install). Every server serves the same mlp64 (y = relu(x @ W), W 64x64 FP32,
seed 0) on 127.0.0.1, and is checked to answer relu(x @ W) before it is measured.

The measurement is Triton's perf_analyzer, closed loop:
`perf_analyzer -m mlp64 -i grpc -u ADDR -b 1 --concurrency-range C -s 50 --percentile 99
-p INTERVAL -f CSV`, `--runs` times per server and concurrency. Servers run one at a time
(never two at once: the box has 2 cores, shared with the load tool) and in rounds: each
round starts every server in turn, measures each concurrency once and stops it, so slow drift
of the machine spreads over all servers instead of landing on one. The table shows the
median run by throughput and batchwire's throughput over each server's; the JSON keeps
every run, every command, the date, the machine and the versions.

In the last round the open-loop generator (`python -m loadtests.openloop`: Poisson arrivals,
latency from each request's intended send time) also sweeps `--openloop-rates` against each
server after perf_analyzer; a second table shows it, and each server's JSON and PNG stay in
`openloop/` beside `--out`. `--openloop-rates` with no value skips it.

Mean batch size comes from perf_analyzer's server statistics (batchwire, Triton); MLServer
and the bare servicers have no ModelStatistics RPC, so it shows as `-`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from loadtests.peers import launch
from loadtests.peers.model import NAME as MODEL
from loadtests.perf_analyzer import run_perf_analyzer

logger = logging.getLogger(__name__)

ROOT: Final = Path(__file__).resolve().parents[1]
DEFAULT_TOOL: Final = ROOT / ".perf-analyzer" / "perf_analyzer"
DEFAULT_OUT: Final = ROOT / "loadtests" / "results" / "bench.json"
BASELINE: Final = "batchwire"
#: The packages whose versions each environment reports in the JSON.
VERSION_PACKAGES: Final = {
    "batchwire": ("batchwire", "grpcio", "protobuf", "numpy", "onnxruntime"),
    "bare": ("grpcio", "protobuf", "numpy"),
    "bare-ort": ("grpcio", "protobuf", "numpy", "onnxruntime"),
    "mlserver": ("mlserver", "uvloop", "grpcio", "protobuf", "numpy"),
    "pytriton": ("nvidia-pytriton", "grpcio", "numpy"),
}

#: Hook for further load tools: (server name, address, scratch dir) -> JSON-able result.
LoadHook = Callable[[str, str, Path], dict[str, Any]]


def median_run(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The median run by throughput (the upper one of an even count)."""
    return sorted(runs, key=lambda r: r["throughput_infer_s"])[len(runs) // 2]


@dataclass(slots=True)
class Cell:
    """Every run of one server at one concurrency."""

    server: str
    concurrency: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def median(self) -> dict[str, Any] | None:
        return median_run(self.runs) if self.runs else None


def throughput_ratio(cells: Sequence[Cell], cell: Cell, baseline: str = BASELINE) -> float | None:
    """batchwire's median throughput over `cell`'s, at the same concurrency."""
    base = next(
        (c for c in cells if c.server == baseline and c.concurrency == cell.concurrency), None
    )
    if base is None or base.median is None or cell.median is None:
        return None
    return float(base.median["throughput_infer_s"] / cell.median["throughput_infer_s"])


def format_table(cells: Sequence[Cell], baseline: str = BASELINE) -> str:
    """The one table: median run per server and concurrency, and batchwire/peer throughput."""
    header = (
        f"{'server':<10} {'conc':>4} {'infer/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'batch':>6}"
        f" {baseline + '/peer':>15}  all runs infer/s"
    )
    lines = [header, "-" * len(header)]
    for cell in sorted(cells, key=lambda c: (c.concurrency, launch.SERVERS.index(c.server))):
        m = cell.median
        if m is None:
            lines.append(
                f"{cell.server:<10} {cell.concurrency:>4} failed: {cell.errors[-1][:60]!r}"
            )
            continue
        ratio = throughput_ratio(cells, cell, baseline)
        batch = m["mean_batch_size"]
        every = ", ".join(f"{r['throughput_infer_s']:.0f}" for r in cell.runs)
        lines.append(
            f"{cell.server:<10} {cell.concurrency:>4} {m['throughput_infer_s']:>8.0f}"
            f" {m['p50_us'] / 1000:>7.2f} {m['p99_us'] / 1000:>7.2f}"
            f" {'-' if batch is None else f'{batch:.1f}':>6}"
            f" {'-' if ratio is None else f'{ratio:.2f}x':>15}  {every}"
            + (f"  ({len(cell.errors)} failed)" if cell.errors else "")
        )
    return "\n".join(lines)


#: Offered loads of the open-loop sweep (req/s), below, near and above the peers' capacity.
DEFAULT_OPENLOOP_RATES: Final = (500.0, 1000.0, 2000.0, 3000.0)


def openloop_hook(rates: Sequence[float], duration_s: float, out_dir: Path) -> LoadHook:
    """Run `python -m loadtests.openloop` at `rates`; its JSON and PNG go to `out_dir`."""

    def run(server: str, address: str, scratch: Path) -> dict[str, Any]:
        out_dir.mkdir(parents=True, exist_ok=True)
        out = out_dir / f"openloop_{server}.json"
        cmd = [sys.executable, "-m", "loadtests.openloop", "--address", address,
               "--model", MODEL, "--rates", *map(str, rates),
               "--duration-s", str(duration_s), "--out", str(out)]  # fmt: skip
        bound_s = 60 + len(rates) * (duration_s + 30)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=bound_s)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"openloop failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return {
            "command": " ".join(cmd[:-2]),
            "json": str(out),
            "png": str(out.with_suffix(".png")),
            "result": json.loads(out.read_text()),
        }

    return run


def format_openloop_table(servers: dict[str, dict[str, Any]]) -> str:
    """Open-loop latency (from each request's intended send time) per server and rate."""
    header = (
        f"{'server':<10} {'offered/s':>9} {'ok/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
        "  note"
    )
    lines = [header, "-" * len(header)]
    for name in launch.SERVERS:
        for load in servers.get(name, {}).get("extra_loads", []):
            for row in load.get("result", {}).get("runs", []):
                latency = row["latency_ms"]
                errors = sum(row["errors"].values())

                def ms(value: float | None) -> str:
                    return "-" if value is None else f"{value:.2f}"

                note = "generator lagged" if row["generator_lagged"] else ""
                lines.append(
                    f"{name:<10} {row['offered_rps']:>9.0f} {row['achieved_rps']:>7.0f}"
                    f" {ms(latency['p50']):>8} {ms(latency['p99']):>8} {errors:>7}  {note}"
                )
    return "\n".join(lines)


def package_versions(python: Path | str, packages: Sequence[str]) -> dict[str, str]:
    """Installed versions of `packages` in the environment of `python` (missing: "absent")."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "def v(p):\n"
        "    try: return m.version(p)\n"
        "    except m.PackageNotFoundError: return 'absent'\n"
        "print(json.dumps({p: v(p) for p in sys.argv[1:]}))"
    )
    try:
        proc = subprocess.run(
            [str(python), "-c", code, *packages], capture_output=True, text=True, timeout=60
        )
        versions: dict[str, str] = json.loads(proc.stdout)
        return versions
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "node": platform.node(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["load_avg_at_start"] = os.getloadavg()
    return info


def git_revision() -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        return out.stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}


def create_repository(directory: Path) -> Path:
    """A fresh batchwire repository with mlp64 (`python -m batchwire train mlp64`)."""
    subprocess.run(
        [sys.executable, "-m", "batchwire", "--log-level", "WARNING", "train", "mlp64",
         "--model-repository", str(directory)],
        cwd=ROOT, check=True, timeout=300,
    )  # fmt: skip
    return directory


def _measure_server(
    name: str,
    *,
    repository: Path,
    args: argparse.Namespace,
    cells: dict[tuple[str, int], Cell],
    servers: dict[str, dict[str, Any]],
    hooks: Sequence[LoadHook],
    scratch: Path,
    log_dir: Path,
) -> None:
    """Start one server, run every concurrency once (and the hooks), stop it."""
    info = servers[name]
    try:
        spec = launch.server_spec(name, model_repository=repository)
        info["command"] = " ".join(spec.argv)
        info["env"] = spec.env
        started = time.monotonic()
        server = launch.start_server(spec, log_dir)
        info.setdefault("start_s", []).append(round(time.monotonic() - started, 2))
    except Exception as exc:
        logger.error("%s: %s", name, exc)
        info.setdefault("errors", []).append(str(exc))
        for concurrency in args.concurrency:
            cells[(name, concurrency)].errors.append(f"start: {str(exc).splitlines()[0]}")
        return
    try:
        info["address"] = server.address
        for concurrency in args.concurrency:
            cell = cells[(name, concurrency)]
            try:
                run = run_perf_analyzer(
                    args.tool, server.address, concurrency, args.interval_ms, model=MODEL
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                logger.error("%s c=%d: %s", name, concurrency, exc)
                cell.errors.append(str(exc))
                continue
            cell.runs.append(run)
            logger.info(
                "%s c=%d: %.0f infer/s, p50 %.2f ms, p99 %.2f ms",
                name, concurrency, run["throughput_infer_s"], run["p50_us"] / 1000,
                run["p99_us"] / 1000,
            )  # fmt: skip
        for hook in hooks:
            try:
                info.setdefault("extra_loads", []).append(hook(name, server.address, scratch))
            except Exception as exc:
                logger.error("%s: extra load failed: %s", name, exc)
                info.setdefault("errors", []).append(f"extra load: {exc}")
    finally:
        info.setdefault("exit_codes", []).append(launch.stop_server(server))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--servers", nargs="+", choices=launch.SERVERS, default=list(launch.SERVERS)
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--interval-ms", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tool", type=Path, default=DEFAULT_TOOL, help="perf_analyzer")
    parser.add_argument("--log-dir", type=Path, help="servers' logs (default: beside --out)")
    parser.add_argument(
        "--openloop-rates",
        type=float,
        nargs="*",
        default=list(DEFAULT_OPENLOOP_RATES),
        help="offered loads of the open-loop sweep in the last round (none: skip it)",
    )
    parser.add_argument("--openloop-duration-s", type=float, default=8.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.tool.exists():
        parser.error(f"no perf_analyzer at {args.tool}: run `make perf-analyzer`")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    args.log_dir = args.log_dir or args.out.parent / "bench_logs"

    hooks: list[LoadHook] = []
    if args.openloop_rates:
        hooks.append(
            openloop_hook(
                args.openloop_rates, args.openloop_duration_s, args.out.parent / "openloop"
            )
        )

    date = time.strftime("%Y-%m-%d %H:%M:%S %z")
    cells = {(s, c): Cell(s, c) for s in args.servers for c in args.concurrency}
    servers: dict[str, dict[str, Any]] = {s: {} for s in args.servers}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        repository = create_repository(Path(tmp) / "model_repository")
        for round_index in range(args.runs):
            logger.info("round %d of %d", round_index + 1, args.runs)
            last = round_index == args.runs - 1
            for name in args.servers:
                _measure_server(
                    name, repository=repository, args=args, cells=cells, servers=servers,
                    hooks=hooks if last else [], scratch=Path(tmp),
                    log_dir=args.log_dir / f"round{round_index + 1}",
                )  # fmt: skip

    ordered = list(cells.values())
    print(
        f"\nmlp64 (y = relu(x @ W), W 64x64 FP32), perf_analyzer -b 1, closed loop, "
        f"{args.interval_ms} ms windows, median of {args.runs} runs by throughput"
    )
    print(format_table(ordered))
    if args.openloop_rates:
        print(
            f"\nopen loop (python -m loadtests.openloop, Poisson arrivals, "
            f"{args.openloop_duration_s:g} s per rate, last round; latency from the intended "
            f"send time; JSON and PNG per server in {args.out.parent / 'openloop'})"
        )
        print(format_openloop_table(servers))
    versions = {
        name: package_versions(
            launch.peer_python(name) if name in launch.PEER_VENVS else sys.executable,
            VERSION_PACKAGES[name],
        )
        for name in args.servers
    }
    version_out = subprocess.run(
        [str(args.tool), "--version"], capture_output=True, text=True, timeout=60
    )
    tool_version = (version_out.stdout + version_out.stderr).strip()
    payload = {
        "date": date,
        "machine": machine(),
        "git": git_revision(),
        "argv": [
            sys.executable,
            "-m",
            "loadtests.bench",
            *(sys.argv[1:] if argv is None else argv),
        ],
        "model": MODEL,
        "settings": {
            "concurrency": args.concurrency,
            "runs": args.runs,
            "interval_ms": args.interval_ms,
            "batch_size": 1,
            "order": "rounds: each round starts, measures and stops every server",
        },  # fmt: skip
        "perf_analyzer": {"path": str(args.tool), "version": tool_version},
        "versions": versions,
        "servers": servers,
        "results": [
            {
                "server": c.server,
                "concurrency": c.concurrency,
                "median": c.median,
                f"throughput_ratio_{BASELINE}_over_server": throughput_ratio(ordered, c),
                "throughput_spread": _spread(c.runs),
                "runs": c.runs,
                "errors": c.errors,
            }  # fmt: skip
            for c in ordered
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out} (server logs in {args.log_dir})")
    failed = [c for c in ordered if c.errors or not c.runs]
    return 1 if failed else 0


def _spread(runs: Sequence[dict[str, Any]]) -> dict[str, float] | None:
    values = [r["throughput_infer_s"] for r in runs]
    if not values:
        return None
    return {"min": min(values), "max": max(values), "mean": statistics.fmean(values)}


if __name__ == "__main__":
    raise SystemExit(main())
