"""Locust load test of the Open Inference Protocol's ModelInfer over gRPC.

    locust -f loadtests/locustfile.py --host 127.0.0.1:8001 --models digits:3,mlp64:1
    python -m loadtests.locust_gate ...      # headless run + SLO gate (see that module)

Each simulated user keeps one gRPC channel and sends ModelInfer back to back to a model
drawn by `--models` weights (`name:weight,...`), with request bodies built once from the
model's ModelMetadata (batch dim -> `--batch-size`). Every call fires Locust's `request`
event with the response time, the response size and the gRPC error (request type `grpc`,
name = the model), so Locust's statistics, CSV and HTML reports are per model. Works
against either front door (`batchwire serve`, `batchwire serve --ray`).
"""

from __future__ import annotations

import random
import time
from typing import Any

# NOTE: Locust monkey-patches the standard library with gevent before importing this
# file; grpc's own I/O must be made gevent-aware too, before any channel exists.
import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import User, constant, events, task

from loadtests.locust_gate import parse_models
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

grpc_gevent.init_gevent()

NUMPY: dict[str, Any] = {
    "BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
    "UINT64": np.uint64, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip
SAMPLE_TEXT = b"batchwire serves models over the Open Inference Protocol"


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _arguments(parser: Any) -> None:
    parser.add_argument(
        "--models", default="digits", help="models and weights: name[:weight],... (default digits)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="samples per request")
    parser.add_argument(
        "--request-timeout-s", type=float, default=30.0, help="gRPC deadline per request"
    )


def build_request(
    metadata: pb.ModelMetadataResponse, batch_size: int, rng: np.random.Generator
) -> pb.ModelInferRequest:
    """A valid request for the model: random numbers, or a sentence for BYTES inputs.

    A model with a BYTES (text) input gets only its BYTES inputs (it also accepts token ids
    instead, but not both).
    """
    inputs = list(metadata.inputs)
    if any(t.datatype == "BYTES" for t in inputs):
        inputs = [t for t in inputs if t.datatype == "BYTES"]
    request = pb.ModelInferRequest(model_name=metadata.name)
    for tensor in inputs:
        shape = [
            batch_size if i == 0 and d == -1 else max(d, 1) for i, d in enumerate(tensor.shape)
        ]
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        count = int(np.prod(shape))
        if tensor.datatype == "BYTES":
            element = len(SAMPLE_TEXT).to_bytes(4, "little") + SAMPLE_TEXT
            request.raw_input_contents.append(element * count)
        else:
            dtype = NUMPY[tensor.datatype]
            values = rng.random(count) * (16 if np.issubdtype(dtype, np.floating) else 1)
            request.raw_input_contents.append(values.astype(dtype).tobytes())
    return request


class InferenceUser(User):
    """Sends ModelInfer back to back over one channel (the host is `HOST:PORT`)."""

    wait_time = constant(0)
    host = "127.0.0.1:8001"

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.timeout_s = float(getattr(options, "request_timeout_s", 30.0))
        models = parse_models(getattr(options, "models", "digits"))
        batch_size = int(getattr(options, "batch_size", 1))
        self.channel = grpc.insecure_channel(self.host)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        rng = np.random.default_rng()
        self.requests = {}
        for name, _ in models:
            metadata = self.stub.ModelMetadata(
                pb.ModelMetadataRequest(name=name), timeout=self.timeout_s
            )
            self.requests[name] = build_request(metadata, batch_size, rng)
        self.names = [name for name, _ in models]
        self.weights = [weight for _, weight in models]

    def on_stop(self) -> None:
        self.channel.close()

    @task
    def infer(self) -> None:
        name = random.choices(self.names, self.weights)[0]
        start = time.perf_counter()
        exception: Exception | None = None
        length = 0
        try:
            response = self.stub.ModelInfer(self.requests[name], timeout=self.timeout_s)
            length = response.ByteSize()
        except grpc.RpcError as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )
