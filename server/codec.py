"""Stateless converters between v2 protobuf tensors and numpy arrays (zero-copy where possible)."""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Mapping
from typing import Final

import numpy as np

from batchwire.datatypes import NUMPY_DTYPES, datatype_of
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import InferRequest, InferResponse
from protos import grpc_service_pb2 as pb

#: Datatype label -> the `InferTensorContents` field that carries it when sent typed.
#: FP16 (and BF16) have no typed field: they travel only in raw_input_contents.
CONTENTS_FIELDS: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}

_LENGTH: Final = struct.Struct("<I")


def _invalid(message: str) -> InferenceError:
    return InferenceError(ErrorCode.INVALID_INPUT, message, reason="malformed")


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def deserialize_bytes(name: str, raw: bytes, count: int) -> np.ndarray:
    """Parse a raw BYTES tensor: `count` elements, each a 4-byte LE length then its bytes.

    Raises:
        InferenceError: INVALID_INPUT when the buffer does not hold exactly `count` elements.
    """
    out = np.empty(count, dtype=np.object_)
    offset, end = 0, len(raw)
    # NOTE: BYTES elements are variable-length, so this walk is inherently per element.
    for i in range(count):
        if offset + 4 > end:
            raise _invalid(f"input '{name}': raw BYTES buffer ends after {i} of {count} elements")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > end:
            raise _invalid(f"input '{name}': raw BYTES element {i} overruns the buffer")
        out[i] = raw[offset : offset + length]
        offset += length
    if offset != end:
        raise _invalid(
            f"input '{name}': raw BYTES buffer has {end - offset} bytes after {count} elements"
        )
    return out


def serialize_bytes(array: np.ndarray) -> bytes:
    """Encode a BYTES array (bytes or str elements) as length-prefixed raw contents."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def _decode_tensor(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    dtype = NUMPY_DTYPES.get(datatype)
    if dtype is None:
        raise _invalid(f"input '{name}': unsupported datatype '{datatype}'")
    shape = tuple(tensor.shape[:])  # NOTE: slicing a upb repeated field is ~3x cheaper
    if shape and min(shape) < 0:
        raise _invalid(f"input '{name}': shape {_shape_text(shape)} has a negative dimension")
    count = math.prod(shape)  # exact for any size; np.prod costs microseconds here
    if raw is not None:
        if datatype == "BYTES":
            return deserialize_bytes(name, raw, count).reshape(shape)
        expected = count * dtype.itemsize
        if len(raw) != expected:
            raise _invalid(
                f"input '{name}': raw_input_contents holds {len(raw)} bytes, expected "
                f"{expected} for {datatype} shape {_shape_text(shape)}"
            )
        # Zero-copy: a read-only view on the request's bytes.
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    field = CONTENTS_FIELDS.get(datatype)
    if field is None:
        raise _invalid(f"input '{name}': {datatype} must be sent in raw_input_contents")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise _invalid(
            f"input '{name}': contents hold {len(values)} elements, expected {count} for "
            f"shape {_shape_text(shape)}"
        )
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def decode_request(request: pb.ModelInferRequest, deadline_ns: int | None) -> InferRequest:
    """Convert a ModelInferRequest into an `InferRequest` of numpy arrays.

    Raises:
        InferenceError: INVALID_INPUT for malformed tensors (unknown datatype, raw buffers
            that do not match their shape, raw and typed contents mixed, duplicate inputs).
    """
    # NOTE: upb repeated fields and maps are slow to iterate (a Python-level iterator per
    # element; a map's `.items()` goes through collections.abc): slice once, iterate keys.
    raws = request.raw_input_contents[:]
    tensors = request.inputs[:]
    if raws and len(raws) != len(tensors):
        raise _invalid(
            f"raw_input_contents has {len(raws)} entries for {len(tensors)} inputs; "
            "send one per input, in input order"
        )
    inputs: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(tensors):
        if raws and tensor.HasField("contents"):
            raise _invalid(
                f"input '{tensor.name}': contents must be empty when raw_input_contents is used"
            )
        if tensor.name in inputs:
            raise _invalid(f"input '{tensor.name}' appears more than once")
        inputs[tensor.name] = _decode_tensor(tensor, raws[i] if raws else None)
    outputs = request.outputs
    requested = [o.name for o in outputs[:]] if outputs else None
    # NOTE: guarded: iterating an empty protobuf map still costs a few microseconds.
    parameters = request.parameters
    params = {key: _param_value(parameters[key]) for key in parameters} if parameters else {}
    priority = params.get("priority", 0)
    timeout_us = params.get("timeout", 0)
    if isinstance(timeout_us, int) and not isinstance(timeout_us, bool) and timeout_us > 0:
        # Triton's per-request queue timeout (microseconds) may only shorten the deadline.
        from_param = time.monotonic_ns() + timeout_us * 1000
        deadline_ns = from_param if deadline_ns is None else min(deadline_ns, from_param)
    return InferRequest(
        inputs=inputs,
        requested_outputs=requested,
        id=request.id,
        deadline_ns=deadline_ns,
        priority=priority if isinstance(priority, int) and not isinstance(priority, bool) else 0,
        parameters=params,
    )


def _param_value(param: pb.InferParameter) -> object:
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def encode_response(response: InferResponse) -> pb.ModelInferResponse:
    """Convert an `InferResponse` into a ModelInferResponse with raw_output_contents."""
    out = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    for key, value in response.parameters.items():
        param = out.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        else:
            param.string_param = value
    append_outputs(out, response.outputs)
    return out


def append_outputs(out: pb.ModelInferResponse, outputs: Mapping[str, np.ndarray]) -> None:
    """Append output tensors (in the mapping's order) as raw_output_contents."""
    raws = out.raw_output_contents
    add = out.outputs.add
    for name, array in outputs.items():
        datatype = datatype_of(array)
        add(name=name, datatype=datatype, shape=array.shape)
        # NOTE: tobytes() writes C order whatever the array's layout.
        raws.append(serialize_bytes(array) if datatype == "BYTES" else array.tobytes())
