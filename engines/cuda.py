"""`CudaTorchScriptEngine`: a TorchScript module on a CUDA GPU, one CUDA graph per bucket size."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import torch

from batchwire.datatypes import numpy_dtype
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import TensorSpec

logger = logging.getLogger(__name__)

#: Runs per bucket before capture: PyTorch's CUDA-graph docs ask for warm-up iterations on
#: a side stream, and TorchScript's profiling executor settles its optimised graph by then.
WARMUP_RUNS: Final = 3

#: v2 datatypes that run in FP16 when the engine's precision is fp16.
FLOAT_DATATYPES: Final = frozenset({"FP16", "FP32", "FP64"})


# ------------------------------------------------------------------------------ pure helpers
def default_bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Powers of two up to `max_batch_size`, plus `max_batch_size` itself (48 -> 1..32, 48)."""
    if max_batch_size < 1:
        raise ValueError("bucket sizes need a batch axis (max_batch_size >= 1)")
    sizes = {1 << i for i in range(max_batch_size.bit_length()) if 1 << i <= max_batch_size}
    return tuple(sorted(sizes | {max_batch_size}))


def normalize_bucket_sizes(
    configured: Sequence[int] | None, max_batch_size: int
) -> tuple[int, ...]:
    """Sorted, unique bucket sizes that always include `max_batch_size` (so every batch fits).

    Args:
        configured: `gpu.bucket_sizes`; None or empty = `default_bucket_sizes`.
        max_batch_size: the model's largest batch.

    Raises:
        ValueError: a size outside 1..max_batch_size.
    """
    if not configured:
        return default_bucket_sizes(max_batch_size)
    for size in configured:
        if not 1 <= size <= max_batch_size:
            raise ValueError(f"bucket size {size} outside 1..max_batch_size ({max_batch_size})")
    return tuple(sorted({*configured, max_batch_size}))


def next_bucket(bucket_sizes: Sequence[int], batch_size: int) -> int | None:
    """The smallest bucket >= `batch_size` (`bucket_sizes` sorted), or None if none is."""
    i = bisect.bisect_left(bucket_sizes, batch_size)
    return bucket_sizes[i] if i < len(bucket_sizes) else None


# ------------------------------------------------------------------------------------ engine
@dataclass(slots=True)
class _Bucket:
    """Static tensors (and the graph that reads and writes them) of one batch size."""

    size: int
    inputs: list[torch.Tensor]  # on the GPU, in declared input order
    host_inputs: list[torch.Tensor]  # pinned staging
    host_input_arrays: list[np.ndarray]  # numpy views of `host_inputs`
    outputs: list[torch.Tensor]  # on the GPU, written by the graph (or the eager run)
    host_outputs: list[torch.Tensor]  # pinned staging
    graph: torch.cuda.CUDAGraph | None = None


class CudaTorchScriptEngine:
    """A TorchScript module on a CUDA device, replaying one captured CUDA graph per bucket.

    Each bucket batch size gets static input and output tensors on the device and a CUDA
    graph captured over them, so a batch costs one graph launch instead of one launch per
    kernel (the win on small models, where launch overhead dominates). Batches must have
    exactly a bucket's size: the batcher pads to `bucket_sizes` and `split_outputs` drops
    the padding rows. Inputs go through pinned staging buffers, one per bucket.

    The module takes the declared inputs positionally and returns a tensor or a tuple of
    tensors in declared output order. With precision "fp16" the module is `.half()`-ed
    and floating-point inputs are cast to FP16; outputs come back in declared datatypes.

    Args:
        path: the `.pt` file saved by `torch.jit.save`.
        inputs: declared inputs (fixed dims only: a graph has static shapes).
        outputs: declared outputs, in the order the module returns them.
        max_batch_size: largest batch, >= 1.
        precision: "fp32" or "fp16".
        bucket_sizes: batch sizes to capture (None = `default_bucket_sizes`);
            `max_batch_size` is always added.
        device: a CUDA device ("cuda", "cuda:1").
        cuda_graphs: False runs the module eagerly on the same static buffers (for
            comparison and debugging).

    Raises:
        InferenceError: UNAVAILABLE without CUDA; UNSUPPORTED for variable dims, BYTES
            tensors or no batch axis; INTERNAL when the file does not load or a graph
            cannot be captured (e.g. the model synchronises with the host).
    """

    def __init__(
        self,
        path: Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        max_batch_size: int,
        *,
        precision: str = "fp32",
        bucket_sizes: Sequence[int] | None = None,
        device: str = "cuda",
        cuda_graphs: bool = True,
    ) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self.max_batch_size = max_batch_size
        self.path = Path(path)
        self.precision = precision
        if precision not in ("fp32", "fp16"):
            raise InferenceError(ErrorCode.UNSUPPORTED, f"precision '{precision}'")
        if max_batch_size < 1:
            raise InferenceError(ErrorCode.UNSUPPORTED, "CUDA graphs need max_batch_size >= 1")
        for spec in (*inputs, *outputs):
            if spec.datatype == "BYTES" or any(d < 0 for d in spec.dims):
                raise InferenceError(
                    ErrorCode.UNSUPPORTED,
                    f"'{spec.name}' ({spec.datatype} {list(spec.dims)}): CUDA graphs need "
                    "numeric tensors with fixed dims",
                )
        if not torch.cuda.is_available():
            raise InferenceError(ErrorCode.UNAVAILABLE, f"device '{device}': CUDA is not available")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise InferenceError(ErrorCode.UNSUPPORTED, f"device '{device}' is not a CUDA device")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        try:
            self.bucket_sizes = normalize_bucket_sizes(bucket_sizes, max_batch_size)
        except ValueError as exc:
            raise InferenceError(ErrorCode.UNSUPPORTED, str(exc)) from exc
        self.cuda_graphs = cuda_graphs
        self._module = self._load(precision)
        self._input_dtypes = [self._device_dtype(spec) for spec in inputs]
        self._output_dtypes = [numpy_dtype(spec.datatype) for spec in outputs]
        self._stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        self._buckets = {size: self._make_bucket(size) for size in self.bucket_sizes}
        if cuda_graphs:
            self._capture()
        logger.debug(
            "loaded %s on %s (%s, buckets %s, graphs %s)",
            self.path, self.device, precision, self.bucket_sizes, cuda_graphs,
        )  # fmt: skip

    def _load(self, precision: str) -> torch.jit.ScriptModule:
        from engines.torchscript import load_torchscript

        module = load_torchscript(self.path, self.device)
        return module.half() if precision == "fp16" else module

    def _device_dtype(self, spec: TensorSpec) -> torch.dtype:
        if self.precision == "fp16" and spec.datatype in FLOAT_DATATYPES:
            return torch.float16
        return torch.from_numpy(np.empty(0, dtype=numpy_dtype(spec.datatype))).dtype

    def _make_bucket(self, size: int) -> _Bucket:
        inputs, host_inputs = [], []
        for spec, dtype in zip(self.inputs, self._input_dtypes, strict=True):
            shape = (size, *spec.dims)
            inputs.append(torch.zeros(shape, dtype=dtype, device=self.device))
            host_inputs.append(torch.zeros(shape, dtype=dtype, pin_memory=True))
        return _Bucket(
            size=size,
            inputs=inputs,
            host_inputs=host_inputs,
            host_input_arrays=[t.numpy() for t in host_inputs],
            outputs=[],
            host_outputs=[],
        )

    def _run(self, bucket: _Bucket) -> list[torch.Tensor]:
        result = self._module(*bucket.inputs)
        results = [result] if isinstance(result, torch.Tensor) else list(result)
        if len(results) != len(self.outputs):
            raise InferenceError(
                ErrorCode.INTERNAL,
                f"{self.path} returned {len(results)} outputs, declared {len(self.outputs)}",
            )
        return results

    def _capture(self) -> None:
        """Warm up every bucket on a side stream, then capture one graph per bucket.

        NOTE: captured largest first into one shared memory pool: a smaller graph reuses
        the larger one's freed blocks, and graphs never run concurrently (an instance is
        thread-confined and every `infer` synchronises before returning).
        """
        try:
            with torch.no_grad():
                side = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for bucket in self._buckets.values():
                        for _ in range(WARMUP_RUNS):
                            self._run(bucket)
                torch.cuda.current_stream(self.device).wait_stream(side)
                pool = None
                for size in sorted(self._buckets, reverse=True):
                    bucket = self._buckets[size]
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        bucket.outputs = self._run(bucket)
                    bucket.graph = graph
                    bucket.host_outputs = [
                        torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in bucket.outputs
                    ]
                    pool = graph.pool()
            torch.cuda.synchronize(self.device)
        except InferenceError:
            raise
        except Exception as exc:
            raise InferenceError(
                ErrorCode.INTERNAL,
                f"{self.path}: CUDA graph capture failed ({exc}); models that synchronise "
                "with the host (.item(), data-dependent shapes) cannot be captured",
            ) from exc

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch whose size is one of `bucket_sizes`; return every declared output.

        Raises:
            InferenceError: INVALID_INPUT when a declared input is missing or its per-sample
                shape differs from the declared dims; INTERNAL when the batch size is not
                a bucket size (the batcher pads to one) or CUDA fails.
        """
        try:
            arrays = [inputs[spec.name] for spec in self.inputs]
        except KeyError as exc:
            raise InferenceError(ErrorCode.INVALID_INPUT, f"missing input {exc}") from exc
        size = int(arrays[0].shape[0]) if arrays and arrays[0].ndim else 0
        bucket = self._buckets.get(size)
        if bucket is None:
            raise InferenceError(
                ErrorCode.INTERNAL,
                f"batch of {size} samples is not one of the engine's bucket sizes "
                f"{list(self.bucket_sizes)} (the batcher pads batches up to one)",
            )
        for spec, array in zip(self.inputs, arrays, strict=True):
            if array.shape[1:] != tuple(spec.dims) or array.shape[0] != size:
                raise InferenceError(
                    ErrorCode.INVALID_INPUT,
                    f"input '{spec.name}' has shape {list(array.shape)}; expected "
                    f"[{size}, {', '.join(map(str, spec.dims))}]",
                )
        try:
            with torch.no_grad(), torch.cuda.stream(self._stream):
                for host, array in zip(bucket.host_input_arrays, arrays, strict=True):
                    np.copyto(host, array, casting="same_kind")  # FP32 -> FP16 when fp16
                for static, staged in zip(bucket.inputs, bucket.host_inputs, strict=True):
                    static.copy_(staged, non_blocking=True)
                if bucket.graph is not None:
                    bucket.graph.replay()
                    results = bucket.outputs
                else:
                    results = self._run(bucket)
                    if not bucket.host_outputs:
                        bucket.host_outputs = [
                            torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in results
                        ]
                for host_out, result in zip(bucket.host_outputs, results, strict=True):
                    host_out.copy_(result, non_blocking=True)
                self._stream.synchronize()
        except InferenceError:
            raise
        except Exception as exc:
            raise InferenceError(ErrorCode.INTERNAL, f"CUDA TorchScript failed: {exc}") from exc
        # NOTE: copies: the pinned staging buffers are reused by the next batch.
        return {
            spec.name: host_out.numpy().astype(dtype, copy=True)
            for spec, dtype, host_out in zip(
                self.outputs, self._output_dtypes, bucket.host_outputs, strict=True
            )
        }

    def warmup(self) -> None:
        """Run every bucket once with zeros (graphs were captured at construction)."""
        for size in self.bucket_sizes:
            self.infer(
                {
                    spec.name: np.zeros((size, *spec.dims), dtype=numpy_dtype(spec.datatype))
                    for spec in self.inputs
                }
            )
