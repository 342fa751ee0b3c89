"""Concat/split/pad invariants: every request gets exactly its own rows back."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from batching.tensors import concat_inputs, pad_batch, split_outputs
from batchwire.errors import ErrorCode, InferenceError

dtypes = st.sampled_from([np.float32, np.float16, np.int64, np.int8, np.uint8, np.bool_])


@given(
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=8),
    dtype=dtypes,
    tail=hnp.array_shapes(min_dims=0, max_dims=2, max_side=3),
    pad=st.integers(0, 4),
)
def test_concat_pad_split_round_trip(
    sizes: list[int], dtype: type, tail: tuple[int, ...], pad: int
) -> None:
    rng = np.random.default_rng(len(sizes))
    requests = [
        {"A": rng.integers(0, 100, (n, *tail)).astype(dtype), "B": np.full((n, 2), i)}
        for i, n in enumerate(sizes)
    ]
    batch, got_sizes = concat_inputs(requests)
    assert got_sizes == sizes
    assert batch["A"].shape[0] == sum(sizes)
    padded = pad_batch(batch, sum(sizes) + pad)
    assert padded["A"].shape[0] == sum(sizes) + pad
    parts = split_outputs(padded, sizes)
    assert len(parts) == len(requests)
    for request, part in zip(requests, parts, strict=True):
        np.testing.assert_array_equal(part["A"], request["A"])
        np.testing.assert_array_equal(part["B"], request["B"])


def test_single_request_passes_through_without_copy() -> None:
    x = {"A": np.arange(6).reshape(3, 2)}
    batch, sizes = concat_inputs([x])
    assert batch["A"] is x["A"] and sizes == [3]
    assert split_outputs(batch, sizes)[0]["A"] is x["A"]


def test_short_engine_output_is_an_internal_error() -> None:
    with pytest.raises(InferenceError) as exc:
        split_outputs({"Y": np.zeros((3, 1))}, [2, 2])
    assert exc.value.code is ErrorCode.INTERNAL
    assert "3 rows" in exc.value.message and "batch of 4" in exc.value.message


def test_padding_repeats_the_last_row_or_zero_fills() -> None:
    batch = {"A": np.array([[1, 2], [3, 4]], np.int32)}
    np.testing.assert_array_equal(pad_batch(batch, 4)["A"], [[1, 2], [3, 4], [3, 4], [3, 4]])
    zeros = pad_batch(batch, 3, fill="zeros")["A"]
    np.testing.assert_array_equal(zeros, [[1, 2], [3, 4], [0, 0]])
    assert zeros.dtype == np.int32
    assert pad_batch(batch, 2)["A"] is batch["A"]  # already the target size: no copy
    with pytest.raises(ValueError, match="exceeds the target 1"):
        pad_batch(batch, 1)


def test_requests_naming_different_inputs_cannot_be_concatenated() -> None:
    with pytest.raises(InferenceError) as exc:
        concat_inputs([{"A": np.zeros((1, 2))}, {"B": np.zeros((1, 2))}])
    assert exc.value.code is ErrorCode.INVALID_INPUT


def test_inputs_of_different_rank_cannot_be_concatenated() -> None:
    with pytest.raises(InferenceError) as exc:
        concat_inputs([{"A": np.zeros((1, 2))}, {"A": np.zeros((1, 2, 2))}])
    assert exc.value.code is ErrorCode.INVALID_INPUT
    assert "input 'A'" in exc.value.message


def test_split_outputs_are_views_of_the_batch() -> None:
    outputs = {"Y": np.arange(10).reshape(5, 2)}
    parts = split_outputs(outputs, [2, 3])
    assert all(np.shares_memory(part["Y"], outputs["Y"]) for part in parts)


def test_variable_dims_are_zero_padded_to_the_largest() -> None:
    a = {"ids": np.array([[1, 2, 3]]), "mask": np.array([[1, 1, 1]])}
    b = {"ids": np.array([[4], [5]]), "mask": np.array([[1], [1]])}
    batch, sizes = concat_inputs([a, b])
    assert sizes == [1, 2]
    np.testing.assert_array_equal(batch["ids"], [[1, 2, 3], [4, 0, 0], [5, 0, 0]])
    np.testing.assert_array_equal(batch["mask"], [[1, 1, 1], [1, 0, 0], [1, 0, 0]])


def test_group_key_ignores_variable_dims_only_when_padding() -> None:
    from batching.tensors import group_key

    a = {"ids": np.zeros((1, 3))}
    b = {"ids": np.zeros((2, 5))}
    assert group_key(a) != group_key(b)
    assert group_key(a, pad_variable_dims=True) == group_key(b, pad_variable_dims=True)
    assert group_key({"T": np.zeros((1, 1))}, pad_variable_dims=True) != group_key(
        a, pad_variable_dims=True
    )
