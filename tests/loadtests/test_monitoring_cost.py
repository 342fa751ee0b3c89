"""`loadtests/monitoring_cost`: the in-process cost benchmark measures what it says."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from loadtests.monitoring_cost import measure


def test_every_setting_is_measured_and_traced_settings_ship_their_spans(tmp_path: Path) -> None:
    samples = asyncio.run(measure(blocks=2, calls=30, work=tmp_path))
    assert list(samples) == [
        "off", "metrics+slo+drift", "tracing 10% file", "tracing 100% file",
        "tracing 100% otlp",
    ]  # fmt: skip
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in samples.values())
    # Every call took the inline path (a CPU-lane request: server, decode, engine, encode
    # spans) and its spans were shipped within the measured block.
    spans = [json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines()]
    assert len(spans) == 2 * 30 * 4
    assert {s["name"] for s in spans} == {
        "inference.GRPCInferenceService/ModelInfer", "decode", "engine", "encode",
    }  # fmt: skip
