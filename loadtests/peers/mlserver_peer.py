"""Serve mlp64 with Seldon MLServer 1.7.1 (adaptive batching, `parallel_workers: 0`).

    loadtests/peers/.venv-mlserver/bin/python -m loadtests.peers.mlserver_peer \\
        --grpc-port P --http-port P2 --metrics-port P3

Run from the repository root in `loadtests/peers/.venv-mlserver` (`setup.sh`). MLServer is
started programmatically, with one addition: Triton's `ModelConfig` RPC, which MLServer lacks
and perf_analyzer needs. It is registered as an extra generic handler on MLServer's own gRPC
server (a subclass of its `GRPCServer`; MLServer's servicer is untouched), answering with the
bytes of `model_config_wire`. Import no `tritonclient` and no batchwire stubs here: both
register the protobuf package `inference`, which MLServer's stubs already own.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
from typing import Any

import grpc
import numpy as np
from mlserver import MLModel, MLServer
from mlserver.codecs import NumpyCodec
from mlserver.grpc.server import GRPCServer
from mlserver.settings import ModelParameters, ModelSettings, Settings
from mlserver.types import InferenceRequest, InferenceResponse, MetadataTensor
from mlserver.utils import install_uvloop_event_loop

from loadtests.peers import model
from loadtests.peers.model_config_wire import model_config_response

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"


class Mlp64Model(MLModel):  # type: ignore[misc]
    """y = relu(x @ W) on the whole (adaptively batched) request."""

    async def load(self) -> bool:
        self._weights = model.mlp64_weights(seed=0)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        y = model.mlp64_forward(x.reshape(-1, model.WIDTH), self._weights)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output(model.OUTPUT_NAME, y)],
        )


class ModelConfigGRPCServer(GRPCServer):  # type: ignore[misc]
    """MLServer's gRPC server plus Triton's ModelConfig RPC for mlp64."""

    def _create_server(self) -> Any:
        server = super()._create_server()
        config = model_config_response(backend="mlserver")

        async def model_config(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            # NOTE: the request is left undecoded (no stubs here); there is one model.
            return config

        handler = grpc.unary_unary_rpc_method_handler(
            model_config,
            request_deserializer=lambda data: data,
            response_serializer=lambda data: data,
        )
        # MLServer's handler for the same service knows no "ModelConfig" and answers None,
        # so the server goes on to this one.
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"ModelConfig": handler}),)
        )
        return server


class PeerMLServer(MLServer):  # type: ignore[misc]
    """MLServer whose gRPC front door is `ModelConfigGRPCServer`."""

    def _create_servers(self) -> None:
        super()._create_servers()
        self._grpc_server = ModelConfigGRPCServer(
            self._settings, self._data_plane, self._model_repository_handlers
        )


def mlserver_settings(
    grpc_port: int, http_port: int, metrics_port: int, repository: str
) -> tuple[Settings, ModelSettings]:
    """Server settings (loopback, no parallel workers) and mlp64's adaptive batching."""
    settings = Settings(
        host="127.0.0.1",
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        parallel_workers=0,
        model_repository_root=repository,
        load_models_at_startup=False,
        debug=False,
    )
    shape = [-1, model.WIDTH]
    model_settings = ModelSettings(
        name=model.NAME,
        implementation=Mlp64Model,
        max_batch_size=model.MAX_BATCH_SIZE,
        max_batch_time=model.MAX_QUEUE_DELAY_US / 1e6,
        inputs=[MetadataTensor(name=model.INPUT_NAME, datatype="FP32", shape=shape)],
        outputs=[MetadataTensor(name=model.OUTPUT_NAME, datatype="FP32", shape=shape)],
        parameters=ModelParameters(version="1"),
    )
    return settings, model_settings


async def serve(grpc_port: int, http_port: int, metrics_port: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mlserver-peer-") as repository:
        settings, model_settings = mlserver_settings(grpc_port, http_port, metrics_port, repository)
        server = PeerMLServer(settings)
        # MLServer handles SIGTERM itself: stop() ends start().
        await server.start([model_settings])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    args = parser.parse_args(argv)
    # As `mlserver start` does (uvloop 0.21.0: MLServer 1.7.1 fails with newer ones).
    install_uvloop_event_loop()
    asyncio.run(serve(args.grpc_port, args.http_port, args.metrics_port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
