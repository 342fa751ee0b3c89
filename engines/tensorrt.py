"""`TensorRTEngine`: runs a TensorRT plan (TensorRT 10.x/11.x name-based I/O API) on a GPU.

TensorRT and torch are imported inside functions only: the pure helpers here (profile
selection, plan keys, dtype table, shape checks) load on hosts without either.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from batchwire.config import ModelConfig, ProfileDimsConfig
from batchwire.datatypes import DATATYPES
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import TensorSpec
from engines.plan_cache import PlanKey, file_sha256

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: TensorRT `DataType` member name -> numpy dtype (types with no numpy equivalent, such as
#: BF16, FP8, INT4 and FP4, are absent: such an engine I/O tensor is refused).
TRT_NUMPY_DTYPES: Final[dict[str, np.dtype]] = {
    "FLOAT": np.dtype(np.float32),
    "HALF": np.dtype(np.float16),
    "INT8": np.dtype(np.int8),
    "UINT8": np.dtype(np.uint8),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "BOOL": np.dtype(np.bool_),
}

#: The only optimisation profile our plans have (see `select_profile`).
PROFILE_INDEX: Final = 0


@dataclass(frozen=True, slots=True)
class ProfileShape:
    """One input's optimisation-profile shapes (batch axis included)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class IOTensor:
    """One I/O tensor of a deserialised engine.

    Attributes:
        name: tensor name.
        is_input: True for inputs.
        dtype: numpy dtype of its data.
        shape: the engine's shape (-1 = dynamic).
        profile: the profile shapes (inputs only).
    """

    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]
    profile: ProfileShape | None = None


# ------------------------------------------------------------------------------ pure helpers
def trt_major(version: str) -> int:
    """Major version of a `tensorrt.__version__` string ("10.8.0.43" -> 10)."""
    return int(version.split(".", 1)[0])


def numpy_dtype_of(trt_dtype: Any) -> np.dtype:
    """numpy dtype of a TensorRT `DataType` (looked up by member name).

    Raises:
        InferenceError: UNSUPPORTED for a type with no numpy equivalent (BF16, FP8, ...).
    """
    name = str(getattr(trt_dtype, "name", trt_dtype))
    try:
        return TRT_NUMPY_DTYPES[name]
    except KeyError:
        raise InferenceError(
            ErrorCode.UNSUPPORTED, f"TensorRT data type {name} has no numpy equivalent"
        ) from None


def volume(shape: Iterable[int]) -> int:
    """Number of elements of a concrete shape (1 for a scalar)."""
    return math.prod(shape)


def select_profile(
    inputs: Sequence[TensorSpec],
    max_batch_size: int,
    preferred_batch_sizes: Sequence[int] = (),
    profile_dims: Mapping[str, ProfileDimsConfig] | None = None,
) -> dict[str, ProfileShape]:
    """The one optimisation profile a plan is built with.

    Batch axis: min 1, opt the largest preferred batch size (the size the batcher aims
    for, so the one TensorRT should tune for) or `max_batch_size` when none, max
    `max_batch_size`. Other dims: a fixed dim is itself in all three; variable (-1) dims
    take min/opt/max from `profile_dims[name]`.

    Args:
        inputs: the engine's inputs (dims exclude the batch axis).
        max_batch_size: largest batch, >= 1.
        preferred_batch_sizes: `dynamic_batching.preferred_batch_size`.
        profile_dims: `gpu.profile_dims` (one entry per input with variable dims).

    Returns:
        name -> shapes, in input order.

    Raises:
        ValueError: no batch axis, a variable input without `profile_dims`, or a
            `profile_dims` entry that contradicts the dims or is not min <= opt <= max.
    """
    if max_batch_size < 1:
        raise ValueError("a TensorRT profile needs a batch axis (max_batch_size >= 1)")
    opt_batch = max(preferred_batch_sizes, default=max_batch_size)
    if not 1 <= opt_batch <= max_batch_size:
        raise ValueError(f"preferred batch size {opt_batch} outside 1..{max_batch_size}")
    profile_dims = profile_dims or {}
    profile: dict[str, ProfileShape] = {}
    for spec in inputs:
        dims = tuple(spec.dims)
        entry = profile_dims.get(spec.name)
        if entry is None:
            if any(d < 0 for d in dims):
                raise ValueError(
                    f"input '{spec.name}' has variable dims {list(dims)}: set "
                    f"gpu.profile_dims.{spec.name} (min/opt/max of each dim) in config.yaml"
                )
            lo = opt = hi = dims
        else:
            lo, opt, hi = tuple(entry.min), tuple(entry.opt), tuple(entry.max)
            _check_profile_dims(spec.name, dims, lo, opt, hi)
        profile[spec.name] = ProfileShape((1, *lo), (opt_batch, *opt), (max_batch_size, *hi))
    return profile


def _check_profile_dims(
    name: str,
    dims: tuple[int, ...],
    lo: tuple[int, ...],
    opt: tuple[int, ...],
    hi: tuple[int, ...],
) -> None:
    where = f"gpu.profile_dims.{name}"
    for label, shape in (("min", lo), ("opt", opt), ("max", hi)):
        if len(shape) != len(dims):
            raise ValueError(f"{where}.{label} {list(shape)} has not the rank of dims {list(dims)}")
        for d, s in zip(dims, shape, strict=True):
            if s < 1 or (d >= 0 and s != d):
                raise ValueError(f"{where}.{label} {list(shape)} does not fit dims {list(dims)}")
    if not all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)):
        raise ValueError(f"{where}: need min <= opt <= max, got {list(lo)} {list(opt)} {list(hi)}")


def profile_of(config: ModelConfig, inputs: Sequence[TensorSpec]) -> dict[str, ProfileShape]:
    """`select_profile` with a model's batching policy and `gpu.profile_dims`."""
    preferred = config.dynamic_batching.preferred_batch_size if config.dynamic_batching else []
    dims = config.gpu.profile_dims if config.gpu is not None else None
    return select_profile(inputs, config.max_batch_size, preferred, dims)


def plan_key_for(
    onnx_path: Path,
    profile: Mapping[str, ProfileShape],
    *,
    precision: str,
    trt_version: str,
    gpu_name: str,
) -> PlanKey:
    """The cache key of a plan for this model file, profile, precision, TensorRT and GPU."""
    return PlanKey(
        onnx_sha256=file_sha256(onnx_path),
        trt_version=trt_version,
        gpu_name=gpu_name,
        precision=precision,
        profile=tuple((name, p.min, p.opt, p.max) for name, p in profile.items()),
    )


def check_shape_in_profile(name: str, shape: tuple[int, ...], profile: ProfileShape) -> None:
    """Raise INVALID_INPUT unless `shape` lies within the input's profile, dim by dim."""
    if len(shape) != len(profile.min) or not all(
        lo <= s <= hi for s, lo, hi in zip(shape, profile.min, profile.max, strict=True)
    ):
        raise InferenceError(
            ErrorCode.INVALID_INPUT,
            f"input '{name}' has shape {list(shape)}, outside the TensorRT engine's "
            f"optimisation profile (min {list(profile.min)}, max {list(profile.max)})",
        )


def describe_io(engine: Any, trt: Any) -> tuple[IOTensor, ...]:
    """The I/O tensors of a deserialised `ICudaEngine`, in the engine's order.

    Args:
        engine: the `tensorrt.ICudaEngine` (or a fake with the same methods).
        trt: the `tensorrt` module (for `TensorIOMode`).
    """
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        profile = None
        if is_input:
            lo, opt, hi = engine.get_tensor_profile_shape(name, PROFILE_INDEX)
            profile = ProfileShape(_dims(lo), _dims(opt), _dims(hi))
        tensors.append(
            IOTensor(
                name=name,
                is_input=is_input,
                dtype=numpy_dtype_of(engine.get_tensor_dtype(name)),
                shape=_dims(engine.get_tensor_shape(name)),
                profile=profile,
            )
        )
    return tuple(tensors)


def _dims(dims: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


def check_io(
    tensors: Sequence[IOTensor],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    where: str,
) -> None:
    """Compare the engine's I/O tensors with the declared ones (batch axis on every tensor).

    Inputs must match exactly; declared outputs must be a subset of the engine's.

    Raises:
        InferenceError: INTERNAL naming the tensor and what differs.
    """
    for kind, declared, is_input in (("input", inputs, True), ("output", outputs, False)):
        by_name = {t.name: t for t in tensors if t.is_input == is_input}
        names = [spec.name for spec in declared]
        missing = [name for name in names if name not in by_name]
        extra = sorted(set(by_name) - set(names)) if is_input else []
        if missing or extra:
            raise InferenceError(
                ErrorCode.INTERNAL,
                f"{where}: declared {kind}s {names} do not match the engine's "
                f"{list(by_name)} (missing {missing}, undeclared {extra})",
            )
        for spec in declared:
            tensor = by_name[spec.name]
            datatype = DATATYPES.get(tensor.dtype, str(tensor.dtype))
            if datatype != spec.datatype:
                raise InferenceError(
                    ErrorCode.INTERNAL,
                    f"{where}: {kind} '{spec.name}' is {datatype} in the engine but "
                    f"declared {spec.datatype}",
                )
            tail = tensor.shape[1:]
            if len(tensor.shape) != len(spec.dims) + 1 or any(
                e >= 0 and d >= 0 and e != d for e, d in zip(tail, spec.dims, strict=True)
            ):
                raise InferenceError(
                    ErrorCode.INTERNAL,
                    f"{where}: {kind} '{spec.name}' has shape {list(tensor.shape)} in the "
                    f"engine; declared dims {list(spec.dims)} plus a batch axis",
                )


def max_output_shapes(
    context: Any, profile: Mapping[str, ProfileShape], output_names: Iterable[str]
) -> dict[str, tuple[int, ...]]:
    """Output shapes at the profile's max input shapes (what output buffers are sized for).

    Args:
        context: an `IExecutionContext` (its input shapes are left at the max).
        profile: every input's profile.
        output_names: every output of the engine.

    Raises:
        InferenceError: INTERNAL when TensorRT refuses a max shape; UNSUPPORTED for an
            output whose shape depends on the data (still -1 with every input shape set).
    """
    for name, entry in profile.items():
        if not context.set_input_shape(name, entry.max):
            raise InferenceError(
                ErrorCode.INTERNAL, f"TensorRT refused input '{name}' at {list(entry.max)}"
            )
    shapes: dict[str, tuple[int, ...]] = {}
    for name in output_names:
        shape = _dims(context.get_tensor_shape(name))
        if any(d < 0 for d in shape):
            raise InferenceError(
                ErrorCode.UNSUPPORTED,
                f"output '{name}' has data-dependent shape {list(shape)}: not supported",
            )
        shapes[name] = shape
    return shapes


# ---------------------------------------------------------------------- TensorRT and CUDA
def tensorrt_version() -> str:
    """`tensorrt.__version__`.

    Raises:
        ImportError: TensorRT is not installed (or its libraries do not load).
    """
    import tensorrt as trt

    return str(trt.__version__)


def current_gpu_name(device: int = 0) -> str:
    """The device's name and compute capability, e.g. "NVIDIA H100 80GB HBM3 (sm_90)".

    The capability is part of the name because plans are compiled for it.
    """
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"


@functools.lru_cache(maxsize=1)
def trt_logger() -> Any:
    """The process's one `tensorrt.Logger` (warnings and errors only)."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


class _Plan:
    """A deserialised plan shared by every instance of one model version on one device.

    NOTE: the TensorRT bindings keep the runtime alive while an engine lives, and the
    engine while one of its execution contexts lives, so instances only hold this.
    """

    __slots__ = ("__weakref__", "engine", "runtime")

    def __init__(self, runtime: Any, engine: Any) -> None:
        self.runtime = runtime
        self.engine = engine


_PLANS: weakref.WeakValueDictionary[tuple[str, int], _Plan] = weakref.WeakValueDictionary()
_PLANS_LOCK = threading.Lock()


def _load_plan(plan_path: Path, device: int) -> _Plan:
    """Deserialise `plan_path` once per (file, device); instances share its weights."""
    import tensorrt as trt

    key = (str(Path(plan_path).resolve()), device)
    with _PLANS_LOCK:
        plan = _PLANS.get(key)
        if plan is not None:
            return plan
        runtime = trt.Runtime(trt_logger())
        engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if engine is None:
            raise InferenceError(
                ErrorCode.INTERNAL,
                f"TensorRT could not deserialise {plan_path} (built by another TensorRT "
                "version or for another GPU? rebuild it with `batchwire build-engine`)",
            )
        plan = _Plan(runtime, engine)
        _PLANS[key] = plan
        return plan


@dataclass(slots=True)
class _Buffer:
    """One I/O tensor's device buffer and pinned host staging buffer, sized for the max."""

    name: str
    dtype: np.dtype
    device: torch.Tensor  # flat, on the GPU
    host: torch.Tensor  # flat, pinned
    host_array: np.ndarray  # numpy view of `host`
    profile: ProfileShape | None


class TensorRTEngine:
    """A TensorRT plan, run from and to numpy arrays on one CUDA stream.

    One instance = one `IExecutionContext`, one CUDA stream, and buffers allocated once at
    the profile's max shapes: a device buffer per I/O tensor (torch tensors; their
    addresses are given to the context once, since they never move) and a pinned host
    staging buffer per tensor, reused by every batch. Instances of the same plan share
    one deserialised engine (weights live once on the GPU).

    TensorRT handles any batch size within the optimisation profile, so the batcher does
    not pad: `bucket_sizes` is empty.

    Args:
        plan_path: the serialised plan (see `engines.plan_cache`).
        inputs: declared inputs (dims exclude the batch axis).
        outputs: declared outputs; `infer` returns exactly these.
        max_batch_size: largest batch in samples (the profile's max batch).
        device: CUDA device index.

    Raises:
        InferenceError: UNAVAILABLE without CUDA; INTERNAL when the plan does not load or
            does not match the declared tensors; UNSUPPORTED for data-dependent output
            shapes or types with no numpy equivalent.
    """

    #: Batch sizes the batcher must pad to: none, TensorRT takes any size in the profile.
    bucket_sizes: tuple[int, ...] = ()

    def __init__(
        self,
        plan_path: Path,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        max_batch_size: int,
        *,
        device: int = 0,
    ) -> None:
        import tensorrt as trt
        import torch

        self.inputs = inputs
        self.outputs = outputs
        self.max_batch_size = max_batch_size
        self.path = Path(plan_path)
        if not torch.cuda.is_available():
            raise InferenceError(ErrorCode.UNAVAILABLE, "TensorRT engine: CUDA is not available")
        self._torch = torch
        self._device = torch.device("cuda", device)
        with torch.cuda.device(self._device):
            self._plan = _load_plan(self.path, device)
            engine = self._plan.engine
            tensors = describe_io(engine, trt)
            check_io(tensors, inputs, outputs, str(self.path))
            context = engine.create_execution_context()
            if context is None:
                raise InferenceError(
                    ErrorCode.INTERNAL, f"{self.path}: cannot create an execution context"
                )
            self._context = context
            self._stream = torch.cuda.Stream(self._device)  # type: ignore[no-untyped-call]
            profile = {t.name: t.profile for t in tensors if t.profile is not None}
            out_names = [t.name for t in tensors if not t.is_input]
            max_shapes = {name: p.max for name, p in profile.items()}
            max_shapes.update(max_output_shapes(context, profile, out_names))
            self._buffers = {t.name: self._allocate(t, max_shapes[t.name]) for t in tensors}
            for buffer in self._buffers.values():
                # NOTE: set once: the buffers never move, so every batch reuses the addresses.
                context.set_tensor_address(buffer.name, buffer.device.data_ptr())
        self._in = [self._buffers[spec.name] for spec in inputs]
        self._out_all = [self._buffers[name] for name in out_names]
        self._out_declared = [spec.name for spec in outputs]
        logger.debug("loaded TensorRT plan %s on %s", self.path, self._device)

    def _allocate(self, tensor: IOTensor, shape: tuple[int, ...]) -> _Buffer:
        torch = self._torch
        # torch's dtype for a numpy dtype, without a hand-written second table.
        dtype = torch.from_numpy(np.empty(0, dtype=tensor.dtype)).dtype
        n = max(volume(shape), 1)  # NOTE: never a null address, even for an empty tensor
        host = torch.empty(n, dtype=dtype, pin_memory=True)
        return _Buffer(
            name=tensor.name,
            dtype=tensor.dtype,
            device=torch.empty(n, dtype=dtype, device=self._device),
            host=host,
            host_array=host.numpy(),
            profile=tensor.profile,
        )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch and return every declared output (fresh arrays, batch kept).

        Raises:
            InferenceError: INVALID_INPUT for a missing input or a shape outside the
                profile; INTERNAL when TensorRT fails.
        """
        try:
            arrays = [(buffer, inputs[buffer.name]) for buffer in self._in]
        except KeyError as exc:
            raise InferenceError(ErrorCode.INVALID_INPUT, f"missing input {exc}") from exc
        for buffer, array in arrays:
            assert buffer.profile is not None
            check_shape_in_profile(buffer.name, array.shape, buffer.profile)
        torch = self._torch
        context = self._context
        try:
            with torch.cuda.device(self._device), torch.cuda.stream(self._stream):
                for buffer, array in arrays:
                    n = array.size
                    np.copyto(buffer.host_array[:n].reshape(array.shape), array)
                    buffer.device[:n].copy_(buffer.host[:n], non_blocking=True)
                    if not context.set_input_shape(buffer.name, array.shape):
                        raise InferenceError(
                            ErrorCode.INVALID_INPUT,
                            f"TensorRT refused input '{buffer.name}' of shape {list(array.shape)}",
                        )
                shapes = {b.name: _dims(context.get_tensor_shape(b.name)) for b in self._out_all}
                if not context.execute_async_v3(self._stream.cuda_stream):
                    raise InferenceError(ErrorCode.INTERNAL, "TensorRT execute_async_v3 failed")
                for buffer in self._out_all:
                    n = volume(shapes[buffer.name])
                    buffer.host[:n].copy_(buffer.device[:n], non_blocking=True)
                self._stream.synchronize()
        except InferenceError:
            raise
        except Exception as exc:
            raise InferenceError(ErrorCode.INTERNAL, f"TensorRT failed: {exc}") from exc
        # NOTE: copies, not views: the staging buffers are overwritten by the next batch
        # while this batch's responses may still be encoding on the event loop.
        return {
            name: self._buffers[name]
            .host_array[: volume(shapes[name])]
            .reshape(shapes[name])
            .copy()
            for name in self._out_declared
        }

    def warmup(self) -> None:
        """Run zeros at the profile's min and max shapes (TensorRT sets up lazily)."""
        for pick in ("min", "max"):
            sample = {}
            for buffer in self._in:
                assert buffer.profile is not None
                sample[buffer.name] = np.zeros(getattr(buffer.profile, pick), dtype=buffer.dtype)
            self.infer(sample)
