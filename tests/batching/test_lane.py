"""CpuLane: runs eligible requests at once, never queues, hands overflow back as None."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from batching.lane import CpuLane
from batchwire.errors import ErrorCode, InferenceError
from tests.batching.test_batcher import FakeEngine, x

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


async def test_eligible_request_runs_at_once() -> None:
    engine = FakeEngine()
    lane = CpuLane([engine], max_samples=2)
    out = await lane.try_run(x(1, 2), samples=2)
    assert out is not None
    np.testing.assert_array_equal(out["Y"], x(2, 4)["X"])
    assert lane.requests_total == 1
    lane.close()


async def test_larger_requests_are_not_eligible() -> None:
    engine = FakeEngine()
    lane = CpuLane([engine], max_samples=1)
    assert await lane.try_run(x(1, 2), samples=2) is None
    assert engine.batches == [] and lane.requests_total == 0
    lane.close()


async def test_busy_lane_answers_none_instead_of_queueing() -> None:
    engine = FakeEngine(gated=True)
    lane = CpuLane([engine], max_samples=1)
    first = asyncio.ensure_future(lane.try_run(x(1), samples=1))
    await engine.wait_entered()
    assert await lane.try_run(x(2), samples=1) is None  # overflow goes to the batcher
    engine.gate.set()
    out = await first
    assert out is not None and out["Y"][0, 0] == 2
    assert await lane.try_run(x(3), samples=1) is not None  # the instance is free again
    lane.close()


async def test_inline_lane_runs_on_the_loop_thread() -> None:
    engine = FakeEngine()
    lane = CpuLane([engine], max_samples=4, inline=True)
    out = await lane.try_run(x(5), samples=1)
    assert out is not None and out["Y"][0, 0] == 10
    lane.close()


async def test_engine_failure_is_an_internal_error() -> None:
    lane = CpuLane([FakeEngine()], max_samples=1)
    with pytest.raises(InferenceError) as exc:
        await lane.try_run(x(-1), samples=1)
    assert exc.value.code is ErrorCode.INTERNAL and "poisoned" in exc.value.message
    lane.close()
