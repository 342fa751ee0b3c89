"""DynamicBatcher behaviour through its seam, with a fake engine and a fake clock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable

import numpy as np
import pytest

from batching.batcher import DynamicBatcher
from batching.policy import BatchPolicy
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import TensorSpec

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


class FakeEngine:
    """y = 2x; records each batch's values; can hold a batch in compute; fails on -1."""

    inputs = (TensorSpec("X", "FP32", (1,)),)
    outputs = (TensorSpec("Y", "FP32", (1,)),)

    def __init__(self, max_batch_size: int = 64, gated: bool = False) -> None:
        self.max_batch_size = max_batch_size
        self.batches: list[list[float]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["X"]
        self.batches.append(x.reshape(-1).tolist())
        self.entered.set()
        assert self.gate.wait(20), "test never released the gate"
        if (x == -1).any():
            raise RuntimeError("poisoned input")
        return {"Y": x * 2}

    def warmup(self) -> None:
        pass

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 20)
        self.entered.clear()


class FakeClock:
    def __init__(self) -> None:
        self.now_ns = 1_000_000

    def __call__(self) -> int:
        return self.now_ns


def x(*values: float) -> dict[str, np.ndarray]:
    return {"X": np.array(values, dtype=np.float32).reshape(-1, 1)}


async def until(condition: object, what: str) -> None:
    """Yield to the loop until `condition()` holds (bounded; no wall-clock sleeping)."""
    for _ in range(10_000):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def make(engine: FakeEngine, **kw: object) -> DynamicBatcher:
    policy = kw.pop("policy", BatchPolicy(max_batch_size=engine.max_batch_size))
    batcher = DynamicBatcher([engine], policy, **kw)  # type: ignore[arg-type]
    batcher.start()
    return batcher


async def expect(code: ErrorCode, awaitable: Awaitable[object]) -> InferenceError:
    with pytest.raises(InferenceError) as exc:
        await awaitable
    assert exc.value.code is code, exc.value
    return exc.value


async def test_each_request_gets_exactly_its_own_rows() -> None:
    engine = FakeEngine()
    batcher = make(engine, policy=BatchPolicy(64, (), 2_000_000))
    sizes = [1, 3, 2, 5, 1, 4, 1, 2]
    requests, start = [], 0
    for n in sizes:
        requests.append(x(*range(start, start + n)))
        start += n
    results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    for request, result in zip(requests, results, strict=True):
        np.testing.assert_array_equal(result["Y"], request["X"] * 2)
    assert batcher.stats.samples_total == sum(sizes)
    await batcher.close()


async def test_concurrent_requests_form_batches_larger_than_one() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine)
    first = asyncio.ensure_future(batcher.submit(x(0)))
    await engine.wait_entered()  # batch 1 holds the only instance
    rest = [asyncio.ensure_future(batcher.submit(x(i))) for i in range(1, 11)]
    await until(lambda: batcher.queue_depth == 10, "ten requests queued")
    engine.gate.set()
    await asyncio.gather(first, *rest)
    assert [len(b) for b in engine.batches] == [1, 10]
    assert batcher.stats.batches_total == 2 and batcher.stats.batch_sizes == {1: 1, 10: 1}
    await batcher.close()


async def test_expired_requests_are_dropped_before_compute() -> None:
    engine = FakeEngine(gated=True)
    clock = FakeClock()
    batcher = make(engine, clock=clock)
    first = asyncio.ensure_future(batcher.submit(x(0)))
    await engine.wait_entered()
    late = asyncio.ensure_future(batcher.submit(x(7), deadline_ns=clock.now_ns + 1_000))
    ok = asyncio.ensure_future(batcher.submit(x(8), deadline_ns=clock.now_ns + 10**12))
    await until(lambda: batcher.queue_depth == 2, "two queued")
    clock.now_ns += 5_000  # the first deadline passes while it waits
    engine.gate.set()
    error = await expect(ErrorCode.DEADLINE_EXCEEDED, late)
    assert "deadline exceeded" in error.message
    assert (await ok)["Y"][0, 0] == 16
    await first
    assert engine.batches == [[0.0], [8.0]]  # 7 never reached the engine
    assert batcher.stats.dropped_deadline == 1
    await batcher.close()


async def test_default_timeout_applies_to_requests_without_deadline() -> None:
    engine = FakeEngine(gated=True)
    clock = FakeClock()
    batcher = make(engine, clock=clock, default_timeout_ns=1_000)
    first = asyncio.ensure_future(batcher.submit(x(0)))
    await engine.wait_entered()
    queued = asyncio.ensure_future(batcher.submit(x(1)))
    await until(lambda: batcher.queue_depth == 1, "queued")
    clock.now_ns += 2_000
    engine.gate.set()
    await expect(ErrorCode.DEADLINE_EXCEEDED, queued)
    await first
    await batcher.close()


async def test_full_queue_rejects_at_once() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine, max_queue_size=2)
    first = asyncio.ensure_future(batcher.submit(x(0)))
    await engine.wait_entered()
    queued = [asyncio.ensure_future(batcher.submit(x(i))) for i in (1, 2)]
    await until(lambda: batcher.queue_depth == 2, "two queued")
    error = await expect(ErrorCode.QUEUE_FULL, batcher.submit(x(3)))
    assert "queue full" in error.message and "max_queue_size 2" in error.message
    engine.gate.set()
    await asyncio.gather(first, *queued)
    assert batcher.stats.rejected_queue_full == 1
    await batcher.close()


async def test_a_failing_batch_fails_only_its_requests() -> None:
    engine = FakeEngine()
    batcher = make(engine)
    error = await expect(ErrorCode.INTERNAL, batcher.submit(x(-1)))
    assert "poisoned input" in error.message
    assert (await batcher.submit(x(3)))["Y"][0, 0] == 6
    assert batcher.stats.failed == 1
    await batcher.close()


async def test_cancelled_requests_are_not_computed() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine)
    first = asyncio.ensure_future(batcher.submit(x(0)))
    await engine.wait_entered()
    gone = asyncio.ensure_future(batcher.submit(x(5)))
    stays = asyncio.ensure_future(batcher.submit(x(6)))
    await until(lambda: batcher.queue_depth == 2, "two queued")
    gone.cancel()
    engine.gate.set()
    assert (await stays)["Y"][0, 0] == 12
    await first
    assert engine.batches == [[0.0], [6.0]]
    assert batcher.stats.cancelled == 1
    await batcher.close()


async def test_lower_priority_number_is_served_first() -> None:
    engine = FakeEngine(max_batch_size=1, gated=True)
    batcher = make(engine)
    first = asyncio.ensure_future(batcher.submit(x(0)))
    await engine.wait_entered()
    low = [asyncio.ensure_future(batcher.submit(x(10 + i), priority=5)) for i in range(2)]
    high = [asyncio.ensure_future(batcher.submit(x(20 + i), priority=1)) for i in range(2)]
    await until(lambda: batcher.queue_depth == 4, "four queued")
    engine.gate.set()
    await asyncio.gather(first, *low, *high)
    assert engine.batches == [[0.0], [20.0], [21.0], [10.0], [11.0]]
    await batcher.close()


async def test_close_drains_queued_requests_then_refuses() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine, policy=BatchPolicy(64, (), 10**12))  # would wait "forever"
    pending = [asyncio.ensure_future(batcher.submit(x(i))) for i in range(3)]
    await until(lambda: batcher.queue_depth == 3, "three queued")
    closing = asyncio.ensure_future(batcher.close(drain=True))
    await until(lambda: batcher.closed, "closing")
    await expect(ErrorCode.UNAVAILABLE, batcher.submit(x(9)))
    engine.gate.set()
    await closing
    results = await asyncio.gather(*pending)
    assert [r["Y"][0, 0] for r in results] == [0, 2, 4]


async def test_close_without_drain_fails_queued_requests() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine)
    first = asyncio.ensure_future(batcher.submit(x(0)))
    await engine.wait_entered()
    queued = asyncio.ensure_future(batcher.submit(x(1)))
    await until(lambda: batcher.queue_depth == 1, "queued")
    closing = asyncio.ensure_future(batcher.close(drain=False))
    await expect(ErrorCode.UNAVAILABLE, queued)
    engine.gate.set()
    await closing
    await first
    assert engine.batches == [[0.0]]


async def test_requests_with_different_sample_shapes_do_not_share_a_batch() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine)
    first = asyncio.ensure_future(batcher.submit(x(0)))
    await engine.wait_entered()
    a = asyncio.ensure_future(batcher.submit({"X": np.ones((1, 1), np.float32)}))
    b = asyncio.ensure_future(batcher.submit({"X": np.ones((1, 2), np.float32)}))
    await until(lambda: batcher.queue_depth == 2, "queued")
    engine.gate.set()
    await asyncio.gather(first, a, b)
    assert [len(batch) for batch in engine.batches] == [1, 1, 2]
    await batcher.close()


async def test_several_instances_compute_concurrently() -> None:
    engines = [FakeEngine(gated=True), FakeEngine(gated=True)]
    batcher = DynamicBatcher(engines, BatchPolicy(64))  # type: ignore[list-item]
    batcher.start()
    one = asyncio.ensure_future(batcher.submit(x(1)))
    await until(lambda: bool(engines[0].batches) or bool(engines[1].batches), "first running")
    two = asyncio.ensure_future(batcher.submit(x(2)))
    # Both instances are inside infer at the same time: the second batch did not wait.
    await asyncio.gather(*(asyncio.to_thread(e.entered.wait, 20) for e in engines))
    for e in engines:
        e.gate.set()
    assert [(await one)["Y"][0, 0], (await two)["Y"][0, 0]] == [2, 4]
    await batcher.close()
