"""`mlp64`: y = relu(x @ W), W 64x64 FP32 — a model so cheap it measures serving overhead."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from batchwire.config import (
    CpuLaneConfig,
    DynamicBatchingConfig,
    ModelConfig,
    SloConfig,
    TensorConfig,
)
from trainer.publish import file_sha256, next_version, publish_version, staging_dir

NAME = "mlp64"
WIDTH = 64
MAX_BATCH_SIZE = 256
#: A short delay: the model costs microseconds, so waiting long only adds latency.
MAX_QUEUE_DELAY_US = 100
MAX_QUEUE_SIZE = 4096
#: Requests up to this many samples run inline on the event loop (CPU lane): the matmul
#: takes microseconds, less than a hand-off to an engine thread would.
CPU_LANE_MAX_SAMPLES = 16


def mlp64_config() -> ModelConfig:
    """The serving config of mlp64 (input INPUT FP32 [-1, 64], output OUTPUT FP32 [-1, 64])."""
    return ModelConfig(
        name=NAME,
        backend="onnxruntime",
        max_batch_size=MAX_BATCH_SIZE,
        inputs=[TensorConfig(name="INPUT", datatype="FP32", dims=[WIDTH])],
        outputs=[TensorConfig(name="OUTPUT", datatype="FP32", dims=[WIDTH])],
        dynamic_batching=DynamicBatchingConfig(
            max_queue_delay_us=MAX_QUEUE_DELAY_US, max_queue_size=MAX_QUEUE_SIZE
        ),
        cpu_lane=CpuLaneConfig(max_samples=CPU_LANE_MAX_SAMPLES, instances=1, inline=True),
        # 99% of requests within this, server-side, on a 2-core host.
        slo=SloConfig(latency_threshold_ms=25.0),
    )


def mlp64_weights(seed: int = 0) -> np.ndarray:
    """The seeded 64x64 weight matrix (scaled so outputs stay O(1) for O(1) inputs)."""
    rng = np.random.default_rng(seed)
    weights: np.ndarray = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
    return weights / np.float32(np.sqrt(WIDTH))


def build_mlp64_onnx(weights: np.ndarray) -> onnx.ModelProto:
    """An ONNX graph MatMul + Relu with a dynamic batch axis."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["INPUT", "W"], ["xw"]),
            helper.make_node("Relu", ["xw"], ["OUTPUT"]),
        ],
        NAME,
        [helper.make_tensor_value_info("INPUT", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("OUTPUT", TensorProto.FLOAT, ["batch", WIDTH])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def create_mlp64(model_repository: Path, *, seed: int = 0) -> Path:
    """Publish a new mlp64 version (model.onnx + model_card.json) and its config.yaml.

    Returns:
        The new version folder.
    """
    model_dir = model_repository / NAME
    number = next_version(model_dir)
    weights = mlp64_weights(seed)
    with staging_dir(model_dir) as staging:
        onnx.save(build_mlp64_onnx(weights), staging / "model.onnx")
        card = {
            "name": NAME,
            "version": number,
            "description": "y = relu(x @ W), W 64x64 FP32 seeded normal / 8: a serving probe",
            "seed": seed,
            "onnx_sha256": file_sha256(staging / "model.onnx"),
            "parameter_count": int(weights.size),
        }
        (staging / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
        return publish_version(staging, model_dir, number, mlp64_config())
