"""Serve mlp64 with PyTriton (Triton Inference Server's dynamic batcher, CPU).

    LD_LIBRARY_PATH=<this Python's LIBDIR> loadtests/peers/.venv-pytriton/bin/python \\
        -m loadtests.peers.pytriton_peer --grpc-port P --http-port P2 --metrics-port P3

Run from the repository root in `loadtests/peers/.venv-pytriton` (`setup.sh`). Triton's Python
backend stub loads the running Python's own libpython, hence `LD_LIBRARY_PATH` (`launch.py`
sets it). Every endpoint is unrestricted (`TritonSecurityConfig(restricted_endpoints=[])`):
by default PyTriton guards `statistics` with a token, and perf_analyzer calls it.
SIGTERM stops Triton and its proxy backend cleanly (PyTriton itself handles only SIGINT).
"""

from __future__ import annotations

import argparse
import logging
import signal
from types import FrameType
from typing import Any

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

from loadtests.peers import model

logger = logging.getLogger(__name__)


def triton_model_config() -> ModelConfig:
    """mlp64's batching, comparable to batchwire's: max batch 256, 100 µs queue delay."""
    return ModelConfig(
        max_batch_size=model.MAX_BATCH_SIZE,
        batcher=DynamicBatcher(max_queue_delay_microseconds=model.MAX_QUEUE_DELAY_US),
    )


def triton_config(grpc_port: int, http_port: int, metrics_port: int) -> TritonConfig:
    """Every Triton endpoint on 127.0.0.1 only."""
    return TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        http_address="127.0.0.1",
        http_port=http_port,
        metrics_address="127.0.0.1",
        metrics_port=metrics_port,
    )


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    weights = model.mlp64_weights(seed=0)

    @batch  # type: ignore[untyped-decorator]
    def infer(**inputs: np.ndarray) -> dict[str, Any]:
        x = inputs[model.INPUT_NAME].astype(np.float32, copy=False)
        return {model.OUTPUT_NAME: model.mlp64_forward(x, weights)}

    # NOTE: serve() turns KeyboardInterrupt into a clean stop; SIGTERM gets the same path.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    with Triton(
        config=triton_config(args.grpc_port, args.http_port, args.metrics_port),
        security_config=TritonSecurityConfig(restricted_endpoints=[]),
    ) as triton:
        triton.bind(
            model_name=model.NAME,
            infer_func=infer,
            inputs=[Tensor(name=model.INPUT_NAME, dtype=np.float32, shape=(model.WIDTH,))],
            outputs=[Tensor(name=model.OUTPUT_NAME, dtype=np.float32, shape=(model.WIDTH,))],
            config=triton_model_config(),
            strict=False,
        )
        triton.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
