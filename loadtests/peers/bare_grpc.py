"""A bare grpc.aio servicer for mlp64: no batching, no queue, numpy on the event loop.

    python -m loadtests.peers.bare_grpc [--host 127.0.0.1] [--port 0]

The floor of Python gRPC serving cost: each ModelInfer decodes its raw input, computes
relu(x @ W) inline and answers. It implements only what perf_analyzer calls: ServerLive,
ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig and ModelInfer (anything
else is UNIMPLEMENTED). Prints `bare serving on HOST:PORT models: mlp64/1` when ready; SIGTERM
stops it. Runs in batchwire's venv and uses its generated stubs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable

import grpc
import numpy as np
import numpy.typing as npt

from loadtests.peers import model
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import model_config_pb2 as mc

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float32]

VERSION = "1"


def bare_model_config() -> mc.ModelConfig:
    """mlp64's Triton ModelConfig (max batch 256; batching is reported, not done)."""
    config = mc.ModelConfig(name=model.NAME, backend="numpy", max_batch_size=model.MAX_BATCH_SIZE)
    config.input.add(name=model.INPUT_NAME, data_type=mc.TYPE_FP32, dims=[model.WIDTH])
    config.output.add(name=model.OUTPUT_NAME, data_type=mc.TYPE_FP32, dims=[model.WIDTH])
    return config


class BareServicer(pb_grpc.GRPCInferenceServiceServicer):
    """One request, one matmul: the Open Inference Protocol with nothing in between.

    Args:
        onnx: run this ONNX file (batchwire's mlp64 export) with ONNX Runtime, as batchwire
            does (1 intra-op thread), instead of the numpy matmul: the `bare-ort` baseline,
            which holds the engine constant so that a ratio to it is serving overhead only.
    """

    def __init__(self, onnx: str | None = None) -> None:
        self._weights = model.mlp64_weights(seed=0)
        self._forward: Callable[[Array, Array], Array] = model.mlp64_forward
        if onnx is not None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = options.inter_op_num_threads = 1
            session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
            feed = session.get_inputs()[0].name
            fetch = [session.get_outputs()[0].name]
            self._forward = lambda x, _: np.asarray(session.run(fetch, {feed: x})[0], np.float32)
        self._config = pb.ModelConfigResponse(config=bare_model_config())
        shape = [-1, model.WIDTH]
        self._metadata = pb.ModelMetadataResponse(name=model.NAME, versions=[VERSION])
        self._metadata.inputs.add(name=model.INPUT_NAME, datatype="FP32", shape=shape)
        self._metadata.outputs.add(name=model.OUTPUT_NAME, datatype="FP32", shape=shape)

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == model.NAME)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="bare-grpc", version="0")

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelMetadataResponse:
        await self._check_model(request.name, context)
        return self._metadata

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelConfigResponse:
        await self._check_model(request.name, context)
        return self._config

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        await self._check_model(request.model_name, context)
        if len(request.inputs) != 1 or len(request.raw_input_contents) != 1:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "expected one input INPUT in raw_input_contents"
            )
        x = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
        if x.size % model.WIDTH:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"INPUT must be [-1, {model.WIDTH}] FP32"
            )
        y = self._forward(x.reshape(-1, model.WIDTH), self._weights)
        response = pb.ModelInferResponse(
            model_name=model.NAME, model_version=VERSION, id=request.id
        )
        response.outputs.add(name=model.OUTPUT_NAME, datatype="FP32", shape=y.shape)
        response.raw_output_contents.append(y.astype("<f4", copy=False).tobytes())
        return response

    @staticmethod
    async def _check_model(name: str, context: grpc.aio.ServicerContext[object, object]) -> None:
        if name != model.NAME:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {name!r}")


async def serve(host: str, port: int, onnx: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop with a short grace."""
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(BareServicer(onnx), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bare serving on {host}:{bound} models: {model.NAME}/{VERSION}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(grace=2.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--onnx", help="run this ONNX model with ONNX Runtime (default: numpy)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(serve(args.host, args.port, args.onnx))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
