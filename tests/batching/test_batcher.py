"""DynamicBatcher behaviour through its seam, with a fake engine and a fake clock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from batching.batcher import DynamicBatcher
from batching.policy import BatchPolicy
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import TensorSpec

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

#: Markers FakeEngine reacts to.
POISON = -1.0  # raises RuntimeError
REFUSED = -2.0  # raises its own InferenceError
SHORT = -3.0  # returns one row too few


class FakeEngine:
    """y = 2x; records each batch's values; can hold a batch in compute (the gate)."""

    inputs = (TensorSpec("X", "FP32", (1,)),)
    outputs = (TensorSpec("Y", "FP32", (1,)),)

    def __init__(self, max_batch_size: int = 64, gated: bool = False) -> None:
        self.max_batch_size = max_batch_size
        self.batches: list[list[float]] = []
        self.seen: list[dict[str, np.ndarray]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["X"]
        self.seen.append(inputs)
        self.batches.append(x.reshape(-1).tolist())
        self.entered.set()
        assert self.gate.wait(20), "test never released the gate"
        if (x == POISON).any():
            raise RuntimeError("poisoned input")
        if (x == REFUSED).any():
            raise InferenceError(ErrorCode.INVALID_INPUT, "the engine refused X")
        if (x == SHORT).any():
            return {"Y": x[1:] * 2}
        return {"Y": x * 2}

    def warmup(self) -> None:
        pass

    async def wait_entered(self) -> None:
        """Until a batch is inside `infer` (holding the instance while gated)."""
        assert await asyncio.to_thread(self.entered.wait, 20)
        self.entered.clear()


class FakeClock:
    def __init__(self) -> None:
        self.now_ns = 1_000_000

    def __call__(self) -> int:
        return self.now_ns


def x(*values: float) -> dict[str, np.ndarray]:
    return {"X": np.array(values, dtype=np.float32).reshape(-1, 1)}


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the loop until `condition()` holds (bounded; no wall-clock sleeping)."""
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def make(engine: FakeEngine, policy: BatchPolicy | None = None, **kw: object) -> DynamicBatcher:
    batcher = DynamicBatcher(
        [engine],  # type: ignore[list-item]
        policy or BatchPolicy(max_batch_size=engine.max_batch_size),
        **kw,  # type: ignore[arg-type]
    )
    batcher.start()
    return batcher


async def hold_instance(
    engine: FakeEngine, batcher: DynamicBatcher, request: dict[str, np.ndarray] | None = None
) -> asyncio.Future[dict[str, np.ndarray]]:
    """Submit one request and wait until it holds the (gated) engine instance."""
    first = asyncio.ensure_future(batcher.submit(x(0) if request is None else request))
    await engine.wait_entered()
    return first


async def expect(code: ErrorCode, awaitable: Awaitable[object]) -> InferenceError:
    with pytest.raises(InferenceError) as exc:
        await awaitable
    assert exc.value.code is code, exc.value
    return exc.value


def spawn(
    batcher: DynamicBatcher, *requests: dict[str, np.ndarray]
) -> list[asyncio.Future[dict[str, np.ndarray]]]:
    return [asyncio.ensure_future(batcher.submit(r)) for r in requests]


# ---------------------------------------------------------------- results and batches


async def test_each_request_gets_exactly_its_own_rows_from_one_mixed_batch() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine)
    first = await hold_instance(engine, batcher)
    sizes = [1, 3, 2, 5, 1, 4]
    requests, start = [], 100
    for n in sizes:
        requests.append(x(*range(start, start + n)))
        start += n
    pending = spawn(batcher, *requests)
    await until(lambda: batcher.queue_depth == len(sizes), "all queued")
    engine.gate.set()
    results = await asyncio.gather(*pending)
    await first
    assert [len(b) for b in engine.batches] == [1, sum(sizes)]  # one batch, counted in samples
    for request, result in zip(requests, results, strict=True):
        assert result["Y"].shape == request["X"].shape
        np.testing.assert_array_equal(result["Y"], request["X"] * 2)
    assert batcher.stats.samples_total == 1 + sum(sizes)
    assert batcher.stats.batch_sizes == {1: 1, sum(sizes): 1}
    await batcher.close()


async def test_concurrent_requests_form_batches_larger_than_one() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine)
    first = await hold_instance(engine, batcher)  # batch 1 holds the only instance
    rest = spawn(batcher, *(x(i) for i in range(1, 11)))
    await until(lambda: batcher.queue_depth == 10, "ten requests queued")
    engine.gate.set()
    await asyncio.gather(first, *rest)
    assert [len(b) for b in engine.batches] == [1, 10]
    stats = batcher.stats
    assert stats.batches_total == 2 and stats.batch_sizes == {1: 1, 10: 1}
    assert stats.mean_batch_size == 5.5 and stats.computed_requests == 11
    await batcher.close()


async def test_requests_arriving_in_one_loop_iteration_share_a_batch() -> None:
    engine = FakeEngine()
    batcher = make(engine)  # no queue delay: nothing waits for company
    results = await asyncio.gather(*(batcher.submit(x(i)) for i in range(5)))
    assert [r["Y"][0, 0] for r in results] == [0, 2, 4, 6, 8]
    assert engine.batches == [[0.0, 1.0, 2.0, 3.0, 4.0]]
    await batcher.close()


async def test_an_idle_batcher_dispatches_without_waiting() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine)
    pending = spawn(batcher, x(1))
    # One loop iteration runs the submit, the next one dispatches: no timer involved.
    await until(lambda: batcher.batches_in_flight == 1, "dispatched")
    assert batcher.queue_depth == 0
    engine.gate.set()
    assert (await pending[0])["Y"][0, 0] == 2
    await batcher.close()


async def test_a_batch_never_exceeds_max_batch_size_in_samples() -> None:
    engine = FakeEngine(max_batch_size=4, gated=True)
    batcher = make(engine)
    first = await hold_instance(engine, batcher)
    pending = spawn(batcher, x(1, 1, 1), x(2, 2), x(3, 3), x(4))
    await until(lambda: batcher.queue_depth == 4, "queued")
    engine.gate.set()
    await asyncio.gather(first, *pending)
    # 3 + 2 > 4: the first goes alone; then 2 + 2 = 4 is full; then the last.
    assert [len(b) for b in engine.batches] == [1, 3, 4, 1]
    await batcher.close()


# ---------------------------------------------------------------- queue delay and policy


async def test_a_lone_request_waits_the_queue_delay_then_runs() -> None:
    engine = FakeEngine()
    delay_ns = 2_000_000
    batcher = make(engine, BatchPolicy(64, (), delay_ns))  # the real clock
    result = await batcher.submit(x(4))
    assert result["Y"][0, 0] == 8
    assert batcher.stats.queue_ns_total >= delay_ns  # it waited for company, no less
    await batcher.close()


async def test_a_preferred_size_dispatches_without_waiting_for_the_delay() -> None:
    engine = FakeEngine()
    # The delay would outlast the test: only reaching the preferred size dispatches.
    batcher = make(engine, BatchPolicy(64, (2,), 10**12), clock=FakeClock())
    pending = spawn(batcher, x(1))
    await until(lambda: batcher.queue_depth == 1, "queued")
    await asyncio.sleep(0)
    assert batcher.batches_in_flight == 0 and not engine.batches  # waiting for company
    pending += spawn(batcher, x(2))
    results = await asyncio.gather(*pending)
    assert [r["Y"][0, 0] for r in results] == [2, 4]
    assert engine.batches == [[1.0, 2.0]]
    await batcher.close()


# ---------------------------------------------------------------- deadlines and cancellation


async def test_expired_requests_are_dropped_before_compute() -> None:
    engine = FakeEngine(gated=True)
    clock = FakeClock()
    batcher = make(engine, clock=clock)
    first = await hold_instance(engine, batcher)
    late = asyncio.ensure_future(batcher.submit(x(7), deadline_ns=clock.now_ns + 1_000))
    ok = asyncio.ensure_future(batcher.submit(x(8), deadline_ns=clock.now_ns + 10**12))
    await until(lambda: batcher.queue_depth == 2, "two queued")
    clock.now_ns += 5_000  # the first deadline passes while it waits
    engine.gate.set()
    error = await expect(ErrorCode.DEADLINE_EXCEEDED, late)
    assert "deadline exceeded" in error.message and "expired after 5 us in queue" in error.message
    assert (await ok)["Y"][0, 0] == 16
    await first
    assert engine.batches == [[0.0], [8.0]]  # 7 never reached the engine
    assert batcher.stats.dropped_deadline == 1
    await batcher.close()


async def test_after_a_drop_the_policy_decides_again_on_what_is_left() -> None:
    engine = FakeEngine(gated=True)
    clock = FakeClock()
    batcher = make(engine, BatchPolicy(64, (2,), 10**12), clock=clock)
    first = await hold_instance(engine, batcher, x(0, 0))  # a preferred size: runs at once
    late = asyncio.ensure_future(batcher.submit(x(7), deadline_ns=clock.now_ns + 1_000))
    kept = spawn(batcher, x(8))
    await until(lambda: batcher.queue_depth == 2, "two queued")
    clock.now_ns += 5_000
    engine.gate.set()
    await first
    await expect(ErrorCode.DEADLINE_EXCEEDED, late)
    # Without 7 the preferred size 2 is not reached: 8 waits for company again...
    await until(lambda: batcher.queue_depth == 1, "8 back in the queue")
    assert batcher.batches_in_flight == 0
    kept += spawn(batcher, x(9))  # ...which arrives and completes the preferred batch.
    await asyncio.gather(*kept)
    assert engine.batches == [[0.0, 0.0], [8.0, 9.0]]
    await batcher.close()


async def test_default_timeout_applies_to_requests_without_deadline() -> None:
    engine = FakeEngine(gated=True)
    clock = FakeClock()
    batcher = make(engine, clock=clock, default_timeout_ns=1_000)
    first = await hold_instance(engine, batcher)
    queued = spawn(batcher, x(1))
    await until(lambda: batcher.queue_depth == 1, "queued")
    clock.now_ns += 2_000
    engine.gate.set()
    await expect(ErrorCode.DEADLINE_EXCEEDED, queued[0])
    await first
    assert engine.batches == [[0.0]]
    await batcher.close()


async def test_a_request_already_past_its_deadline_is_refused_at_once() -> None:
    engine = FakeEngine()
    clock = FakeClock()
    batcher = make(engine, clock=clock)
    await expect(ErrorCode.DEADLINE_EXCEEDED, batcher.submit(x(1), deadline_ns=clock.now_ns))
    assert batcher.queue_depth == 0 and not engine.batches
    await batcher.close()


async def test_cancelled_requests_are_not_computed() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine)
    first = await hold_instance(engine, batcher)
    gone, stays = spawn(batcher, x(5), x(6))
    await until(lambda: batcher.queue_depth == 2, "two queued")
    gone.cancel()
    engine.gate.set()
    assert (await stays)["Y"][0, 0] == 12
    await first
    assert engine.batches == [[0.0], [6.0]]
    assert batcher.stats.cancelled == 1
    await batcher.close()


# ---------------------------------------------------------------- overload and failures


async def test_full_queue_rejects_at_once() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine, max_queue_size=2)
    first = await hold_instance(engine, batcher)
    queued = spawn(batcher, x(1), x(2))
    await until(lambda: batcher.queue_depth == 2, "two queued")
    error = await expect(ErrorCode.QUEUE_FULL, batcher.submit(x(3)))
    assert "queue full (2 requests" in error.message and "max_queue_size 2" in error.message
    engine.gate.set()
    await asyncio.gather(first, *queued)
    assert batcher.stats.rejected_queue_full == 1
    assert 3.0 not in [v for b in engine.batches for v in b]
    await batcher.close()


async def test_a_failing_batch_fails_only_its_requests() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine)
    poisoned = asyncio.ensure_future(batcher.submit(x(POISON)))
    await engine.wait_entered()
    healthy = spawn(batcher, x(1), x(2))
    await until(lambda: batcher.queue_depth == 2, "queued behind the failing batch")
    engine.gate.set()
    error = await expect(ErrorCode.INTERNAL, poisoned)
    assert error.message == "engine failed: poisoned input"
    assert [(await h)["Y"][0, 0] for h in healthy] == [2, 4]
    assert (await batcher.submit(x(3)))["Y"][0, 0] == 6  # and it keeps serving
    assert batcher.stats.failed == 1 and batcher.stats.batches_total == 3
    await batcher.close()


async def test_every_request_of_a_failing_batch_gets_the_error() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine)
    first = await hold_instance(engine, batcher)
    pending = spawn(batcher, x(1), x(POISON), x(3))
    await until(lambda: batcher.queue_depth == 3, "queued")
    engine.gate.set()
    await first
    errors = [await expect(ErrorCode.INTERNAL, p) for p in pending]
    assert len({id(e) for e in errors}) == 3  # one error object per caller
    assert batcher.stats.failed == 3
    await batcher.close()


async def test_the_engines_own_error_passes_through_unchanged() -> None:
    batcher = make(FakeEngine())
    error = await expect(ErrorCode.INVALID_INPUT, batcher.submit(x(REFUSED)))
    assert error.message == "the engine refused X"
    await batcher.close()


async def test_an_output_shorter_than_the_batch_is_an_internal_error() -> None:
    batcher = make(FakeEngine())
    error = await expect(ErrorCode.INTERNAL, batcher.submit(x(SHORT, 1)))
    assert "engine returned 1 rows of output 'Y' for a batch of 2" in error.message
    await batcher.close()


# ---------------------------------------------------------------- priorities


async def test_lower_priority_number_is_served_first() -> None:
    engine = FakeEngine(max_batch_size=1, gated=True)
    batcher = make(engine)
    first = await hold_instance(engine, batcher)
    low = [asyncio.ensure_future(batcher.submit(x(10 + i), priority=5)) for i in range(2)]
    high = [asyncio.ensure_future(batcher.submit(x(20 + i), priority=1)) for i in range(2)]
    await until(lambda: batcher.queue_depth == 4, "four queued")
    engine.gate.set()
    await asyncio.gather(first, *low, *high)
    assert engine.batches == [[0.0], [20.0], [21.0], [10.0], [11.0]]
    await batcher.close()


async def test_a_batch_takes_higher_priorities_first_then_fills_up() -> None:
    engine = FakeEngine(max_batch_size=3, gated=True)
    batcher = make(engine)
    first = await hold_instance(engine, batcher)
    pending = [
        asyncio.ensure_future(batcher.submit(x(v), priority=p))
        for v, p in [(1, 0), (2, 0), (3, -1), (4, 7), (5, -1)]
    ]
    await until(lambda: batcher.queue_depth == 5, "queued")
    engine.gate.set()
    results = await asyncio.gather(first, *pending)
    assert engine.batches == [[0.0], [3.0, 5.0, 1.0], [2.0, 4.0]]
    assert [r["Y"][0, 0] for r in results[1:]] == [2, 4, 6, 8, 10]
    await batcher.close()


# ---------------------------------------------------------------- shapes and models


async def test_requests_with_different_sample_shapes_do_not_share_a_batch() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine)
    first = await hold_instance(engine, batcher)
    a = asyncio.ensure_future(batcher.submit({"X": np.ones((1, 1), np.float32)}))
    b = asyncio.ensure_future(batcher.submit({"X": np.ones((1, 2), np.float32)}))
    c = asyncio.ensure_future(batcher.submit({"X": np.ones((2, 2), np.float32)}))
    await until(lambda: batcher.queue_depth == 3, "queued")
    engine.gate.set()
    await first
    out_a, out_b, out_c = await a, await b, await c
    assert [len(batch) for batch in engine.batches] == [1, 1, 6]  # (1, 1) alone; (1+2, 2)
    assert out_a["Y"].shape == (1, 1) and out_b["Y"].shape == (1, 2)
    assert out_c["Y"].shape == (2, 2)
    await batcher.close()


async def test_padding_batcher_batches_different_lengths_together() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine, pad_variable_dims=True)
    first = await hold_instance(engine, batcher)
    a = asyncio.ensure_future(batcher.submit({"X": np.ones((1, 1), np.float32)}))
    b = asyncio.ensure_future(batcher.submit({"X": np.ones((1, 3), np.float32)}))
    await until(lambda: batcher.queue_depth == 2, "queued")
    engine.gate.set()
    await first
    out_a, out_b = await a, await b
    assert [len(batch) for batch in engine.batches] == [1, 6]  # one padded batch of 2 x 3
    np.testing.assert_array_equal(out_a["Y"], [[2, 0, 0]])  # padding rows come back as-is
    np.testing.assert_array_equal(out_b["Y"], [[2, 2, 2]])
    await batcher.close()


async def test_a_model_that_does_not_batch_gets_each_request_unchanged() -> None:
    engine = FakeEngine(max_batch_size=0)
    batcher = make(engine)
    request = {"X": np.arange(3, dtype=np.float32)}  # no batch axis
    results = await asyncio.gather(batcher.submit(request), batcher.submit(request))
    assert all(seen is request for seen in engine.seen)  # no copy, no concatenation
    for result in results:
        np.testing.assert_array_equal(result["Y"], [0, 2, 4])
    assert batcher.stats.batch_sizes == {1: 2}
    await batcher.close()


async def test_several_instances_compute_concurrently() -> None:
    engines = [FakeEngine(gated=True), FakeEngine(gated=True)]
    batcher = DynamicBatcher(engines, BatchPolicy(64))  # type: ignore[arg-type]
    batcher.start()
    one = asyncio.ensure_future(batcher.submit(x(1)))
    await until(lambda: batcher.batches_in_flight == 1, "first running")
    two = asyncio.ensure_future(batcher.submit(x(2)))
    # Both instances are inside infer at the same time: the second batch did not wait.
    await asyncio.gather(*(asyncio.to_thread(e.entered.wait, 20) for e in engines))
    assert batcher.batches_in_flight == 2
    for e in engines:
        e.gate.set()
    assert [(await one)["Y"][0, 0], (await two)["Y"][0, 0]] == [2, 4]
    await batcher.close()


# ---------------------------------------------------------------- lifecycle


async def test_close_drains_queued_requests_then_refuses() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine, BatchPolicy(64, (), 10**12))  # would wait "forever"
    pending = spawn(batcher, x(0), x(1), x(2))
    await until(lambda: batcher.queue_depth == 3, "three queued")
    closing = asyncio.ensure_future(batcher.close(drain=True))
    await until(lambda: batcher.closed, "closing")
    await expect(ErrorCode.UNAVAILABLE, batcher.submit(x(9)))
    engine.gate.set()
    await closing
    results = await asyncio.gather(*pending)
    assert [r["Y"][0, 0] for r in results] == [0, 2, 4]
    assert engine.batches == [[0.0, 1.0, 2.0]]  # drained without waiting for the delay


async def test_close_without_drain_fails_queued_requests() -> None:
    engine = FakeEngine(gated=True)
    batcher = make(engine)
    first = await hold_instance(engine, batcher)
    queued = spawn(batcher, x(1))
    await until(lambda: batcher.queue_depth == 1, "queued")
    closing = asyncio.ensure_future(batcher.close(drain=False))
    await expect(ErrorCode.UNAVAILABLE, queued[0])
    engine.gate.set()
    await closing
    assert (await first)["Y"][0, 0] == 0  # the batch already computing finished
    assert engine.batches == [[0.0]]


async def test_close_is_idempotent_and_submit_needs_start() -> None:
    batcher = DynamicBatcher([FakeEngine()], BatchPolicy(8))  # type: ignore[list-item]
    await expect(ErrorCode.UNAVAILABLE, batcher.submit(x(1)))
    batcher.start()
    with pytest.raises(RuntimeError):
        batcher.start()
    assert (await batcher.submit(x(1)))["Y"][0, 0] == 2
    await asyncio.gather(batcher.close(), batcher.close())
    await batcher.close(drain=False)
    with pytest.raises(RuntimeError):
        batcher.start()
    await DynamicBatcher([FakeEngine()], BatchPolicy(8)).close()  # type: ignore[list-item]
