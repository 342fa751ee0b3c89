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
    config: ModelConfig, version_dir: Path, *, intra_op_threads: int | None = None
) -> Engine:
    """Load the model file of `version_dir` with the engine of `config.backend`.

    Runtimes are imported here, on demand, so a server that serves only ONNX models never
    imports torch.

    Args:
        config: the model's validated configuration (backend, tensors, batch size).
        version_dir: `<model_repository>/<model>/<version>/`.
        intra_op_threads: overrides `config.intra_op_threads` when given.

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
    # With a tokenizer, the text input is the wrapper's; the model file takes token ids.
    inputs = tuple(
        t.spec() for t in config.inputs if tokenizer is None or t.name != tokenizer.text_input
    )
    outputs = tuple(t.spec() for t in config.outputs)
    logger.info(
        "loading %s version %s with %s (%d intra-op threads)",
        config.name, version_dir.name, config.backend, threads,
    )  # fmt: skip
    engine: Engine
    if config.backend == "torchscript":
        from engines.torchscript import TorchScriptEngine

        engine = TorchScriptEngine(
            path, inputs, outputs, config.max_batch_size, intra_op_threads=threads
        )
    else:
        from engines.ort import OrtEngine

        engine = OrtEngine(path, inputs, outputs, config.max_batch_size, intra_op_threads=threads)
    if tokenizer is not None:
        from engines.text import TokenizingEngine

        all_inputs = tuple(t.spec() for t in config.inputs)
        engine = TokenizingEngine(engine, all_inputs, tokenizer, version_dir)
    return engine


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
