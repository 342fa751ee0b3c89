"""Build the `Engine` a model's `config.yaml` asks for from one of its version folders."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import numpy as np

from batchwire.config import ModelConfig
from batchwire.datatypes import numpy_dtype
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import TensorSpec
from engines.base import Engine

logger = logging.getLogger(__name__)

#: Backend -> name of the model file inside a version folder.
ENGINE_FILENAMES: Final[dict[str, str]] = {
    "onnxruntime": "model.onnx",
    "torchscript": "model.pt",
}


def load_engine(
    config: ModelConfig,
    version_dir: Path,
    *,
    intra_op_threads: int | None = None,
    gpu: bool = True,
) -> Engine:
    """Load the model file of `version_dir` with the GPU engine of `config.gpu` where
    CUDA is available, else with the CPU engine of `config.backend`.

    Runtimes are imported here, on demand, so a server that serves only ONNX models never
    imports torch. A GPU engine that cannot run here (no CUDA, no TensorRT, no plan built
    for this GPU and TensorRT) falls back to the CPU engine with a log line saying why.

    Args:
        config: the model's validated configuration (backend, tensors, batch size).
        version_dir: `<model_repository>/<model>/<version>/`.
        intra_op_threads: overrides `config.intra_op_threads` when given.
        gpu: False always loads the CPU engine (the CPU lane's instances).

    Returns:
        A ready engine (not yet warmed up).

    Raises:
        InferenceError: NOT_FOUND when the model file is missing; UNSUPPORTED for an unknown
            backend; INTERNAL when the file does not match the declared tensors.
    """
    filename = ENGINE_FILENAMES.get(config.backend)
    if filename is None:
        raise InferenceError(
            ErrorCode.UNSUPPORTED, f"model '{config.name}': unknown backend '{config.backend}'"
        )
    path = version_dir / filename
    if not path.is_file():
        raise InferenceError(
            ErrorCode.NOT_FOUND,
            f"model '{config.name}' version '{version_dir.name}': {filename} not found in "
            f"{version_dir} (backend {config.backend})",
        )
    threads = intra_op_threads if intra_op_threads is not None else config.intra_op_threads
    tokenizer = config.tokenizer
    inputs = engine_input_specs(config)
    outputs = tuple(t.spec() for t in config.outputs)
    gpu_engine = _load_gpu_engine(config, version_dir, inputs, outputs) if gpu else None
    engine: Engine
    if gpu_engine is not None:
        engine = gpu_engine
    else:
        logger.info(
            "loading %s version %s with %s (%d intra-op threads)",
            config.name, version_dir.name, config.backend, threads,
        )  # fmt: skip
        if config.backend == "torchscript":
            from engines.torchscript import TorchScriptEngine

            engine = TorchScriptEngine(
                path, inputs, outputs, config.max_batch_size, intra_op_threads=threads
            )
        else:
            from engines.ort import OrtEngine

            engine = OrtEngine(
                path, inputs, outputs, config.max_batch_size, intra_op_threads=threads
            )
    if tokenizer is not None:
        from engines.text import TokenizingEngine

        all_inputs = tuple(t.spec() for t in config.inputs)
        engine = TokenizingEngine(engine, all_inputs, tokenizer, version_dir)
    return engine


def engine_input_specs(config: ModelConfig) -> tuple[TensorSpec, ...]:
    """The inputs the model file takes: with a tokenizer, its text input is the wrapper's
    (`TokenizingEngine`), and the model file takes the token ids instead."""
    tokenizer = config.tokenizer
    return tuple(
        t.spec() for t in config.inputs if tokenizer is None or t.name != tokenizer.text_input
    )


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (imports torch: call only for GPU models)."""
    import torch

    return bool(torch.cuda.is_available())


def instance_count(config: ModelConfig) -> int:
    """Engine instances to load for the batched lane: `gpu.instances` where the GPU
    engine is meant to serve (CUDA available), else `instance_count`."""
    if config.gpu is not None and cuda_available():
        return config.gpu.instances
    return config.instance_count


def _load_gpu_engine(
    config: ModelConfig,
    version_dir: Path,
    inputs: tuple[TensorSpec, ...],
    outputs: tuple[TensorSpec, ...],
) -> Engine | None:
    """The engine of `config.gpu`, or None (logged) when it cannot run on this host."""
    gpu = config.gpu
    if gpu is None:
        return None
    where = f"model '{config.name}' version '{version_dir.name}'"
    fallback = f"serving on the CPU with {config.backend}"
    if not cuda_available():
        logger.info("%s: gpu.engine %s but CUDA is not available; %s", where, gpu.engine, fallback)
        return None
    filename = "model.pt" if gpu.engine == "torchscript_cuda" else "model.onnx"
    path = version_dir / filename
    if not path.is_file():
        raise InferenceError(
            ErrorCode.NOT_FOUND, f"{where}: {filename} not found in {version_dir} ({gpu.engine})"
        )
    if gpu.engine == "torchscript_cuda":
        from engines.cuda import CudaTorchScriptEngine

        logger.info(
            "loading %s version %s with torchscript_cuda (%s, CUDA graphs)",
            config.name, version_dir.name, gpu.precision,
        )  # fmt: skip
        return CudaTorchScriptEngine(
            path,
            inputs,
            outputs,
            config.max_batch_size,
            precision=gpu.precision,
            bucket_sizes=gpu.bucket_sizes,
        )
    from engines import tensorrt
    from engines.plan_cache import find_plan, plans_dir

    try:
        trt_version = tensorrt.tensorrt_version()
    except ImportError as exc:
        logger.warning("%s: gpu.engine tensorrt but TensorRT cannot be imported (%s); %s",
                       where, exc, fallback)  # fmt: skip
        return None
    key = tensorrt.plan_key_for(
        path,
        tensorrt.profile_of(config, inputs),
        precision=gpu.precision,
        trt_version=trt_version,
        gpu_name=tensorrt.current_gpu_name(0),
    )
    plan = find_plan(version_dir, key)
    if plan is None:
        logger.warning(
            "%s: no TensorRT plan in %s for this model, TensorRT %s, %s and %s; %s "
            "(build it with `batchwire build-engine %s`)",
            where, plans_dir(version_dir), trt_version, key.gpu_name, gpu.precision, fallback,
            config.name,
        )  # fmt: skip
        return None
    logger.info("loading %s version %s with TensorRT plan %s", config.name, version_dir.name, plan)
    return tensorrt.TensorRTEngine(plan, inputs, outputs, config.max_batch_size)


def zero_inputs(
    specs: tuple[TensorSpec, ...], max_batch_size: int, batch_size: int = 1
) -> dict[str, np.ndarray]:
    """Zero-filled inputs for a warm-up run: variable dims (-1) become 1.

    Args:
        specs: declared inputs.
        max_batch_size: the model's; when > 0 a batch axis of `batch_size` is prepended.
        batch_size: samples in the batch.

    Raises:
        InferenceError: UNSUPPORTED for a BYTES input (there is no neutral value to send).
    """
    arrays: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.datatype == "BYTES":
            raise InferenceError(ErrorCode.UNSUPPORTED, f"cannot warm up BYTES input '{spec.name}'")
        dims = tuple(1 if d < 0 else d for d in spec.dims)
        shape = (batch_size, *dims) if max_batch_size > 0 else dims
        arrays[spec.name] = np.zeros(shape, dtype=numpy_dtype(spec.datatype))
    return arrays
