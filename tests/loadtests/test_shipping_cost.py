"""`loadtests/shipping_cost`: the records reach each exporter, and the counts are per record."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from loadtests import shipping_cost
from loadtests.shipping_cost import main, measure_cpu, record


def test_the_records_are_what_the_inline_lane_records(tmp_path: Path) -> None:
    """Four spans a request, the engine span inside the server span, all in one file."""
    tracer = shipping_cost._tracer("file", tmp_path)
    try:
        record(tracer, 10)
        tracer.flush()
    finally:
        tracer.shutdown()
    spans = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
    assert sorted(s["name"] for s in spans) == sorted(
        ["inference.GRPCInferenceService/ModelInfer", "decode", "engine", "encode"] * 10
    )
    servers = {s["span_id"]: s for s in spans if s["kind"] == "SERVER"}
    for engine in (s for s in spans if s["name"] == "engine"):
        server = servers[engine["parent_span_id"]]
        assert server["start_ns"] < engine["start_ns"] < engine["end_ns"] < server["end_ns"]


@pytest.mark.parametrize("exporter", ["file", "otlp"])
def test_cpu_and_faults_are_counted_per_record(
    exporter: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    flushed: list[int] = []
    tracers: list[Any] = []
    made = shipping_cost._tracer

    def counting(kind: str, work: Path) -> Any:
        tracer = made(kind, work)
        flush = tracer.flush

        def counted() -> None:
            flushed.append(len(tracer._packed))
            flush()

        tracer.flush = counted
        tracers.append(tracer)
        return tracer

    monkeypatch.setattr(shipping_cost, "_tracer", counting)
    result = measure_cpu(exporter, records=40, rounds=3, work=tmp_path)
    # A warm-up, then each round (then the shutdown's, with nothing left), all exported.
    assert [n for n in flushed if n] == [40] * 4
    assert len(tracers) == 1 and tracers[0].exported_spans == 4 * 40 * 4
    assert result["cpu_us"] > 0 and result["minor_faults"] >= 0
    if exporter == "file":  # emptied after each round: it does not grow over a run
        assert (tmp_path / "spans.jsonl").stat().st_size == 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("callgrind_control") is None, reason="needs valgrind (callgrind)")
def test_instructions_are_counted_under_callgrind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shipping.json"
    assert main(["--records", "300", "--rounds", "1", "--instructions", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"file", "otlp"}
    # Encoding four spans takes thousands of instructions; a broken count reads 0 or huge.
    assert all(1_000 < r["instructions"] < 100_000 for r in results.values())
    assert "instructions" in capsys.readouterr().out
