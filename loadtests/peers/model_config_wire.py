"""Triton's `ModelConfigResponse` for mlp64, encoded by hand in protobuf wire format.

MLServer has no ModelConfig RPC, and perf_analyzer needs one. MLServer's process already
registers the protobuf package `inference` (its own `dataplane.proto`); loading batchwire's
or tritonclient's stubs there would register the same message names again and fail. So the
MLServer launcher answers ModelConfig with these bytes, built from a few field numbers of
Triton's public `model_config.proto` (a test parses them with batchwire's stubs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from loadtests.peers import model

_VARINT: Final = 0
_LEN: Final = 2
#: `inference.DataType.TYPE_FP32` in Triton's model_config.proto.
TYPE_FP32: Final = 11


def _varint(value: int) -> bytes:
    # Negative int64 values travel as their 64-bit two's complement (10 bytes).
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _len_field(field: int, payload: bytes) -> bytes:
    return _key(field, _LEN) + _varint(len(payload)) + payload


def _int_field(field: int, value: int) -> bytes:
    # proto3 omits fields holding their default value.
    return _key(field, _VARINT) + _varint(value) if value else b""


def _str_field(field: int, value: str) -> bytes:
    return _len_field(field, value.encode()) if value else b""


def _packed(field: int, values: Sequence[int]) -> bytes:
    return _len_field(field, b"".join(_varint(v) for v in values)) if values else b""


def model_config_response(
    name: str = model.NAME,
    *,
    max_batch_size: int = model.MAX_BATCH_SIZE,
    input_name: str = model.INPUT_NAME,
    output_name: str = model.OUTPUT_NAME,
    dims: Sequence[int] = (model.WIDTH,),
    max_queue_delay_us: int = model.MAX_QUEUE_DELAY_US,
    backend: str = "",
) -> bytes:
    """A serialized `inference.ModelConfigResponse` for a one-input, one-output FP32 model.

    Args:
        name: Model name.
        max_batch_size: Samples per batch; dims exclude the batch dimension when it is > 0.
        input_name: The input tensor's name.
        output_name: The output tensor's name.
        dims: Dims of both tensors, without the batch dimension.
        max_queue_delay_us: The dynamic batcher's delay (reported only; the peer batches).
        backend: The backend label reported to clients.

    Returns:
        The message's bytes, ready to be the RPC's response body.
    """
    # ModelInput: name=1, data_type=2, dims=4; ModelOutput: name=1, data_type=2, dims=3.
    model_input = _str_field(1, input_name) + _int_field(2, TYPE_FP32) + _packed(4, dims)
    model_output = _str_field(1, output_name) + _int_field(2, TYPE_FP32) + _packed(3, dims)
    # ModelDynamicBatching: max_queue_delay_microseconds=2.
    dynamic_batching = _int_field(2, max_queue_delay_us)
    # ModelConfig: name=1, max_batch_size=4, input=5, output=6, dynamic_batching=11, backend=17.
    config = (
        _str_field(1, name)
        + _int_field(4, max_batch_size)
        + _len_field(5, model_input)
        + _len_field(6, model_output)
        + _len_field(11, dynamic_batching)
        + _str_field(17, backend)
    )
    # ModelConfigResponse: config=1.
    return _len_field(1, config)
