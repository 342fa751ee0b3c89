"""The dispatch decision: a pure function of the queue and the clock (Triton-style)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from batchwire.config import DynamicBatchingConfig


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When to dispatch a batch. Sizes count samples, not requests.

    Attributes:
        max_batch_size: largest batch in samples; 0 = the model does not batch.
        preferred_batch_sizes: sizes dispatched at once when reached, ascending.
        max_queue_delay_ns: longest the oldest queued request waits for a batch to fill.
    """

    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_ns: int = 0

    def __post_init__(self) -> None:
        if self.max_batch_size < 0 or self.max_queue_delay_ns < 0:
            raise ValueError(f"negative max_batch_size or max_queue_delay_ns in {self}")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= max(self.max_batch_size, 1):
                raise ValueError(
                    f"preferred batch size {size} outside 1..max_batch_size ({self.max_batch_size})"
                )

    @classmethod
    def from_config(cls, config: DynamicBatchingConfig | None, max_batch_size: int) -> BatchPolicy:
        """The policy of a model's `dynamic_batching` section.

        Args:
            config: the section; None dispatches at once, with no preferred sizes.
            max_batch_size: the model's `max_batch_size` (0 = it does not batch).
        """
        if config is None:
            return cls(max_batch_size)
        return cls(
            max_batch_size,
            tuple(sorted(set(config.preferred_batch_size))),
            config.max_queue_delay_us * 1000,
        )


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Run the first `n_requests` queued requests as one batch now."""

    n_requests: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to dispatch for `wait_ns` unless a request arrives."""

    wait_ns: int


@dataclass(frozen=True, slots=True)
class Idle:
    """The queue is empty."""


IDLE = Idle()
Decision = Dispatch | Wait | Idle


def decide(
    policy: BatchPolicy,
    queued_sizes: Iterable[int],
    oldest_enqueued_ns: int,
    now_ns: int,
    *,
    closing: bool = False,
) -> Decision:
    """Decide whether to dispatch a batch now, and how many queued requests it takes.

    Requests are taken in FIFO order while their samples fit in `max_batch_size`; a
    dispatch always holds at least one request. In order:

    1. the prefix is full (it reaches `max_batch_size`, or the next request does not
       fit): dispatch it now;
    2. the delay is not up and the prefix passes a preferred batch size: dispatch the
       prefix that ends on the largest such size now (Triton's rule);
    3. the oldest request has waited `max_queue_delay_ns` (always true when it is 0),
       or `closing`: dispatch the whole prefix, preferred sizes notwithstanding;
    4. else wait for the rest of the delay.

    A model that does not batch (`max_batch_size == 0`) runs one request at a time.

    Args:
        policy: the model's batching policy.
        queued_sizes: batch size (samples) of each queued request, oldest first; only the
            prefix that fits in one batch is read.
        oldest_enqueued_ns: when the oldest queued request arrived.
        now_ns: the current time on the same clock.
        closing: the batcher is draining: nothing waits any more.

    Returns:
        `Dispatch(n)`, `Wait(wait_ns)` (wait_ns > 0), or `IDLE` when nothing is queued.
    """
    if policy.max_batch_size == 0:
        return Dispatch(1) if any(True for _ in queued_sizes) else IDLE
    total = 0
    taken = 0
    preferred_at = 0  # requests in the prefix that ends on the largest preferred size
    preferred = policy.preferred_batch_sizes
    full = False
    for size in queued_sizes:
        if total + size > policy.max_batch_size:
            full = True
            break
        total += size
        taken += 1
        if total in preferred:
            preferred_at = taken
        if total == policy.max_batch_size:
            full = True
            break
    if full:
        # A lone request above max_batch_size (validated away upstream) still goes alone.
        return Dispatch(max(taken, 1))
    if taken == 0:
        return IDLE
    waited_ns = now_ns - oldest_enqueued_ns
    if closing or waited_ns >= policy.max_queue_delay_ns:
        return Dispatch(taken)
    if preferred_at:
        return Dispatch(preferred_at)
    return Wait(policy.max_queue_delay_ns - waited_ns)
