"""`DynamicBatcher`: one queue per model version, batches formed by `policy.decide`."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from typing import Protocol

import numpy as np

from batching.policy import BatchPolicy, Dispatch, Wait, decide
from batching.tensors import (
    GroupKey,
    batch_size_of,
    concat_inputs,
    group_key,
    pad_batch,
    split_outputs,
)
from batchwire.errors import ErrorCode, InferenceError
from batchwire.histogram import Histogram
from batchwire.types import RequestTiming
from engines.base import Engine

logger = logging.getLogger(__name__)

Outputs = dict[str, np.ndarray]

#: Priority level of requests that set none; its queue always exists.
DEFAULT_PRIORITY = 0


@dataclass(slots=True)
class BatcherStats:
    """Cumulative counters of one batcher (Triton's statistics, by another name).

    `samples_total / batches_total` is the mean batch size (Triton's
    `nv_inference_count / nv_inference_exec_count`). `compute_ns_total` counts each batch
    once; `compute_request_ns_total` counts a batch's compute time once per member request
    (Triton's per-request compute statistics). Batch counts include failed batches.

    Attributes:
        requests_total: requests accepted into the queue.
        samples_total: samples in executed batches.
        batches_total: executed batches (engine calls).
        rejected_queue_full: requests refused because the queue was full.
        dropped_deadline: requests failed DEADLINE_EXCEEDED before compute.
        cancelled: requests whose caller went away before compute (never computed).
        failed: requests in batches that failed.
        queue_ns_total: time computed requests spent queued, summed over requests.
        compute_ns_total: engine time, summed over batches.
        computed_requests: requests that reached the engine.
        compute_request_ns_total: engine time, summed over requests.
        batch_sizes: executed batches by size in samples.
        queue_hist: per computed request, time queued.
        compute_hist: per executed batch, engine time.
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
    queue_hist: Histogram = field(default_factory=Histogram)
    compute_hist: Histogram = field(default_factory=Histogram)

    @property
    def mean_batch_size(self) -> float:
        """Samples per executed batch (0.0 before the first batch)."""
        return self.samples_total / self.batches_total if self.batches_total else 0.0


@dataclass(slots=True)
class ExecutedBatch:
    """What a `BatchObserver` learns about one executed batch.

    Attributes:
        name: the batcher's name (`model/version`).
        inputs: the arrays the engine ran (padded to `padded_samples` rows on bucketed
            engines); owned by the batch, so an observer may keep references.
        outputs: the engine's outputs (same rows as `inputs`), or None when it failed.
        samples: samples of the member requests (before padding).
        padded_samples: samples the engine ran.
        member_samples: samples of each member request, in batch order.
        traces: each member's trace handle from `submit(trace=...)` (None = untraced).
        start_ns: engine call start, batcher clock.
        end_ns: engine call end, batcher clock.
        error: the engine's exception when the batch failed.
    """

    name: str
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] | None
    samples: int
    padded_samples: int
    member_samples: list[int]
    traces: list[object | None]
    start_ns: int
    end_ns: int
    error: BaseException | None


class BatchObserver(Protocol):
    """Told about every executed batch (tracing, drift); called on the engine's thread
    after the batch's callers were handed their results, so it never delays them."""

    def on_batch(self, batch: ExecutedBatch) -> None:
        """Observe one batch; must not raise (errors are logged and dropped)."""


@dataclass(slots=True)
class _Pending:
    """One queued request: with its future, the only allocation per request."""

    inputs: dict[str, np.ndarray]
    size: int
    future: asyncio.Future[Outputs]
    enqueued_ns: int
    deadline_ns: int | None
    priority: int
    group: GroupKey | None
    trace: object | None = None
    timing: RequestTiming | None = None


class DynamicBatcher:
    """Queues requests and runs them in batches on a pool of engine instances.

    Each engine instance gets a thread of its own (engines are thread-confined), so the
    event loop keeps accepting requests while batches compute; up to `len(engines)`
    batches run at once. Batch sizes count samples (axis 0), not requests.

    Scheduling is event-driven rather than a polling task: the policy is consulted, on
    the loop thread, only when its answer can change: a request arrives while an instance
    is free (once per loop iteration, at its end), an instance frees up, or a `Wait` runs
    out. So a request reaching an idle batcher with no queue delay is handed to its
    engine thread in the next loop iteration, with no timer and no task switch, and
    arrivals while every instance is busy cost no wake-up at all.

    Requests whose inputs differ in names or per-sample shapes never share a batch (unless
    `pad_variable_dims`): a batch ends at the first queued request that differs, which
    then heads the next batch (see `batching.tensors.group_key`).

    Args:
        engines: one engine per instance, all of the same model version.
        policy: when to dispatch (sizes in samples).
        max_queue_size: queued requests beyond this are rejected at once (0 = unbounded).
        default_timeout_ns: queue timeout for requests without an earlier deadline
            (0 = none).
        clock: monotonic nanoseconds; injectable for tests.
        name: for messages, logs and thread names.
        pad_variable_dims: let requests whose variable dims differ share a batch,
            zero-padded to the largest (only for models that mask padding).
        observer: told about each executed batch (None = nobody).
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
        pad_variable_dims: bool = False,
        observer: BatchObserver | None = None,
    ) -> None:
        if not engines:
            raise ValueError("a batcher needs at least one engine instance")
        if max_queue_size < 0 or default_timeout_ns < 0:
            raise ValueError("max_queue_size and default_timeout_ns must be >= 0")
        self.engines = list(engines)
        self.policy = policy
        self.max_queue_size = max_queue_size
        self.default_timeout_ns = default_timeout_ns
        self.clock = clock
        self.name = name
        self.pad = pad_variable_dims
        self.observer = observer
        self.stats = BatcherStats()
        self._unbatched = policy.max_batch_size == 0
        # One FIFO per priority level; `_levels` lists the levels in service order.
        self._queues: dict[int, deque[_Pending]] = {DEFAULT_PRIORITY: deque()}
        self._levels: list[int] = [DEFAULT_PRIORITY]
        self._queued = 0
        self._free: list[int] = []
        self._in_flight = 0
        self._executors: list[ThreadPoolExecutor] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._alarm: _Alarm | None = None
        self._alarm_due_ns: int | None = None
        self._drained: asyncio.Future[None] | None = None
        self._pump_soon = False
        self._closing = False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind to the running event loop and start the engine threads (call once, inside it).

        Raises:
            RuntimeError: already started or closed, or no event loop is running.
        """
        if self._loop is not None or self._closing:
            raise RuntimeError(f"batcher {self.name!r} was already started or closed")
        # NOTE: everything asyncio is created here, inside the loop that will use it.
        self._loop = asyncio.get_running_loop()
        self._executors = [
            ThreadPoolExecutor(1, thread_name_prefix=f"engine-{self.name}-{i}")
            for i in range(len(self.engines))
        ]
        # pop() takes from the end: instance 0 serves first, so one instance stays warm.
        self._free = list(reversed(range(len(self.engines))))

    async def close(self, *, drain: bool = True) -> None:
        """Stop accepting requests, finish or fail the queued ones, release the threads.

        New submits fail UNAVAILABLE from the moment this is called. Batches already
        computing always finish. Safe to call more than once, and before `start`.

        Args:
            drain: run every queued request to completion (without waiting for the queue
                delay); False fails them UNAVAILABLE.
        """
        self._closing = True
        if not drain:
            self._fail_queued(
                InferenceError(ErrorCode.UNAVAILABLE, f"model {self.name} is shutting down")
            )
        loop = self._loop
        if loop is not None:
            self._pump()  # closing: nothing waits for company any more
            if self._queued or self._in_flight:
                if self._drained is None:
                    self._drained = loop.create_future()
                await asyncio.shield(self._drained)
        if self._alarm is not None:
            self._alarm.stop()
            self._alarm = None
        for executor in self._executors:
            executor.shutdown(wait=True)
        self._executors = []

    @property
    def closed(self) -> bool:
        """True once `close` was called: new submits are refused."""
        return self._closing

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting those computing)."""
        return self._queued

    @property
    def batches_in_flight(self) -> int:
        """Batches computing on engine instances now."""
        return self._in_flight

    # ------------------------------------------------------------------ submit
    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        *,
        deadline_ns: int | None = None,
        priority: int = 0,
        trace: object | None = None,
        timing: RequestTiming | None = None,
    ) -> Outputs:
        """Queue one request and return its slice of the batch's outputs.

        Args:
            inputs: name -> array; axis 0 is the batch axis when the model batches (its
                length is the request's batch size); when `max_batch_size` is 0 they pass
                to the engine unchanged.
            deadline_ns: clock time after which the request is dropped before compute;
                the batcher's `default_timeout_ns` may only make it earlier.
            priority: lower numbers are served first (0 = default).
            trace: an opaque handle (the request's span context) handed to the observer
                with the batch, so a batch span can link to its members.
            timing: filled in with when the request queued and computed, and its batch.

        Returns:
            name -> this request's rows of each output (views of the batch's outputs).

        Raises:
            InferenceError: UNAVAILABLE (not started or closing), QUEUE_FULL,
                DEADLINE_EXCEEDED, or the batch's failure (the engine's own
                InferenceError, else INTERNAL).
        """
        loop = self._loop
        if loop is None or self._closing:
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
        if deadline_ns is not None and deadline_ns <= now:
            self.stats.dropped_deadline += 1
            raise InferenceError(
                ErrorCode.DEADLINE_EXCEEDED,
                f"model {self.name}: deadline exceeded: expired after 0 us in queue",
            )
        if self._unbatched:
            size, group = 1, None
        else:
            size, group = batch_size_of(inputs), group_key(inputs, pad_variable_dims=self.pad)
        future: asyncio.Future[Outputs] = loop.create_future()
        queue = self._queues.get(priority)
        if queue is None:
            queue = self._add_level(priority)
        queue.append(
            _Pending(inputs, size, future, now, deadline_ns, priority, group, trace, timing)
        )
        if timing is not None:
            timing.queued_ns = now  # (so that a request dropped in the queue has it too)
        self._queued += 1
        self.stats.requests_total += 1
        if self._free and not self._pump_soon:
            # NOTE: decide at the end of this loop iteration, not now: requests that
            # arrive in the same iteration (a burst of RPCs read together) then share
            # a batch instead of the first one leaving alone. No timer, no wake-up.
            self._pump_soon = True
            loop.call_soon(self._deferred_pump)
        return await future

    # ------------------------------------------------------------------ queues
    def _add_level(self, priority: int) -> deque[_Pending]:
        queue = self._queues[priority] = deque()
        bisect.insort(self._levels, priority)
        return queue

    def _in_order(self) -> Iterator[_Pending]:
        """Queued requests in service order: by priority level, FIFO within a level."""
        if len(self._levels) == 1:
            return iter(self._queues[self._levels[0]])
        return chain.from_iterable(self._queues[level] for level in self._levels)

    def _oldest_ns(self) -> int:
        # Each level is FIFO, so the oldest request heads one of them.
        if len(self._levels) == 1:
            return self._queues[self._levels[0]][0].enqueued_ns
        return min(q[0].enqueued_ns for q in self._queues.values() if q)

    def _pop(self, n: int) -> list[_Pending]:
        """Take up to `n` requests in service order that can share the first one's batch."""
        taken: list[_Pending] = []
        for level in self._levels:
            queue = self._queues[level]
            while queue and len(taken) < n:
                if taken and queue[0].group != taken[0].group:
                    # NOTE: different inputs or per-sample shapes cannot share a batch;
                    # this request heads the next one.
                    n = len(taken)
                    break
                taken.append(queue.popleft())
            if len(taken) >= n:
                break
        self._queued -= len(taken)
        if len(self._levels) > 1:
            # Forget emptied levels, so arbitrary client priorities cannot pile up.
            for level in [lv for lv in self._levels if lv != DEFAULT_PRIORITY]:
                if not self._queues[level]:
                    del self._queues[level]
                    self._levels.remove(level)
        return taken

    def _unpop(self, requests: list[_Pending]) -> None:
        """Put popped requests back at the head of their levels, in their order."""
        for pending in reversed(requests):
            queue = self._queues.get(pending.priority)
            if queue is None:
                queue = self._add_level(pending.priority)
            queue.appendleft(pending)
        self._queued += len(requests)

    def _fail_queued(self, error: InferenceError) -> None:
        for pending in self._in_order():
            if not pending.future.done():
                pending.future.set_exception(InferenceError(error.code, error.message))
        for queue in self._queues.values():
            queue.clear()
        self._queued = 0

    # ------------------------------------------------------------------ scheduling
    def _pump(self) -> None:
        """Dispatch every batch the policy allows now; arm the alarm if it says wait.

        NOTE: runs synchronously on the loop thread (after arrivals, when a batch
        finishes, from the alarm and from `close`), so the queue cannot change while it
        decides.
        """
        while self._free and self._queued:
            now = self.clock()
            decision = decide(
                self.policy,
                (p.size for p in self._in_order()),
                self._oldest_ns(),
                now,
                closing=self._closing,
            )
            if isinstance(decision, Dispatch):
                taken = self._pop(decision.n_requests)
                batch = self._admit(taken, now)
                if len(batch) < len(taken):
                    # Some were dropped (expired or cancelled): give the rest back and let
                    # the policy decide on what is really left (it may now wait).
                    self._unpop(batch)
                    continue
                self._launch(batch)
            else:
                if isinstance(decision, Wait):
                    self._arm(now + decision.wait_ns, decision.wait_ns)
                return

    def _admit(self, taken: list[_Pending], now: int) -> list[_Pending]:
        """Fail expired requests and skip cancelled ones, before compute; return the rest."""
        batch = []
        for pending in taken:
            if pending.future.done():  # the caller went away (cancelled)
                self.stats.cancelled += 1
            elif pending.deadline_ns is not None and pending.deadline_ns <= now:
                self.stats.dropped_deadline += 1
                waited_us = (now - pending.enqueued_ns) // 1000
                pending.future.set_exception(
                    InferenceError(
                        ErrorCode.DEADLINE_EXCEEDED,
                        f"model {self.name}: deadline exceeded: expired after {waited_us} us "
                        "in queue",
                    )
                )
            else:
                batch.append(pending)
        return batch

    def _arm(self, due_ns: int, wait_ns: int) -> None:
        if self._alarm_due_ns is not None and self._alarm_due_ns <= due_ns:
            return  # an earlier alarm will re-decide anyway
        assert self._loop is not None
        if self._alarm is None:
            self._alarm = _Alarm(self._loop, self._on_alarm, f"batcher-alarm-{self.name}")
        self._alarm_due_ns = due_ns
        self._alarm.set(wait_ns)

    def _on_alarm(self) -> None:
        self._alarm_due_ns = None
        self._pump()

    def _deferred_pump(self) -> None:
        self._pump_soon = False
        self._pump()

    def _launch(self, batch: list[_Pending]) -> None:
        instance = self._free.pop()
        self._in_flight += 1
        now = self.clock()
        queue_ns = 0
        observe = self.stats.queue_hist.observe_ns
        for pending in batch:
            waited = now - pending.enqueued_ns
            queue_ns += waited
            observe(waited)
        self.stats.queue_ns_total += queue_ns
        self._executors[instance].submit(self._run_batch, instance, batch)

    def _run_batch(self, instance: int, batch: list[_Pending]) -> None:
        """Compute one batch on the instance's own thread and hand the outcome to the loop.

        NOTE: concatenation and slicing happen here, off the event loop. The outcome goes
        back with one `call_soon_threadsafe` (`run_in_executor` would take two loop
        iterations, during which the engine sits idle). Only `inputs` and `size` of the
        pending records are read here; their futures belong to the loop.
        """
        assert self._loop is not None
        sizes = [p.size for p in batch]
        total = sum(sizes)
        start = self.clock()
        outcome: list[Outputs] | BaseException
        inputs: dict[str, np.ndarray] = batch[0].inputs
        outputs: Outputs | None = None
        padded = total
        try:
            engine = self.engines[instance]
            if self._unbatched:
                outputs = engine.infer(inputs)
                outcome = [outputs]
            else:
                inputs, _ = concat_inputs([p.inputs for p in batch])
                # Engines built for fixed batch sizes (CUDA graphs) get the next bucket up;
                # split_outputs drops the padding rows.
                buckets: tuple[int, ...] = getattr(engine, "bucket_sizes", ())
                i = bisect.bisect_left(buckets, total)
                if i < len(buckets):
                    padded = buckets[i]
                    inputs = pad_batch(inputs, padded)
                outputs = engine.infer(inputs)
                outcome = split_outputs(outputs, sizes)
        except BaseException as exc:  # whatever it is, it belongs to this batch's callers
            outcome = exc
        end = self.clock()
        try:
            self._loop.call_soon_threadsafe(
                self._finish, instance, batch, total, outcome, start, end
            )
        except RuntimeError:  # the loop closed under a computing batch: nobody is waiting
            logger.error("model %s: event loop closed while a batch computed", self.name)
        observer = self.observer
        if observer is not None:
            error = outcome if isinstance(outcome, BaseException) else None
            executed = ExecutedBatch(
                self.name,
                inputs,
                None if error is not None else outputs,
                total,
                padded,
                sizes,
                [p.trace for p in batch],
                start,
                end,
                error,
            )
            try:
                observer.on_batch(executed)
            except Exception:
                logger.exception("model %s: batch observer failed", self.name)

    def _finish(
        self,
        instance: int,
        batch: list[_Pending],
        total: int,
        outcome: list[Outputs] | BaseException,
        start_ns: int,
        end_ns: int,
    ) -> None:
        self._free.append(instance)
        self._in_flight -= 1
        elapsed_ns = end_ns - start_ns
        for pending in batch:
            timing = pending.timing
            if timing is not None:
                timing.compute_start_ns = start_ns
                timing.compute_end_ns = end_ns
                timing.batch_samples = total
                timing.batch_requests = len(batch)
        stats = self.stats
        stats.compute_hist.observe_ns(elapsed_ns)
        stats.batches_total += 1
        stats.samples_total += total
        stats.batch_sizes[total] = stats.batch_sizes.get(total, 0) + 1
        stats.compute_ns_total += elapsed_ns
        stats.computed_requests += len(batch)
        stats.compute_request_ns_total += elapsed_ns * len(batch)
        try:
            # NOTE: start the next batch before waking this one's callers, so the engine
            # is busy again while the loop runs their continuations.
            self._pump()
        finally:
            if isinstance(outcome, BaseException):
                self._fail_batch(batch, total, outcome)
            else:
                for pending, result in zip(batch, outcome, strict=True):
                    if not pending.future.done():
                        pending.future.set_result(result)
            drained = self._drained
            idle = not (self._queued or self._in_flight)
            if idle and drained is not None and not drained.done():
                drained.set_result(None)

    def _fail_batch(self, batch: list[_Pending], total: int, exc: BaseException) -> None:
        self.stats.failed += len(batch)
        if isinstance(exc, InferenceError):
            code, message = exc.code, exc.message
        else:
            code, message = ErrorCode.INTERNAL, f"engine failed: {exc}"
            logger.warning("model %s: batch of %d samples failed", self.name, total, exc_info=exc)
        for pending in batch:
            if not pending.future.done():
                # One error object per caller: a shared one would grow a traceback per await.
                error = InferenceError(code, message)
                error.__cause__ = exc
                pending.future.set_exception(error)


_PR_SET_TIMERSLACK = 29


def _tighten_timer_slack() -> None:
    """Ask Linux to wake this thread on time: its default timer slack adds ~50 us."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)


class _Alarm:
    """Calls `callback` on the event loop after a delay, with sub-millisecond precision.

    Why a thread: asyncio's selector rounds timeouts up to whole milliseconds, so
    `call_later` turns a 100 us queue delay into ~1 ms, and polling the loop instead
    burns a core for the whole delay. A thread waiting on a condition wakes within tens
    of microseconds and hands the callback over with `call_soon_threadsafe` (the same
    wake-up the loop gets when an executor finishes). Created on the first `Wait`.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None], name: str
    ) -> None:
        self._loop = loop
        self._callback = callback
        self._cond = threading.Condition()
        self._due_s: float | None = None  # time.monotonic() when to fire
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def set(self, delay_ns: int) -> None:
        """Fire after `delay_ns` (or earlier, if already due earlier)."""
        due_s = time.monotonic() + delay_ns / 1e9
        with self._cond:
            if self._due_s is None or due_s < self._due_s:
                self._due_s = due_s
                self._cond.notify()

    def stop(self) -> None:
        """Stop the thread; a pending alarm never fires."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        _tighten_timer_slack()
        with self._cond:
            while not self._stopped:
                if self._due_s is None:
                    self._cond.wait()
                    continue
                remaining_s = self._due_s - time.monotonic()
                if remaining_s > 0:
                    self._cond.wait(remaining_s)
                    continue
                self._due_s = None
                try:
                    self._loop.call_soon_threadsafe(self._callback)
                except RuntimeError:  # the loop is closed: nobody left to wake
                    return
