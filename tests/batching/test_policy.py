"""The dispatch decision with a fake clock: sizes in samples, delays, preferred sizes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from batching.policy import IDLE, BatchPolicy, Dispatch, Wait, decide

US = 1000
POLICY = BatchPolicy(max_batch_size=8, preferred_batch_sizes=(4,), max_queue_delay_ns=500 * US)


def test_empty_queue_is_idle() -> None:
    assert decide(POLICY, [], 0, 0) == IDLE


def test_waits_until_the_oldest_request_has_waited_the_delay() -> None:
    assert decide(POLICY, [1, 1], oldest_enqueued_ns=1000, now_ns=1000) == Wait(500 * US)
    assert decide(POLICY, [1, 1], oldest_enqueued_ns=1000, now_ns=1000 + 200 * US) == Wait(300 * US)
    assert decide(POLICY, [1, 1], oldest_enqueued_ns=1000, now_ns=1000 + 500 * US) == Dispatch(2)


def test_dispatches_at_once_when_the_batch_is_full() -> None:
    assert decide(POLICY, [3, 5], 0, 0) == Dispatch(2)  # exactly max_batch_size samples


def test_batch_size_counts_samples_and_splits_an_overfull_queue() -> None:
    # 6 + 3 > 8: the second request cannot fit, so the first goes alone, now.
    assert decide(POLICY, [6, 3, 1], 0, 0) == Dispatch(1)


def test_preferred_size_dispatches_without_waiting() -> None:
    assert decide(POLICY, [2, 2], 0, 0) == Dispatch(2)
    assert decide(POLICY, [1, 1, 1], 0, 0) == Wait(500 * US)
    # 4 samples reached after two requests; the third would make 5: take the preferred 4.
    assert decide(POLICY, [2, 2, 1], 0, 0) == Dispatch(2)


def test_largest_reachable_preferred_size_wins() -> None:
    policy = BatchPolicy(max_batch_size=64, preferred_batch_sizes=(2, 4), max_queue_delay_ns=US)
    assert decide(policy, [1, 1, 1, 1, 1], 0, 0) == Dispatch(4)


def test_closing_drains_without_waiting() -> None:
    assert decide(POLICY, [1], 0, 0, closing=True) == Dispatch(1)


def test_unbatched_model_runs_one_request_at_a_time() -> None:
    policy = BatchPolicy(max_batch_size=0)
    assert decide(policy, [1, 1, 1], 0, 0) == Dispatch(1)
    assert decide(policy, [], 0, 0) == IDLE


def test_zero_delay_dispatches_what_is_there() -> None:
    policy = BatchPolicy(max_batch_size=8)
    assert decide(policy, [1, 2], 5, 5) == Dispatch(2)


@given(
    sizes=st.lists(st.integers(1, 8), min_size=1, max_size=30),
    waited=st.integers(0, 1000 * US),
    closing=st.booleans(),
)
def test_a_dispatch_never_exceeds_max_batch_size(
    sizes: list[int], waited: int, closing: bool
) -> None:
    decision = decide(POLICY, sizes, 0, waited, closing=closing)
    assert isinstance(decision, (Dispatch, Wait))
    if isinstance(decision, Dispatch):
        assert 1 <= decision.n_requests <= len(sizes)
        assert sum(sizes[: decision.n_requests]) <= POLICY.max_batch_size
    else:
        assert not closing and 0 < decision.wait_ns <= POLICY.max_queue_delay_ns
        assert sum(sizes) < POLICY.max_batch_size
