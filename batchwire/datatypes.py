"""Open Inference Protocol datatypes and their numpy equivalents (module constants)."""

from __future__ import annotations

from typing import Final

import numpy as np

#: v2 protocol datatype label -> numpy dtype. BYTES tensors are numpy object arrays of `bytes`.
NUMPY_DTYPES: Final[dict[str, np.dtype]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

#: numpy dtype -> v2 datatype label (the inverse of `NUMPY_DTYPES`).
DATATYPES: Final[dict[np.dtype, str]] = {v: k for k, v in NUMPY_DTYPES.items()}

#: Byte width of each fixed-size datatype (BYTES is variable-length and absent).
ITEM_SIZES: Final[dict[str, int]] = {k: v.itemsize for k, v in NUMPY_DTYPES.items() if k != "BYTES"}


def numpy_dtype(datatype: str) -> np.dtype:
    """Return the numpy dtype of a v2 datatype label.

    Raises:
        KeyError: the label is not a supported datatype.
    """
    return NUMPY_DTYPES[datatype]


def datatype_of(array: np.ndarray) -> str:
    """Return the v2 datatype label of a numpy array (`BYTES` for object/bytes arrays)."""
    if array.dtype.kind in ("O", "S"):
        return "BYTES"
    return DATATYPES[array.dtype]
