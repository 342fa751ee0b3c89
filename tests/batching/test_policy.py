"""The dispatch decision with a fake clock: sizes in samples, delays, preferred sizes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batching.policy import IDLE, BatchPolicy, Dispatch, Wait, decide
from batchwire.config import DynamicBatchingConfig

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


def test_once_the_delay_is_up_everything_that_fits_goes() -> None:
    # Preferred sizes shape batches only while the delay runs (Triton's rule).
    assert decide(POLICY, [2, 2, 1], 0, 499 * US) == Dispatch(2)
    assert decide(POLICY, [2, 2, 1], 0, 500 * US) == Dispatch(3)
    assert decide(POLICY, [2, 2, 1, 4], 0, 500 * US) == Dispatch(3)  # still within max


def test_closing_drains_without_waiting() -> None:
    assert decide(POLICY, [1], 0, 0, closing=True) == Dispatch(1)
    assert decide(POLICY, [2, 2, 1], 0, 0, closing=True) == Dispatch(3)
    assert decide(POLICY, [], 0, 0, closing=True) == IDLE


def test_a_lone_request_larger_than_max_still_goes_alone() -> None:
    assert decide(POLICY, [9, 1], 0, 0) == Dispatch(1)


def test_policy_from_config_converts_units_and_sorts_preferred_sizes() -> None:
    config = DynamicBatchingConfig(preferred_batch_size=[32, 16, 32], max_queue_delay_us=250)
    assert BatchPolicy.from_config(config, 64) == BatchPolicy(64, (16, 32), 250_000)
    assert BatchPolicy.from_config(None, 8) == BatchPolicy(8, (), 0)


def test_policy_rejects_preferred_sizes_outside_the_batch() -> None:
    with pytest.raises(ValueError, match="preferred batch size 9"):
        BatchPolicy(8, (9,), 0)
    with pytest.raises(ValueError):
        BatchPolicy(8, (), -1)


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
)
def test_a_dispatch_takes_the_largest_batch_the_rules_allow(sizes: list[int], waited: int) -> None:
    decision = decide(POLICY, sizes, 0, waited)
    totals = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    fitting = [t for t in totals if t <= POLICY.max_batch_size]
    if isinstance(decision, Dispatch):
        chosen = sum(sizes[: decision.n_requests])
        full = len(fitting) < len(sizes) or fitting[-1] == POLICY.max_batch_size
        if full or waited >= POLICY.max_queue_delay_ns:
            # full or delay up: everything that fits (at least one request)
            assert decision.n_requests == max(len(fitting), 1)
        else:
            # only a preferred size dispatches early, and the largest one reached
            assert chosen == max(t for t in fitting if t in POLICY.preferred_batch_sizes)
    else:
        assert decision == Wait(POLICY.max_queue_delay_ns - waited)
        assert not set(fitting) & set(POLICY.preferred_batch_sizes)


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
