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
