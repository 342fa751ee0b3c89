"""Locust against a real server: a short headless run passes its SLO gate; errors fail it.

NOTE: Locust monkey-patches its process with gevent, so it runs only in subprocesses
started by `loadtests.locust_gate`; this process never imports it (checked below).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from batchwire.config import SloConfig, load_model_config, write_model_config
from loadtests.locust_gate import (
    SAMPLE_TEXT,
    Slo,
    Verdict,
    build_request,
    column_name,
    judge,
    main,
    parse_models,
    parse_overrides,
    render,
    slos_for,
)
from protos import grpc_service_pb2 as pb
from server.codec import decode_request
from tests.support import ServerProcess

pytestmark = pytest.mark.timeout(240)

# A bound for "the run finished": this box is shared and busy, so the gate's own test
# sets an SLO that only a stalled server misses; the gate logic is tested exactly below.
GENEROUS_SLO_MS = 10_000.0


def _config_with_slo(digits_repository: Path, root: Path, slo: SloConfig) -> Path:
    """A repository holding only digits/config.yaml, with an `slo:` block (the gate reads
    config.yaml; the server keeps serving its own repository)."""
    config = load_model_config(digits_repository / "digits").model_copy(update={"slo": slo})
    (root / "digits").mkdir(parents=True)
    write_model_config(root / "digits", config)
    return root


def _stats(out: Path) -> dict[str, dict[str, str]]:
    with (out / "locust_stats.csv").open(newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def test_short_headless_run_passes_its_slo_gate(
    server_process: ServerProcess, digits_repository: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # 0.995 is not one of Locust's default columns: the gate has the locustfile add it.
    slo = SloConfig(latency_threshold_ms=GENEROUS_SLO_MS, latency_objective=0.995)
    repository = _config_with_slo(digits_repository, tmp_path / "repo", slo)
    out = tmp_path / "reports"
    code = main([
        "--host", server_process.address, "--models", "digits", "--users", "4",
        "--run-time", "3s", "--model-repository", str(repository), "--out", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "pass: 99.5%" in printed
    row = _stats(out)["digits"]
    assert row["Type"] == "grpc" and int(row["Request Count"]) > 0
    assert int(row["Failure Count"]) == 0
    assert float(row["Average Content Size"]) > 0  # the serialized response size
    # It ran for its --run-time (a stale gevent clock once cut 4 s runs to 0.5 s).
    assert int(row["Request Count"]) / float(row["Requests/s"]) >= 2.8
    assert float(row["99.5%"]) <= GENEROUS_SLO_MS
    html = (out / "locust.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "digits" in html


def test_failed_requests_fail_the_gate_naming_the_model(
    server_process: ServerProcess, digits_repository: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code = main([
        "--host", server_process.address, "--models", "digits:2,nosuchmodel:1",
        "--users", "2", "--run-time", "2s", "--model-repository", str(digits_repository),
        "--slo-ms", f"digits={GENEROUS_SLO_MS}", "--out", str(tmp_path),
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1, captured.out
    lines = {line.split()[0]: line for line in captured.out.splitlines() if line}
    assert "pass: 99%" in lines["digits"]
    assert "FAIL" in lines["nosuchmodel"] and "NOT_FOUND: unknown model" in lines["nosuchmodel"]
    assert "SLO gate failed: nosuchmodel" in captured.err
    rows = _stats(tmp_path)
    assert int(rows["nosuchmodel"]["Failure Count"]) == int(rows["nosuchmodel"]["Request Count"])
    assert int(rows["nosuchmodel"]["Failure Count"]) > 0


def _write_stats(prefix: Path, rows: list[list[str]], failures: list[list[str]]) -> None:
    with open(f"{prefix}_stats.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Type", "Name", "Request Count", "Failure Count", "99%", "99.9%"])
        writer.writerows(rows)
    with open(f"{prefix}_failures.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Method", "Name", "Error", "Occurrences"])
        writer.writerows(failures)


def test_judge_gates_each_model_on_its_percentile_and_errors(tmp_path: Path) -> None:
    prefix = tmp_path / "locust"
    _write_stats(
        prefix,
        [
            ["grpc", "slow", "100", "0", "20", "40"],
            ["grpc", "fast", "100", "0", "20", "40"],
            ["grpc", "errors", "100", "2", "5", "6"],
            ["grpc", "nosla", "100", "0", "900", "990"],
            ["", "Aggregated", "400", "2", "900", "990"],
        ],
        [
            ["grpc", "errors", "GrpcError('UNAVAILABLE: gone')", "1"],
            ["grpc", "errors", "GrpcError(\"INTERNAL: engine 'x' failed\")", "2"],
        ],
    )
    slos = {"slow": Slo(30, 0.995), "fast": Slo(30), "errors": Slo(30)}
    verdicts = {
        v.model: v for v in judge(prefix, slos, ["slow", "fast", "errors", "nosla", "gone"])
    }
    # 99.5% is not a column here: the next higher one (99.9%) is used.
    assert verdicts["slow"].percentile == "99.9%" and not verdicts["slow"].passed
    assert verdicts["fast"].percentile == "99%" and verdicts["fast"].passed
    assert not verdicts["errors"].passed
    assert verdicts["nosla"].passed  # no SLO: errors only
    assert not verdicts["gone"].passed  # never requested
    table = render(list(verdicts.values()))
    assert "FAIL: 99.9% 40 ms vs SLO 30 ms" in table
    assert "pass: 99% 20 ms vs SLO 30 ms" in table
    assert "FAIL: 2 of 100 requests failed (INTERNAL: engine 'x' failed)" in table
    assert "pass (no SLO: gated on errors only)" in table
    assert "FAIL: no requests" in table


def test_slos_come_from_config_yaml_unless_overridden(
    digits_repository: Path, tmp_path: Path
) -> None:
    slo = SloConfig(latency_threshold_ms=50, latency_objective=0.999)
    repository = _config_with_slo(digits_repository, tmp_path, slo)
    assert slos_for(["digits", "remote"], repository, {}) == {"digits": Slo(50, 0.999)}
    assert slos_for(["digits", "remote"], repository, {"digits": 80, "remote": 25}) == {
        "digits": Slo(80, 0.999),
        "remote": Slo(25, 0.99),
    }


def test_arguments_and_column_names() -> None:
    assert parse_models("digits:3, mlp64") == [("digits", 3.0), ("mlp64", 1.0)]
    with pytest.raises(ValueError):
        parse_models("digits:0")
    with pytest.raises(ValueError):
        parse_models(" , ")
    assert parse_overrides(["digits=50", "mlp64=2.5"]) == {"digits": 50.0, "mlp64": 2.5}
    with pytest.raises(ValueError):
        parse_overrides(["digits"])
    assert [column_name(p) for p in (0.5, 0.99, 0.995, 0.999, 0.9999, 1.0)] == [
        "50%", "99%", "99.5%", "99.9%", "99.99%", "100%",
    ]  # fmt: skip
    assert Verdict("m", 10, 0, "99%", None, Slo(5)).reason() == "FAIL: 99% N/A vs SLO 5 ms"
    assert "locust" not in sys.modules  # gevent's monkey-patching never entered pytest


def _metadata(name: str, *inputs: tuple[str, str, list[int]]) -> pb.ModelMetadataResponse:
    metadata = pb.ModelMetadataResponse(name=name)
    for tensor_name, datatype, shape in inputs:
        metadata.inputs.add(name=tensor_name, datatype=datatype, shape=shape)
    return metadata


def test_request_bodies_follow_model_metadata() -> None:
    rng = np.random.default_rng(0)
    digits = build_request(_metadata("digits", ("INPUT", "FP32", [-1, 1, 8, 8])), 4, rng)
    decoded = decode_request(digits, None).inputs
    assert digits.model_name == "digits"
    assert decoded["INPUT"].shape == (4, 1, 8, 8) and decoded["INPUT"].dtype == np.float32
    # A text model gets only its BYTES input (it takes text or token ids, not both).
    minilm = _metadata(
        "minilm", ("TEXT", "BYTES", [-1, 1]), ("input_ids", "INT64", [-1, -1]),
        ("attention_mask", "INT64", [-1, -1]),
    )  # fmt: skip
    text = decode_request(build_request(minilm, 2, rng), None).inputs
    assert list(text) == ["TEXT"] and text["TEXT"].shape == (2, 1)
    assert all(value == SAMPLE_TEXT for value in text["TEXT"].ravel())
    ids = build_request(_metadata("ids", ("input_ids", "INT64", [-1, -1])), 3, rng)
    assert decode_request(ids, None).inputs["input_ids"].shape == (3, 1)
