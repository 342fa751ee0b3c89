"""A headless Locust run with an SLO gate: fails when a model's tail latency breaks its SLO
or any request fails.

    python -m loadtests.locust_gate --host 127.0.0.1:8001 --models digits:3,mlp64:1 \\
        [--users 8] [--spawn-rate 8] [--run-time 30s] [--model-repository model_repository] \\
        [--slo-ms digits=50] [--out loadtests/results/locust]

Runs `locust -f loadtests/locustfile.py --headless` (bounded by `--run-time`), which writes
CSV (`<out>/locust_stats.csv`, ...) and HTML (`<out>/locust.html`) reports, then checks each
model: the percentile named by its SLO's `latency_objective` (0.99 -> Locust's 99% column)
must be within `latency_threshold_ms` from the model's config.yaml (or `--slo-ms`, e.g. for
a remote server), and no request may fail. A model with no SLO is gated on errors only.
Exit status: 0 = passed, 1 = the gate failed, 2 = Locust itself failed.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from batchwire.config import DEFAULT_REPOSITORY, load_model_config

ROOT = Path(__file__).resolve().parents[1]
#: Locust's CSV percentile columns, as fractions.
PERCENTILE_COLUMNS = {
    0.5: "50%", 0.66: "66%", 0.75: "75%", 0.8: "80%", 0.9: "90%", 0.95: "95%", 0.98: "98%",
    0.99: "99%", 0.999: "99.9%", 0.9999: "99.99%", 1.0: "100%",
}  # fmt: skip


@dataclass(frozen=True)
class Slo:
    """The latency bound a model's percentile must meet."""

    threshold_ms: float
    objective: float = 0.99


@dataclass(frozen=True)
class Verdict:
    """One model's outcome."""

    model: str
    requests: int
    failures: int
    percentile: str
    latency_ms: float | None
    slo: Slo | None

    @property
    def passed(self) -> bool:
        if self.failures or self.requests == 0:
            return False
        return self.slo is None or (
            self.latency_ms is not None and self.latency_ms <= self.slo.threshold_ms
        )


def parse_models(text: str) -> list[tuple[str, float]]:
    """`digits:3,mlp64` -> [("digits", 3.0), ("mlp64", 1.0)]."""
    out = []
    for item in text.split(","):
        name, _, weight = item.strip().partition(":")
        if name:
            out.append((name, float(weight) if weight else 1.0))
    if not out:
        raise ValueError(f"no model in --models {text!r}")
    return out


def column_for(objective: float) -> str:
    """Locust's percentile column at or just above the objective."""
    for fraction in sorted(PERCENTILE_COLUMNS):
        if fraction >= objective - 1e-12:
            return PERCENTILE_COLUMNS[fraction]
    return "100%"


def slos_for(models: list[str], repository: Path, overrides: dict[str, float]) -> dict[str, Slo]:
    """Each model's SLO: `--slo-ms` first, else its config.yaml `slo:` block, if any."""
    out: dict[str, Slo] = {}
    for model in models:
        config = None
        if (repository / model / "config.yaml").is_file():
            config = load_model_config(repository / model)
        objective = config.slo.latency_objective if config and config.slo else 0.99
        if model in overrides:
            out[model] = Slo(overrides[model], objective)
        elif config is not None and config.slo is not None:
            out[model] = Slo(config.slo.latency_threshold_ms, objective)
    return out


def judge(stats_csv: Path, slos: dict[str, Slo], models: list[str]) -> list[Verdict]:
    """Verdicts from Locust's `_stats.csv` (one row per request name = model)."""
    rows = {row["Name"]: row for row in csv.DictReader(stats_csv.open())}
    verdicts = []
    for model in models:
        row = rows.get(model)
        slo = slos.get(model)
        column = column_for(slo.objective if slo else 0.99)
        if row is None:
            verdicts.append(Verdict(model, 0, 0, column, None, slo))
            continue
        latency = row.get(column)
        verdicts.append(
            Verdict(
                model,
                int(row["Request Count"]),
                int(row["Failure Count"]),
                column,
                float(latency) if latency not in (None, "", "N/A") else None,
                slo,
            )
        )
    return verdicts


def render(verdicts: list[Verdict]) -> str:
    """The gate's table."""
    lines = [
        f"{'model':<12} {'requests':>9} {'failures':>9} {'pctl':>6} {'ms':>9} {'slo ms':>8}  gate"
    ]
    for v in verdicts:
        latency = "-" if v.latency_ms is None else f"{v.latency_ms:.1f}"
        slo = "-" if v.slo is None else f"{v.slo.threshold_ms:g}"
        if v.passed:
            why = "pass" if v.slo else "pass (no SLO: errors only)"
        elif v.requests == 0:
            why = "FAIL: no requests"
        elif v.failures:
            why = f"FAIL: {v.failures} failed requests"
        else:
            why = f"FAIL: {v.percentile} {latency} ms > SLO {slo} ms"
        lines.append(
            f"{v.model:<12} {v.requests:>9} {v.failures:>9} {v.percentile:>6} {latency:>9} "
            f"{slo:>8}  {why}"
        )
    return "\n".join(lines) + "\n"


def parse_overrides(items: list[str]) -> dict[str, float]:
    """`["digits=50"]` -> {"digits": 50.0}."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--slo-ms wants MODEL=MS, got {item!r}")
        out[name] = float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1:8001", help="the server's gRPC address")
    parser.add_argument("--models", default="digits", help="name[:weight],... (default digits)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--spawn-rate", type=float, default=8.0)
    parser.add_argument("--run-time", default="30s", help="Locust's --run-time (e.g. 30s, 2m)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--model-repository", type=Path, default=DEFAULT_REPOSITORY)
    parser.add_argument("--slo-ms", action="append", default=[], metavar="MODEL=MS")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtests" / "results" / "locust")
    args = parser.parse_args(argv)

    models = [name for name, _ in parse_models(args.models)]
    slos = slos_for(models, args.model_repository, parse_overrides(args.slo_ms))
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / "locust"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "locustfile.py"),
        "--headless", "--host", args.host, "--users", str(args.users),
        "--spawn-rate", str(args.spawn_rate), "--run-time", args.run_time,
        "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
        "--models", args.models, "--batch-size", str(args.batch_size),
        "--exit-code-on-error", "0", "--stop-timeout", "10",
    ]  # fmt: skip
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, check=False)
    stats = Path(f"{prefix}_stats.csv")
    if proc.returncode != 0 or not stats.is_file():
        print(f"locust failed (exit {proc.returncode})", file=sys.stderr)
        return 2
    verdicts = judge(stats, slos, models)
    sys.stdout.write(render(verdicts))
    print(f"reports: {stats} and {prefix}.html")
    return 0 if all(v.passed for v in verdicts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
