"""The ingress's status mapping, with fake deployment handles (no Ray instance needed).

Bad input, unknown models and Ray failures (a dead replica, full replica queues) must get
the status codes the plain front door answers with for the same situation.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest

from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import InferRequest, InferResponse
from protos import grpc_service_pb2 as pb

pytestmark = pytest.mark.ray


class FakeContext:
    """What the ingress uses of Serve's RayServegRPCContext."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


class Raise:
    """A replica call that raises (as Ray does for a dead replica) instead of returning."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class FakeMethod:
    def __init__(self, outcome: object) -> None:
        self.outcome = outcome
        self.calls: list[tuple[Any, ...]] = []

    def remote(self, *args: Any) -> Any:
        self.calls.append(args)

        async def result() -> object:
            if isinstance(self.outcome, Raise):
                raise self.outcome.exc
            return self.outcome

        return result()


class FakeHandle:
    def __init__(self, outcome: object) -> None:
        self.infer = FakeMethod(outcome)
        self.metadata = FakeMethod(outcome)


def ingress(outcome: object) -> tuple[Any, FakeHandle]:
    from server.ray_serve import Ingress

    handle = FakeHandle(outcome)
    return Ingress({"m": handle}), handle  # type: ignore[dict-item]


def request(model: str = "m", datatype: str = "FP32") -> pb.ModelInferRequest:
    out = pb.ModelInferRequest(model_name=model, id="r1")
    out.inputs.add(name="X", datatype=datatype, shape=[1, 2])
    out.raw_input_contents.append(np.ones((1, 2), np.float32).tobytes())
    return out


def infer(
    outcome: object, req: pb.ModelInferRequest
) -> tuple[pb.ModelInferResponse, FakeContext, FakeHandle]:
    app, handle = ingress(outcome)
    context = FakeContext()
    return asyncio.run(app.ModelInfer(req, context)), context, handle


def test_success_decodes_in_the_ingress_and_encodes_the_replica_result() -> None:
    answer = InferResponse("m", "1", {"Y": np.array([[3.0]], np.float32)}, id="r1")
    response, context, handle = infer(answer, request())
    assert context.code is None
    assert response.id == "r1" and response.outputs[0].name == "Y"
    ((version, decoded, timeout_ns),) = handle.infer.calls
    assert isinstance(decoded, InferRequest) and decoded.inputs["X"].shape == (1, 2)
    assert timeout_ns is None and decoded.deadline_ns is None


def test_timeout_parameter_travels_as_time_left_not_as_a_deadline() -> None:
    req = request()
    req.parameters["timeout"].int64_param = 5_000_000  # 5 s, in µs (Triton's unit)
    _, _, handle = infer(InferResponse("m", "1", {}), req)
    ((_, decoded, timeout_ns),) = handle.infer.calls
    assert decoded.deadline_ns is None  # another node's monotonic clock means nothing here
    assert 0 < timeout_ns <= 5_000_000_000


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (InferenceError(ErrorCode.INVALID_INPUT, "input 'X': bad shape"), "INVALID_ARGUMENT"),
        (InferenceError(ErrorCode.NOT_FOUND, "unknown version '7'"), "NOT_FOUND"),
        (InferenceError(ErrorCode.QUEUE_FULL, "queue full"), "RESOURCE_EXHAUSTED"),
        (InferenceError(ErrorCode.DEADLINE_EXCEEDED, "late"), "DEADLINE_EXCEEDED"),
    ],
)
def test_replica_errors_keep_the_plain_front_doors_status_and_message(
    error: InferenceError, status: str
) -> None:
    response, context, _ = infer(error, request())
    assert context.code is not None and context.code.name == status
    assert context.details == error.message
    assert response == pb.ModelInferResponse()


def test_unknown_model_and_undecodable_input_never_reach_a_replica() -> None:
    _, context, handle = infer(None, request(model="nope"))
    assert context.code == grpc.StatusCode.NOT_FOUND
    assert context.details == "unknown model 'nope'"  # the runtime's wording
    _, context, handle = infer(None, request(datatype="FLOAT32"))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "FLOAT32" in context.details
    assert handle.infer.calls == []


def test_ray_failures_map_to_retryable_or_overload_statuses() -> None:
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    _, context, _ = infer(Raise(ActorDiedError()), request())
    assert context.code == grpc.StatusCode.UNAVAILABLE and "retry" in context.details
    full = BackPressureError(num_queued_requests=8, max_queued_requests=8)
    _, context, _ = infer(Raise(full), request())
    assert context.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    _, context, _ = infer(Raise(RuntimeError("boom")), request())
    assert context.code == grpc.StatusCode.INTERNAL and "boom" in context.details


def test_metadata_of_an_unknown_version_is_not_found() -> None:
    app, _ = ingress(InferenceError(ErrorCode.NOT_FOUND, "unknown version '9' of model 'm'"))
    context = FakeContext()
    out = asyncio.run(app.ModelMetadata(pb.ModelMetadataRequest(name="m", version="9"), context))
    assert context.code == grpc.StatusCode.NOT_FOUND and "'9'" in context.details
    assert out == pb.ModelMetadataResponse()
