"""`loadtests/monitoring_paired`: switching monitoring on and off in a running server, and
the statistics of the pairs."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from loadtests.monitoring_paired import MonitoringSwitch, Phase, measure_pairs, summarize, verdict
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import start_traced_mlp64


@pytest.mark.asyncio
async def test_monitoring_sees_exactly_the_requests_served_while_it_is_switched_on(
    tmp_path: Path,
) -> None:
    server, spans_file = await start_traced_mlp64(tmp_path)
    switch = MonitoringSwitch(server)
    (drift,) = server.monitoring.drift_monitors()
    served_on = served_off = 0
    switched_on_at: int | None = None
    switched_off_at: int | None = None
    set_monitoring = switch.set

    def counting_set(on: bool) -> None:  # requests served while switched on (off), exactly
        nonlocal served_on, served_off, switched_on_at, switched_off_at
        if on and switched_on_at is None:
            switched_on_at = switch.served()
            if switched_off_at is not None:
                served_off += switched_on_at - switched_off_at
                switched_off_at = None
        elif not on and switched_on_at is not None:
            switched_off_at = switch.served()
            served_on += switched_off_at - switched_on_at
            switched_on_at = None
        set_monitoring(on)

    switch.set = counting_set  # type: ignore[method-assign]
    credited: list[int] = []
    count_lane_requests = drift.count_lane_requests

    def counting_credit(requests: int) -> None:
        credited.append(requests)
        count_lane_requests(requests)

    drift.count_lane_requests = counting_credit  # type: ignore[method-assign]
    stop = asyncio.Event()
    request = pb.ModelInferRequest(model_name="mlp64")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(np.full(64, 0.5, np.float32).tobytes())

    async def load() -> int:
        sent = 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + 60
            while not stop.is_set() and sent < 100_000 and time.monotonic() < deadline:
                await stub.ModelInfer(request)
                sent += 1
        return sent

    try:
        client = asyncio.create_task(load())
        pairs = await measure_pairs(switch, pairs=2, phase_s=0.3)
        stop.set()
        sent = await client
    finally:
        stop.set()
        await server.stop(1.0)
    assert len(pairs) == 2
    assert all(on.on and not off.on and on.requests > 0 and off.requests > 0 for on, off in pairs)
    assert sum(on.requests + off.requests for on, off in pairs) <= sent
    assert 0 < served_on <= sum(on.requests for on, _ in pairs)
    servers = [
        s for s in map(json.loads, spans_file.read_text().splitlines()) if s["kind"] == "SERVER"
    ]
    assert len(servers) == served_on  # traced while on, never while off
    # Drift observes while on only, and its rate estimate counts the requests it was not
    # shown while off (all of them, up to the last switch on): the lane's whole traffic.
    assert 0 < drift.observed_total <= served_on
    assert len(credited) > 2 and sum(credited) == served_off > 0


def phases(rates: list[tuple[float, float]], seconds: float = 1.0) -> list[tuple[Phase, Phase]]:
    return [
        (Phase(True, int(on * seconds), seconds, 0.1, 0.2),
         Phase(False, int(off * seconds), seconds, 0.1, 0.2))
        for on, off in rates
    ]  # fmt: skip


def test_summary_of_pairs_with_one_ratio_is_that_ratio() -> None:
    summary = summarize(phases([(900, 1000), (1800, 2000), (450, 500)]))
    assert summary["median_ratio"] == pytest.approx(0.9)
    assert summary["pooled_ratio"] == pytest.approx(0.9)
    assert summary["pooled_ratio_95"] == pytest.approx([0.9, 0.9])
    assert summary["off_loop_cpu_us"] == pytest.approx(3 * 0.1 / 3500 * 1e6)
    assert summary["on_process_cpu_us"] == pytest.approx(3 * 0.2 / 3150 * 1e6)
    assert verdict(summary, 0.89) == "met" and verdict(summary, 0.91) == "MISSED"


def test_a_wide_interval_is_neither_met_nor_missed() -> None:
    rates = [(1000, 1000), (800, 1000), (1100, 1000), (850, 1000), (950, 1000), (900, 1000)]
    summary = summarize(phases(rates))
    low, high = summary["pooled_ratio_95"]
    assert summary["pooled_ratio"] == pytest.approx(5600 / 6000)
    assert low < summary["pooled_ratio"] < high
    assert summary["q1_ratio"] < summary["median_ratio"] < summary["q3_ratio"]
    assert verdict(summary, 0.93) == "unsure" and verdict(summary, None) == ""
