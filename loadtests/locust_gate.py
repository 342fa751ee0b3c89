"""A headless Locust run gated on each model's latency SLO and on errors (`make loadtest`).

    python -m loadtests.locust_gate --host 127.0.0.1:8001 --models digits:3,mlp64:1 \\
        [--users 8] [--spawn-rate 8] [--run-time 30s] [--batch-size 1] \\
        [--model-repository model_repository] [--slo-ms digits=50] [--out loadtests/results/locust]

Runs `locust -f loadtests/locustfile.py --headless` in a subprocess (Locust monkey-patches
the process with gevent, so this module never imports it), bounded by `--run-time`, which
writes CSV (`<out>/locust_stats.csv`, `_failures.csv`, ...) and HTML (`<out>/locust.html`)
reports. Then, for each model, the Locust percentile at the SLO's `latency_objective`
(0.99 -> the `99%` column) must be within `latency_threshold_ms` of the model's
config.yaml `slo:` block (`--slo-ms MODEL=MS` sets or overrides it, e.g. for a remote
server whose repository is not at hand), and no request may fail. A model with no SLO is
gated on errors only, and says so.

Latencies are Locust's client-side times (closed loop, rounded to 2 significant digits
above 100 ms), so the gate is stricter than the server-side SLO monitor.
Exit status: 0 = passed, 1 = the gate failed, 2 = Locust itself failed.

This module is the gevent-free half of the load test: the locustfile imports its model
parsing and request building, and tests import all of it.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from batchwire.config import CONFIG_FILENAME, DEFAULT_REPOSITORY, load_model_config
from protos import grpc_service_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
DEFAULT_OUT = ROOT / "loadtests" / "results" / "locust"
DEFAULT_OBJECTIVE = 0.99
#: Environment variable through which the locustfile learns the extra percentile columns
#: the gate needs (comma-separated fractions, e.g. "0.995").
PERCENTILES_ENV = "BATCHWIRE_LOCUST_PERCENTILES"

NUMPY: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip
#: The sentence sent to a BYTES (text) input.
SAMPLE_TEXT = b"batchwire serves models over the Open Inference Protocol"


@dataclass(frozen=True, slots=True)
class Slo:
    """The latency bound a model's percentile must meet."""

    threshold_ms: float
    objective: float = DEFAULT_OBJECTIVE


@dataclass(frozen=True, slots=True)
class Verdict:
    """One model's outcome of a run."""

    model: str
    requests: int
    failures: int
    percentile: str
    """The Locust CSV column gated on (e.g. `99%`)."""
    latency_ms: float | None
    slo: Slo | None
    error: str = ""
    """The most frequent failure message, if any failed."""

    @property
    def passed(self) -> bool:
        """Requests were made, none failed, and the percentile is within the SLO (if any)."""
        if self.failures or self.requests == 0:
            return False
        return self.slo is None or (
            self.latency_ms is not None and self.latency_ms <= self.slo.threshold_ms
        )

    def reason(self) -> str:
        """Why it passed or failed, with the numbers."""
        if self.requests == 0:
            return "FAIL: no requests"
        if self.failures:
            return f"FAIL: {self.failures} of {self.requests} requests failed ({self.error})"
        if self.slo is None:
            return "pass (no SLO: gated on errors only)"
        latency = "N/A" if self.latency_ms is None else f"{self.latency_ms:g} ms"
        bound = f"{self.percentile} {latency} vs SLO {self.slo.threshold_ms:g} ms"
        return f"pass: {bound}" if self.passed else f"FAIL: {bound}"


def parse_models(text: str) -> list[tuple[str, float]]:
    """Models and task weights: `digits:3,mlp64` -> [("digits", 3.0), ("mlp64", 1.0)].

    Raises:
        ValueError: No model named, or a weight that is not a positive number.
    """
    out = []
    for item in text.split(","):
        name, _, weight_text = item.strip().partition(":")
        if not name:
            continue
        weight = float(weight_text) if weight_text else 1.0
        if not weight > 0:
            raise ValueError(f"model weight must be > 0: {item!r}")
        out.append((name, weight))
    if not out:
        raise ValueError(f"no model in {text!r}")
    return out


def build_request(
    metadata: pb.ModelMetadataResponse, batch_size: int, rng: np.random.Generator
) -> pb.ModelInferRequest:
    """A valid request for the model: random numbers, or a sentence for BYTES inputs.

    Args:
        metadata: The model's ModelMetadata answer (inputs with datatype and shape).
        batch_size: Samples per request (replaces a -1 first dim).
        rng: Source of the random values.

    Returns:
        A ModelInferRequest with one `raw_input_contents` blob per input. A model with a
        BYTES (text) input gets only its BYTES inputs (it also accepts token ids instead,
        but not both).
    """
    inputs = list(metadata.inputs)
    if any(t.datatype == "BYTES" for t in inputs):
        inputs = [t for t in inputs if t.datatype == "BYTES"]
    request = pb.ModelInferRequest(model_name=metadata.name)
    for tensor in inputs:
        shape = [
            batch_size if i == 0 and d == -1 else max(d, 1) for i, d in enumerate(tensor.shape)
        ]
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        count = int(np.prod(shape))
        if tensor.datatype == "BYTES":
            element = len(SAMPLE_TEXT).to_bytes(4, "little") + SAMPLE_TEXT
            request.raw_input_contents.append(element * count)
        else:
            dtype = NUMPY[tensor.datatype]
            values = rng.random(count) * (16 if np.issubdtype(dtype, np.floating) else 1)
            request.raw_input_contents.append(values.astype(dtype).tobytes())
    return request


def parse_overrides(items: list[str]) -> dict[str, float]:
    """`--slo-ms` values: `["digits=50"]` -> {"digits": 50.0}.

    Raises:
        ValueError: An item that is not `MODEL=MS`.
    """
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not name or not value:
            raise ValueError(f"--slo-ms wants MODEL=MS, got {item!r}")
        out[name] = float(value)
    return out


def column_name(fraction: float) -> str:
    """Locust's CSV column of a percentile, its formatting (0.99 -> `99%`, 0.995 -> `99.5%`)."""
    percent = fraction * 100
    return f"{int(percent) if percent.is_integer() else round(percent, 6)}%"


def slos_for(models: list[str], repository: Path, overrides: dict[str, float]) -> dict[str, Slo]:
    """Each model's SLO: `--slo-ms` first, else its config.yaml `slo:` block, if any.

    Args:
        models: The models in the run.
        repository: Model repository holding `<model>/config.yaml` (may lack a model).
        overrides: Thresholds from `--slo-ms`, by model.

    Returns:
        The SLO of each model that has one; the objective comes from config.yaml when it
        is there (even for an overridden threshold), else 0.99.
    """
    out: dict[str, Slo] = {}
    for model in models:
        slo = None
        if (repository / model / CONFIG_FILENAME).is_file():
            slo = load_model_config(repository / model).slo
        objective = slo.latency_objective if slo else DEFAULT_OBJECTIVE
        if model in overrides:
            out[model] = Slo(overrides[model], objective)
        elif slo is not None:
            out[model] = Slo(slo.latency_threshold_ms, objective)
    return out


def _message(error: str) -> str:
    """`GrpcError("NOT_FOUND: ...")` (Locust keeps an exception's repr) -> `NOT_FOUND: ...`."""
    match = re.fullmatch(r"""\w+\((['"])(.*)\1\)""", error, re.DOTALL)
    return match.group(2) if match else error


def _float(text: str | None) -> float | None:
    return float(text) if text not in (None, "", "N/A") else None


def judge(prefix: Path, slos: dict[str, Slo], models: list[str]) -> list[Verdict]:
    """Verdicts from Locust's CSV reports (`<prefix>_stats.csv`, `<prefix>_failures.csv`).

    Rows are matched by name (the locustfile names each request after its model). When
    the exact percentile column is missing, the next higher one is used (stricter).
    """
    with open(f"{prefix}_stats.csv", newline="") as f:
        reader = csv.DictReader(f)
        columns = {
            name: float(name[:-1]) / 100 for name in reader.fieldnames or () if name[-1:] == "%"
        }
        rows = {row["Name"]: row for row in reader}
    errors: dict[str, tuple[int, str]] = {}
    failures_csv = Path(f"{prefix}_failures.csv")
    if failures_csv.is_file():
        with failures_csv.open(newline="") as f:
            for failure in csv.DictReader(f):
                count = int(failure["Occurrences"])
                if count > errors.get(failure["Name"], (0, ""))[0]:
                    errors[failure["Name"]] = (count, _message(failure["Error"]))
    verdicts = []
    for model in models:
        slo = slos.get(model)
        wanted = slo.objective if slo else DEFAULT_OBJECTIVE
        column = column_name(wanted)
        if column not in columns:
            above = [name for name, fraction in columns.items() if fraction >= wanted]
            column = min(above, key=columns.__getitem__, default="100%")
        row = rows.get(model)
        if row is None:
            verdicts.append(Verdict(model, 0, 0, column, None, slo))
            continue
        verdicts.append(
            Verdict(
                model,
                int(row["Request Count"]),
                int(row["Failure Count"]),
                column,
                _float(row.get(column)),
                slo,
                errors.get(model, (0, ""))[1],
            )
        )
    return verdicts


def render(verdicts: list[Verdict]) -> str:
    """The gate's table, one line per model."""
    lines = [
        f"{'model':<14} {'requests':>9} {'failures':>9} {'pctl':>7} {'ms':>8} {'slo ms':>8}  gate"
    ]
    for v in verdicts:
        latency = "-" if v.latency_ms is None else f"{v.latency_ms:g}"
        slo = "-" if v.slo is None else f"{v.slo.threshold_ms:g}"
        lines.append(
            f"{v.model:<14} {v.requests:>9} {v.failures:>9} {v.percentile:>7} {latency:>8} "
            f"{slo:>8}  {v.reason()}"
        )
    return "\n".join(lines) + "\n"


def locust_command(args: argparse.Namespace, prefix: Path) -> list[str]:
    """The headless Locust command line for the gate's arguments."""
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", args.host, "--users", str(args.users),
        "--spawn-rate", str(args.spawn_rate or args.users), "--run-time", args.run_time,
        "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
        "--models", args.models, "--batch-size", str(args.batch_size),
        "--request-timeout-s", str(args.request_timeout_s),
        # The gate judges errors itself; in-flight requests finish when the time is up.
        "--exit-code-on-error", "0", "--stop-timeout", "10",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Run Locust headless, print the gate's table, and return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.locust_gate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1:8001", help="the server's gRPC HOST:PORT")
    parser.add_argument("--models", default="digits", help="name[:weight],... (default digits)")
    parser.add_argument("--users", type=int, default=8, help="concurrent users (closed loop)")
    parser.add_argument("--spawn-rate", type=float, default=None, help="default: all at once")
    parser.add_argument("--run-time", default="30s", help="Locust's --run-time (e.g. 30s, 2m)")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per request")
    parser.add_argument("--request-timeout-s", type=float, default=30.0)
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=DEFAULT_REPOSITORY,
        help="where each model's config.yaml (and its slo: block) is read",
    )
    parser.add_argument(
        "--slo-ms",
        action="append",
        default=[],
        metavar="MODEL=MS",
        help="latency threshold of a model (overrides config.yaml); repeatable",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="report folder")
    args = parser.parse_args(argv)
    try:
        models = [name for name, _ in parse_models(args.models)]
        slos = slos_for(models, args.model_repository, parse_overrides(args.slo_ms))
    except ValueError as error:
        parser.error(str(error))
    for model in models:
        if model not in slos:
            print(f"{model}: no SLO in its config.yaml nor --slo-ms: gated on errors only")

    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / "locust"
    for stale in args.out.glob("locust_*.csv"):
        stale.unlink()  # never judge a previous run's numbers
    extra = sorted({slo.objective for slo in slos.values()})
    env = dict(os.environ, **{PERCENTILES_ENV: ",".join(map(str, extra))})
    command = locust_command(args, prefix)
    print(" ".join(command), flush=True)
    proc = subprocess.run(command, cwd=ROOT, env=env, check=False)
    if not Path(f"{prefix}_stats.csv").is_file():
        print(f"locust failed (exit {proc.returncode}) and wrote no stats", file=sys.stderr)
        return 2
    verdicts = judge(prefix, slos, models)
    sys.stdout.write(render(verdicts))
    print(f"reports: {prefix}_stats.csv, {prefix}_failures.csv, {prefix}.html")
    if proc.returncode != 0:
        print(f"locust failed (exit {proc.returncode})", file=sys.stderr)
        return 2
    failed = [v for v in verdicts if not v.passed]
    for v in failed:
        print(f"SLO gate failed: {v.model}: {v.reason()}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
