"""Codec invariants: raw and typed tensors round-trip for every datatype; bad buffers fail."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from batchwire.datatypes import NUMPY_DTYPES
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import InferResponse
from protos import grpc_service_pb2 as pb
from server.codec import CONTENTS_FIELDS, decode_request, encode_response

FIXED = [d for d in NUMPY_DTYPES if d != "BYTES"]
shapes = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5)


def _request_from_response(response: pb.ModelInferResponse) -> pb.ModelInferRequest:
    """Turn an encoded response into a request (same tensors), to decode it back."""
    request = pb.ModelInferRequest(model_name="m")
    for out in response.outputs:
        request.inputs.add(name=out.name, datatype=out.datatype, shape=out.shape)
    request.raw_input_contents.extend(response.raw_output_contents)
    return request


@given(data=st.data(), datatype=st.sampled_from(FIXED), shape=shapes)
def test_raw_round_trip_fixed_size(
    data: st.DataObject, datatype: str, shape: tuple[int, ...]
) -> None:
    array = data.draw(hnp.arrays(NUMPY_DTYPES[datatype], shape))
    encoded = encode_response(InferResponse("m", "1", {"T": array}))
    assert encoded.outputs[0].datatype == datatype
    decoded = decode_request(_request_from_response(encoded), None).inputs["T"]
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)  # NaNs compare equal here


@given(items=st.lists(st.binary(max_size=20), min_size=1, max_size=12))
def test_raw_round_trip_bytes(items: list[bytes]) -> None:
    array = np.empty(len(items), dtype=np.object_)
    array[:] = items
    encoded = encode_response(InferResponse("m", "1", {"T": array.reshape(1, -1)}))
    assert encoded.outputs[0].datatype == "BYTES"
    decoded = decode_request(_request_from_response(encoded), None).inputs["T"]
    assert decoded.shape == (1, len(items)) and list(decoded.reshape(-1)) == items


@pytest.mark.parametrize("datatype", [d for d in CONTENTS_FIELDS if d != "BYTES"])
def test_typed_contents_decode(datatype: str) -> None:
    dtype = NUMPY_DTYPES[datatype]
    values = np.arange(6).astype(dtype) if datatype != "BOOL" else np.array([1, 0] * 3, bool)
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="T", datatype=datatype, shape=[2, 3])
    getattr(tensor.contents, CONTENTS_FIELDS[datatype]).extend(values.tolist())
    decoded = decode_request(request, None).inputs["T"]
    assert decoded.dtype == dtype
    np.testing.assert_array_equal(decoded, values.reshape(2, 3))


def test_raw_decode_is_zero_copy() -> None:
    raw = np.arange(8, dtype=np.float32).tobytes()
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[raw])
    request.inputs.add(name="T", datatype="FP32", shape=[2, 4])
    decoded = decode_request(request, None).inputs["T"]
    assert not decoded.flags.owndata and not decoded.flags.writeable


def _fails(request: pb.ModelInferRequest, *words: str) -> None:
    with pytest.raises(InferenceError) as exc:
        decode_request(request, None)
    assert exc.value.code is ErrorCode.INVALID_INPUT
    for word in words:
        assert word in exc.value.message


def test_decode_errors_name_the_input() -> None:
    r = pb.ModelInferRequest(raw_input_contents=[b"\0" * 12])
    r.inputs.add(name="A", datatype="FP32", shape=[4])
    _fails(r, "'A'", "12 bytes", "expected 16")

    r = pb.ModelInferRequest(raw_input_contents=[b"\0" * 4])
    r.inputs.add(name="A", datatype="FP32", shape=[1])
    r.inputs.add(name="B", datatype="FP32", shape=[1])
    _fails(r, "1 entries for 2 inputs")

    r = pb.ModelInferRequest()
    r.inputs.add(name="A", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    _fails(r, "'A'", "raw_input_contents")

    r = pb.ModelInferRequest()
    r.inputs.add(name="A", datatype="FP32", shape=[3]).contents.fp32_contents.extend([1, 2])
    _fails(r, "'A'", "2 elements", "expected 3")

    r = pb.ModelInferRequest(raw_input_contents=[b"\x05\0\0\0ab"])
    r.inputs.add(name="S", datatype="BYTES", shape=[1])
    _fails(r, "'S'", "overruns")

    r = pb.ModelInferRequest(raw_input_contents=[b"\0" * 4, b"\0" * 4])
    r.inputs.add(name="A", datatype="FP32", shape=[1])
    r.inputs.add(name="A", datatype="FP32", shape=[1])
    _fails(r, "'A'", "more than once")

    r = pb.ModelInferRequest(raw_input_contents=[b""])
    r.inputs.add(name="A", datatype="FP32", shape=[-1])
    _fails(r, "negative")


def test_request_parameters_priority_and_timeout_shorten_deadline() -> None:
    r = pb.ModelInferRequest(raw_input_contents=[b"\0" * 4])
    r.inputs.add(name="A", datatype="FP32", shape=[1])
    r.parameters["priority"].int64_param = 2
    r.parameters["timeout"].int64_param = 1000  # microseconds
    far = 10**30
    decoded = decode_request(r, far)
    assert decoded.priority == 2
    assert decoded.deadline_ns is not None and decoded.deadline_ns < far
