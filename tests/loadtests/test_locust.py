"""A short headless Locust run against a real server passes its SLO gate (Locust runs in a
subprocess: it monkey-patches with gevent)."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.locust_gate import Slo, column_for, judge, main, parse_models, render
from tests.support import ServerProcess, start_server

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def server(
    digits_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    process = start_server(digits_repository, tmp_path_factory.mktemp("locust") / "server.log")
    try:
        yield process
    finally:
        assert process.terminate() == 0


def test_headless_run_passes_the_gate_and_writes_reports(
    server: ServerProcess, digits_repository: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code = main([
        "--host", server.address, "--models", "digits", "--users", "4", "--run-time", "4s",
        "--model-repository", str(digits_repository), "--slo-ms", "digits=1000",
        "--out", str(tmp_path),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "digits" in out and "pass" in out
    rows = {r["Name"]: r for r in csv.DictReader((tmp_path / "locust_stats.csv").open())}
    assert int(rows["digits"]["Request Count"]) > 0 and rows["digits"]["Type"] == "grpc"
    assert int(rows["digits"]["Failure Count"]) == 0
    assert (tmp_path / "locust.html").read_text().lstrip().lower().startswith("<!doctype html")


def test_gate_fails_on_a_broken_slo_and_on_errors(
    server: ServerProcess, digits_repository: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code = main([
        "--host", server.address, "--models", "digits:1,nosuchmodel:0", "--users", "2",
        "--run-time", "3s", "--model-repository", str(digits_repository),
        "--slo-ms", "digits=0.001", "--out", str(tmp_path),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code in (1, 2), out  # 2: Locust stops users whose ModelMetadata fails at start
    if code == 1:
        assert "FAIL" in out and "digits" in out


def test_judge_and_column_choice(tmp_path: Path) -> None:
    stats = tmp_path / "s.csv"
    header = ["Type", "Name", "Request Count", "Failure Count", "99%", "99.9%"]
    with stats.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerow(["grpc", "a", "100", "0", "20", "40"])
        writer.writerow(["grpc", "b", "100", "2", "5", "6"])
    verdicts = {
        v.model: v for v in judge(stats, {"a": Slo(30, 0.999), "b": Slo(30)}, ["a", "b", "c"])
    }
    assert not verdicts["a"].passed and verdicts["a"].percentile == "99.9%"
    assert not verdicts["b"].passed  # failures
    assert not verdicts["c"].passed  # no requests
    assert "FAIL: 99.9% 40.0 ms > SLO 30 ms" in render(list(verdicts.values()))
    assert column_for(0.99) == "99%" and column_for(0.995) == "99.9%"
    assert parse_models("digits:3, mlp64") == [("digits", 3.0), ("mlp64", 1.0)]
    assert "locust" not in sys.modules  # gevent's monkey-patching never entered pytest
