"""Concatenation, padding and splitting of batches: the one module that touches batch axes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

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

    A single request passes through with no copy. Where requests' per-sample shapes
    differ (variable dims, e.g. token sequences), each is zero-padded at the end of every
    axis to the largest; only models that mask padding may be batched that way (the
    batcher's `pad_variable_dims`; otherwise it never mixes shapes, see `group_key`).

    Args:
        requests_inputs: each request's inputs (name -> array, axis 0 = batch axis), all
            with the same input names.

    Returns:
        The batch (name -> array) and each request's batch size, in order.

    Raises:
        InferenceError: INVALID_INPUT when requests name different inputs or an input's
            rank differs between them.
    """
    sizes = [batch_size_of(inputs) for inputs in requests_inputs]
    if len(requests_inputs) == 1:
        return requests_inputs[0], sizes
    names = requests_inputs[0].keys()
    if any(r.keys() != names for r in requests_inputs):
        raise InferenceError(
            ErrorCode.INVALID_INPUT,
            f"requests with different inputs cannot share a batch: "
            f"{sorted({tuple(r) for r in requests_inputs})}",
        )
    batch = {}
    for name in names:
        arrays = [r[name] for r in requests_inputs]
        tail = arrays[0].shape[1:]
        if any(a.shape[1:] != tail for a in arrays):
            if any(a.ndim != arrays[0].ndim for a in arrays):
                raise InferenceError(
                    ErrorCode.INVALID_INPUT,
                    f"input '{name}': requests of different rank cannot share a batch "
                    f"({sorted({a.shape for a in arrays})})",
                )
            arrays = _pad_to_largest(arrays)
        batch[name] = np.concatenate(arrays)
    return batch, sizes


def _pad_to_largest(arrays: list[np.ndarray]) -> list[np.ndarray]:
    largest = np.max([a.shape[1:] for a in arrays], axis=0)
    padded = []
    for a in arrays:
        widths = [(0, 0)] + [(0, int(m - d)) for d, m in zip(a.shape[1:], largest, strict=True)]
        padded.append(np.pad(a, widths) if any(w for _, w in widths) else a)
    return padded


def pad_batch(
    batch: dict[str, np.ndarray],
    target_size: int,
    *,
    fill: Literal["repeat", "zeros"] = "repeat",
) -> dict[str, np.ndarray]:
    """Pad every input to `target_size` rows, for engines built for fixed bucket sizes.

    `split_outputs` drops the padding rows again. Inputs already at `target_size` pass
    through with no copy; others are copied once into a new array.

    Args:
        batch: name -> array, axis 0 = batch axis.
        target_size: rows each input has afterwards.
        fill: "repeat" copies the last row (keeps padding in the data's own range, which
            some models need, e.g. no all-zero attention masks); "zeros" zero-fills.

    Raises:
        ValueError: an input already has more than `target_size` rows.
    """
    out = {}
    for name, array in batch.items():
        rows = array.shape[0]
        if rows > target_size:
            raise ValueError(f"input '{name}': batch of {rows} exceeds the target {target_size}")
        if rows == target_size:
            out[name] = array
            continue
        padded = np.empty((target_size, *array.shape[1:]), dtype=array.dtype)
        padded[:rows] = array
        if fill == "repeat" and rows:
            padded[rows:] = array[-1]
        else:
            padded[rows:] = 0
        out[name] = padded
    return out


def split_outputs(
    outputs: dict[str, np.ndarray], sizes: Sequence[int]
) -> list[dict[str, np.ndarray]]:
    """Slice a batch's outputs back into per-request views (trailing padding is dropped).

    The results are views of the engine's arrays (no copy); a single request that owns
    every row gets the engine's dict itself.

    Args:
        outputs: the engine's outputs, axis 0 = batch axis.
        sizes: each request's batch size, in batch order.

    Returns:
        One dict of outputs per request, in order.

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


#: What requests must have in common to share a batch (see `group_key`).
GroupKey = tuple[tuple[str, tuple[int, ...] | None], ...]


def group_key(inputs: dict[str, np.ndarray], *, pad_variable_dims: bool = False) -> GroupKey:
    """What a request must share with others to ride in one batch.

    Requests share a batch only if they name the same inputs and, unless variable dims
    are zero-padded per batch (`pad_variable_dims`), have the same per-sample shapes;
    the batcher starts a new batch at the first request whose key differs, so a request
    of another shape waits for the next batch rather than being rejected.

    Args:
        inputs: one request's inputs.
        pad_variable_dims: the batcher pads variable dims, so shapes need not match.
    """
    if pad_variable_dims:
        return tuple((name, None) for name in inputs)
    return tuple((name, array.shape[1:]) for name, array in inputs.items())
