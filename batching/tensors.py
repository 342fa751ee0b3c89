"""Concatenation, padding and splitting of batches: the one module that touches batch axes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from batchwire.errors import ErrorCode, InferenceError


def batch_size_of(inputs: dict[str, np.ndarray]) -> int:
    """Samples in a request: the length of axis 0 of its first input (1 for no inputs)."""
    for array in inputs.values():
        return int(array.shape[0]) if array.ndim else 1
    return 1


def concat_inputs(
    requests_inputs: Sequence[dict[str, np.ndarray]],
) -> tuple[dict[str, np.ndarray], list[int]]:
    """Concatenate requests along axis 0; returns the batch and each request's size.

    A single request passes through with no copy.
    """
    sizes = [batch_size_of(inputs) for inputs in requests_inputs]
    if len(requests_inputs) == 1:
        return requests_inputs[0], sizes
    first = requests_inputs[0]
    batch = {name: np.concatenate([r[name] for r in requests_inputs]) for name in first}
    return batch, sizes


def pad_batch(batch: dict[str, np.ndarray], target_size: int) -> dict[str, np.ndarray]:
    """Pad every input to `target_size` rows by repeating its last row (engine buckets)."""
    out = {}
    for name, array in batch.items():
        missing = target_size - array.shape[0]
        if missing < 0:
            raise ValueError(f"batch of {array.shape[0]} exceeds the target size {target_size}")
        if missing == 0:
            out[name] = array
        else:
            out[name] = np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])
    return out


def split_outputs(
    outputs: dict[str, np.ndarray], sizes: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    """Slice a batch's outputs back into per-request views (trailing padding is dropped).

    Raises:
        InferenceError: INTERNAL when an output has fewer rows than the batch.
    """
    total = sum(sizes)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] < total:
            rows = array.shape[0] if array.ndim else 0
            raise InferenceError(
                ErrorCode.INTERNAL,
                f"engine returned {rows} rows of output '{name}' for a batch of {total}",
            )
    if len(sizes) == 1 and all(array.shape[0] == total for array in outputs.values()):
        return [outputs]
    result = []
    start = 0
    for size in sizes:
        end = start + size
        result.append({name: array[start:end] for name, array in outputs.items()})
        start = end
    return result


def trailing_shapes(inputs: dict[str, np.ndarray]) -> tuple[tuple[int, ...], ...]:
    """The per-sample shapes of a request's inputs: requests batch together only if equal."""
    return tuple(array.shape[1:] for array in inputs.values())
