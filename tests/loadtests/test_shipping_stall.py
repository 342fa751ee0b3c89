"""`loadtests/shipping_stall`: each variant is measured and the tracer is left as it was."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.shipping_stall import VARIANTS, measure
from monitoring import tracing


def test_every_variant_ships_its_records_and_the_tracer_is_restored(tmp_path: Path) -> None:
    hand_over, chunk = tracing._hand_over_gil, tracing.SHIP_CHUNK
    results = measure(records=50, flushes=2, work=tmp_path)
    assert list(results) == [name for name, _ in VARIANTS]
    for flushes in results.values():
        assert len(flushes) == 2
        assert all(f["longest_wait_us"] >= f["median_wait_us"] > 0 for f in flushes)
    assert tracing._hand_over_gil is hand_over and chunk == tracing.SHIP_CHUNK
    spans = (tmp_path / "s.jsonl").read_text().splitlines()
    assert len(spans) == len(VARIANTS) * 2 * 50 * 4  # server, decode, engine, encode
    assert {json.loads(line)["name"] for line in spans} == {
        "inference.GRPCInferenceService/ModelInfer", "decode", "engine", "encode",
    }  # fmt: skip
