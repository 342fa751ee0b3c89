"""`loadtests/monitoring_instructions`: callgrind's counts per phase and their summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loadtests.monitoring_instructions import dump_total, main, summarize
from loadtests.perf_analyzer import DEFAULT_TOOL


def test_a_dumps_total_is_its_summary_line(tmp_path: Path) -> None:
    dump = tmp_path / "callgrind.1.1"
    dump.write_text("version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 123456789\n")
    assert dump_total(dump) == 123_456_789
    dump.write_text("version: 1\nevents: Ir\n")
    with pytest.raises(ValueError, match="no callgrind summary"):
        dump_total(dump)


def test_the_summary_takes_medians_and_charges_the_evaluation_per_request() -> None:
    pairs = [  # (with, without): requests, instructions, the event loop's instructions
        ((1000, 510_000_000, 400_000_000), (1000, 500_000_000, 397_000_000)),
        ((2000, 1_040_000_000, 802_000_000), (1000, 500_000_000, 398_000_000)),
        ((1000, 560_000_000, 450_000_000), (1000, 480_000_000, 396_000_000)),  # an outlier
    ]
    result = {
        "evaluation_instructions": 6_000_000,
        "pairs": [
            {"on_requests": on[0], "on_instructions": on[1], "on_loop_instructions": on[2],
             "off_requests": off[0], "off_instructions": off[1],
             "off_loop_instructions": off[2]}
            for on, off in pairs
        ],
    }  # fmt: skip
    summary = summarize(result, rate=6000)
    assert summary["on_per_request"] == 520_000  # median of 510k, 520k, 560k
    assert summary["off_per_request"] == 500_000
    assert summary["added_per_request"] == 20_000
    assert summary["loop_added_per_request"] == 401_000 - 397_000  # medians: 400k, 401k, 450k
    assert summary["median_pair_ratio"] == pytest.approx(500 / 520)  # of 500/510, 500/520, 480/560
    assert summary["evaluation_per_request"] == 1000  # 6M instructions shared by 6,000 requests
    assert summary["estimated_ratio"] == pytest.approx(500_000 / 521_000)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("valgrind") is None or shutil.which("callgrind_control") is None,
    reason="needs valgrind (callgrind)",
)
@pytest.mark.skipif(not DEFAULT_TOOL.exists(), reason="needs perf_analyzer (make perf-analyzer)")
def test_a_short_run_counts_both_kinds_of_phase(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "instructions.json"
    args = ["--only", "metrics+slo+drift", "--pairs", "1", "--requests", "200", "--out", str(out)]
    assert main(args) == 0
    (row,) = json.loads(out.read_text())["results"]
    (pair,) = row["pairs"]
    # Phases are cut once the requests are served: a few more can land in them.
    assert pair["on_requests"] >= 200 and pair["off_requests"] >= 200
    # A request takes hundreds of thousands of instructions (grpc, protobuf, the model).
    assert row["off_per_request"] > 50_000 and row["on_per_request"] > 50_000
    # The event loop runs most of it, not all (grpc's poller thread, the shipper...).
    assert 0 < pair["off_loop_instructions"] < pair["off_instructions"]
    assert row["evaluation_instructions"] > 0 and row["slowdown"] > 1
    assert row["lane_strides"] and all(s >= 1 for s in row["lane_strides"])
    assert "metrics+slo+drift" in capsys.readouterr().out
