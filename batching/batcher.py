"""`DynamicBatcher`: one queue per model version, batches formed by `policy.decide`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain

import numpy as np

from batching.policy import BatchPolicy, Dispatch, Wait, decide
from batching.tensors import batch_size_of, concat_inputs, split_outputs, trailing_shapes
from batchwire.errors import ErrorCode, InferenceError
from engines.base import Engine

logger = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]

#: Waits shorter than this are polled rather than timed (asyncio timers have ~1 ms grain).
SPIN_BELOW_NS = 1_500_000


@dataclass(slots=True)
class BatcherStats:
    """Cumulative counters; `samples_total / batches_total` is the mean batch size.

    `compute_ns_total` counts each batch once; `compute_request_ns_total` counts a batch's
    compute time once per member request (Triton's per-request compute statistics).
    """

    requests_total: int = 0
    samples_total: int = 0
    batches_total: int = 0
    rejected_queue_full: int = 0
    dropped_deadline: int = 0
    cancelled: int = 0
    failed: int = 0
    queue_ns_total: int = 0
    compute_ns_total: int = 0
    computed_requests: int = 0
    compute_request_ns_total: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Pending:
    inputs: dict[str, np.ndarray]
    size: int
    future: asyncio.Future[Outputs]
    enqueued_ns: int
    deadline_ns: int | None
    shapes: tuple[tuple[int, ...], ...]


class DynamicBatcher:
    """Queues requests and runs them in batches on a pool of engine instances.

    Each engine instance gets a thread of its own (engines are thread-confined), so the
    event loop keeps accepting requests while batches compute. Up to `len(engines)`
    batches run at once.

    Args:
        engines: one engine per instance, all of the same model version.
        policy: when to dispatch (sizes in samples).
        max_queue_size: queued requests beyond this are rejected at once (0 = unbounded).
        default_timeout_ns: queue timeout for requests without a deadline (0 = none).
        clock: monotonic nanoseconds; injectable for tests.
        name: for logs and thread names.
    """

    def __init__(
        self,
        engines: Sequence[Engine],
        policy: BatchPolicy,
        *,
        max_queue_size: int = 0,
        default_timeout_ns: int = 0,
        clock: Callable[[], int] = time.monotonic_ns,
        name: str = "",
    ) -> None:
        if not engines:
            raise ValueError("a batcher needs at least one engine instance")
        self.engines = list(engines)
        self.policy = policy
        self.max_queue_size = max_queue_size
        self.default_timeout_ns = default_timeout_ns
        self.clock = clock
        self.name = name
        self.stats = BatcherStats()
        self._queues: dict[int, deque[_Pending]] = {}
        self._priorities: list[int] = []
        self._queued = 0
        self._free: list[int] = []
        self._running: set[asyncio.Task[None]] = set()
        self._executors: list[ThreadPoolExecutor] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the scheduler in the running event loop (call once, from inside it)."""
        if self._scheduler is not None:
            raise RuntimeError(f"batcher {self.name} already started")
        # NOTE: asyncio objects are created here, inside the loop that will use them.
        self._loop = asyncio.get_running_loop()
        self._executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"engine-{self.name}-{i}")
            for i in range(len(self.engines))
        ]
        self._free = list(range(len(self.engines)))
        self._scheduler = self._loop.create_task(self._schedule(), name=f"batcher-{self.name}")

    async def close(self, *, drain: bool = True) -> None:
        """Stop accepting; with `drain` run every queued request, else fail them UNAVAILABLE."""
        if self._closing:
            if self._scheduler is not None:
                await asyncio.shield(self._scheduler)
            return
        self._closing = True
        if not drain:
            for pending in self._drain_all():
                if not pending.future.done():
                    pending.future.set_exception(
                        InferenceError(ErrorCode.UNAVAILABLE, f"model {self.name} is shutting down")
                    )
        self._wake()
        if self._scheduler is not None:
            await self._scheduler
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        for executor in self._executors:
            executor.shutdown(wait=True)

    @property
    def closed(self) -> bool:
        """True once `close` was called: new submits are refused."""
        return self._closing

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch."""
        return self._queued

    # ------------------------------------------------------------------ submit
    async def submit(
        self, inputs: dict[str, np.ndarray], *, deadline_ns: int | None = None, priority: int = 0
    ) -> Outputs:
        """Queue one request and return its slice of the batch's outputs.

        Args:
            inputs: name -> array; axis 0 is the batch axis when the model batches.
            deadline_ns: monotonic time after which the request is dropped before compute.
            priority: lower numbers are served first (0 = default).

        Raises:
            InferenceError: QUEUE_FULL, DEADLINE_EXCEEDED, UNAVAILABLE (closing), or the
                batch's failure (INTERNAL, or the engine's own code).
        """
        if self._closing or self._loop is None:
            raise InferenceError(
                ErrorCode.UNAVAILABLE, f"model {self.name} is not accepting requests"
            )
        if self.max_queue_size and self._queued >= self.max_queue_size:
            self.stats.rejected_queue_full += 1
            raise InferenceError(
                ErrorCode.QUEUE_FULL,
                f"model {self.name}: queue full ({self._queued} requests queued, "
                f"max_queue_size {self.max_queue_size})",
            )
        now = self.clock()
        if self.default_timeout_ns:
            default_deadline = now + self.default_timeout_ns
            if deadline_ns is None or default_deadline < deadline_ns:
                deadline_ns = default_deadline
        size = batch_size_of(inputs) if self.policy.max_batch_size else 1
        future: asyncio.Future[Outputs] = self._loop.create_future()
        pending = _Pending(inputs, size, future, now, deadline_ns, trailing_shapes(inputs))
        queue = self._queues.get(priority)
        if queue is None:
            queue = self._queues[priority] = deque()
            self._priorities = sorted(self._queues)
        queue.append(pending)
        self._queued += 1
        self.stats.requests_total += 1
        self._wake()
        return await future

    # ------------------------------------------------------------------ scheduling
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _in_order(self) -> Iterator[_Pending]:
        if len(self._priorities) == 1:
            return iter(self._queues[self._priorities[0]])
        return chain.from_iterable(self._queues[p] for p in self._priorities)

    def _drain_all(self) -> list[_Pending]:
        items = list(self._in_order())
        for queue in self._queues.values():
            queue.clear()
        self._queued = 0
        return items

    def _oldest_ns(self) -> int:
        # The head of every priority level; the oldest decides when the delay is up.
        return min(q[0].enqueued_ns for q in self._queues.values() if q)

    def _pop(self, n: int) -> list[_Pending]:
        """Take up to `n` requests in priority/FIFO order with the head's per-sample shapes."""
        taken: list[_Pending] = []
        shapes: tuple[tuple[int, ...], ...] | None = None
        for priority in self._priorities:
            queue = self._queues[priority]
            while queue and len(taken) < n:
                if shapes is None:
                    shapes = queue[0].shapes
                elif queue[0].shapes != shapes:
                    # NOTE: different per-sample shapes cannot share a batch; this request
                    # heads the next one.
                    self._queued -= len(taken)
                    return taken
                taken.append(queue.popleft())
        self._queued -= len(taken)
        return taken

    async def _schedule(self) -> None:
        assert self._loop is not None
        loop = self._loop
        while True:
            if not self._free:
                await self._sleep(None)
                continue
            decision = decide(
                self.policy,
                (p.size for p in self._in_order()),
                self._oldest_ns() if self._queued else 0,
                self.clock(),
                closing=self._closing,
            )
            if isinstance(decision, Dispatch):
                batch = self._admit(self._pop(decision.n_requests))
                if batch:
                    instance = self._free.pop()
                    task = loop.create_task(self._execute(instance, batch))
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
                continue
            if self._closing and not self._queued:
                return
            await self._sleep(decision.wait_ns if isinstance(decision, Wait) else None)

    async def _sleep(self, wait_ns: int | None) -> None:
        """Wait for a wake-up (arrival, freed instance, close) or `wait_ns` at most."""
        assert self._loop is not None
        if wait_ns is not None and wait_ns < SPIN_BELOW_NS:
            # NOTE: asyncio's selector rounds timeouts up to whole milliseconds, so a
            # 100 us timer would fire after ~1 ms. For short waits, yield one loop
            # iteration instead (the loop still polls I/O) and decide again.
            await asyncio.sleep(0)
            return
        if wait_ns is not None:
            # Wake early by the selector's rounding; the remainder is polled as above.
            wait_ns -= SPIN_BELOW_NS
        waiter = self._waiter = self._loop.create_future()
        handle = None
        if wait_ns is not None:
            handle = self._loop.call_later(wait_ns / 1e9, self._wake)
        try:
            await waiter
        finally:
            self._waiter = None
            if handle is not None:
                handle.cancel()

    def _admit(self, taken: list[_Pending]) -> list[_Pending]:
        """Drop cancelled and expired requests before compute; return the rest."""
        now = self.clock()
        batch = []
        for pending in taken:
            if pending.future.done():  # the client went away (cancelled)
                self.stats.cancelled += 1
            elif pending.deadline_ns is not None and pending.deadline_ns <= now:
                self.stats.dropped_deadline += 1
                waited_us = (now - pending.enqueued_ns) // 1000
                pending.future.set_exception(
                    InferenceError(
                        ErrorCode.DEADLINE_EXCEEDED,
                        f"model {self.name}: deadline exceeded after {waited_us} us in queue",
                    )
                )
            else:
                self.stats.queue_ns_total += now - pending.enqueued_ns
                batch.append(pending)
        return batch

    async def _execute(self, instance: int, batch: list[_Pending]) -> None:
        assert self._loop is not None
        engine = self.engines[instance]
        unbatched = self.policy.max_batch_size == 0
        requests = [p.inputs for p in batch]
        sizes = [p.size for p in batch]
        total = sum(sizes)

        def work() -> list[Outputs]:
            # NOTE: runs on the instance's own thread: concatenation and slicing happen
            # off the event loop too.
            if unbatched:
                return [engine.infer(requests[0])]
            merged, _ = concat_inputs(requests)
            return split_outputs(engine.infer(merged), sizes)

        start = self.clock()
        try:
            results = await self._loop.run_in_executor(self._executors[instance], work)
        except BaseException as exc:
            self.stats.failed += len(batch)
            error = (
                exc
                if isinstance(exc, InferenceError)
                else InferenceError(ErrorCode.INTERNAL, f"engine failed: {exc}")
            )
            if not isinstance(exc, InferenceError):
                logger.warning("batch of %d on %s failed: %r", total, self.name, exc)
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
        finally:
            elapsed = self.clock() - start
            self.stats.compute_ns_total += elapsed
            self.stats.computed_requests += len(batch)
            self.stats.compute_request_ns_total += elapsed * len(batch)
            self.stats.batches_total += 1
            self.stats.samples_total += total
            self.stats.batch_sizes[total] = self.stats.batch_sizes.get(total, 0) + 1
            self._free.append(instance)
            self._wake()
