"""`batchwire build-engine`: build, validate and cache a TensorRT plan from a version's ONNX."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

from batchwire.config import ModelConfig, load_model_config, version_dirs
from batchwire.datatypes import numpy_dtype
from batchwire.types import TensorSpec
from engines.loader import engine_input_specs
from engines.plan_cache import (
    PlanKey,
    atomic_write_bytes,
    find_plan,
    publish_plan,
    staging_path,
    timing_cache_path,
)
from engines.tensorrt import ProfileShape, plan_key_for, profile_of, trt_logger, trt_major

logger = logging.getLogger(__name__)

#: TensorRT's scratch memory limit for tactics during the build.
DEFAULT_WORKSPACE_BYTES: Final = 4 << 30
#: Largest relative error (max |plan - ONNX Runtime| / max |ONNX Runtime|) per precision.
RELATIVE_ERROR_BOUNDS: Final[dict[str, float]] = {"fp32": 1e-4, "fp16": 1e-2}
#: Largest fraction of differing elements of an integer/bool output per precision: such
#: outputs (argmax labels) may flip on near-ties under reduced precision; the float
#: outputs they derive from carry the accuracy check.
MISMATCH_FRACTION_BOUNDS: Final[dict[str, float]] = {"fp32": 0.01, "fp16": 0.05}
#: Seed of the validation inputs.
VALIDATION_SEED: Final = 0
#: Name of the model file the plan is built from.
ONNX_FILENAME: Final = "model.onnx"


class PlanValidationError(RuntimeError):
    """The plan's outputs differ from ONNX Runtime's by more than the precision allows."""


@dataclass(frozen=True, slots=True)
class PrecisionPlan:
    """How to build for a requested precision on this TensorRT and GPU.

    Attributes:
        fp16_flag: set `BuilderFlag.FP16` (TensorRT 10.x weak typing only).
        effective: the precision the plan computes in ("fp32"/"fp16"): picks the
            validation bound and goes into the sidecar.
        note: why the effective precision differs from the requested one, if it does.
    """

    fp16_flag: bool
    effective: str
    note: str | None = None


@dataclass(frozen=True, slots=True)
class BuildResult:
    """The outcome of building (or finding) one version's plan.

    Attributes:
        model: model name.
        version: version number.
        plan_path: the plan in the cache.
        key: what it was built for.
        built: False when an up-to-date plan was already cached.
        precision: the effective precision (see `PrecisionPlan`); "" when not built.
        build_time_s: TensorRT's build time (0 when not built).
        relative_errors: per output, the worst validation error (float outputs:
            relative error; integer outputs: fraction of differing elements).
    """

    model: str
    version: int
    plan_path: Path
    key: PlanKey
    built: bool
    precision: str = ""
    build_time_s: float = 0.0
    relative_errors: dict[str, float] = field(default_factory=dict)


class Runner(Protocol):
    """What validation runs: an engine's `infer` (the plan's and ONNX Runtime's)."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


# ------------------------------------------------------------------------------ pure helpers
def network_flags(trt: Any, major: int) -> int:
    """`create_network` flags: 0 on TensorRT >= 10 (always explicit batch; 11 is always
    strongly typed), the EXPLICIT_BATCH bit on older versions."""
    if major >= 10:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)


def choose_precision(
    requested: str,
    major: int,
    *,
    platform_has_fast_fp16: bool,
    model_has_reduced_precision: bool,
) -> PrecisionPlan:
    """Decide how to honour `requested` ("fp32"/"fp16").

    TensorRT 10.x (weakly typed): fp16 sets `BuilderFlag.FP16` where the GPU has fast
    FP16, else builds fp32 (logged). TensorRT 11.x removed the flag (networks are strongly
    typed): reduced precision comes only from the ONNX model's own types, so an FP32
    model asked for fp16 builds fp32 with a warning (convert it first, e.g. with NVIDIA
    ModelOpt AutoCast) rather than failing the build. A model that already carries FP16
    types computes in them whatever is asked.

    Args:
        requested: the precision asked for.
        major: TensorRT's major version.
        platform_has_fast_fp16: `Builder.platform_has_fast_fp16` (ignored on 11.x).
        model_has_reduced_precision: see `onnx_has_reduced_precision`.
    """
    if requested not in RELATIVE_ERROR_BOUNDS:
        raise ValueError(f"precision must be fp32 or fp16, not {requested!r}")
    if requested == "fp32":
        if model_has_reduced_precision:
            return PrecisionPlan(
                False, "fp16", "model.onnx carries FP16 types, which TensorRT keeps: fp16"
            )
        return PrecisionPlan(False, "fp32")
    if major >= 11:
        if model_has_reduced_precision:
            return PrecisionPlan(False, "fp16")
        return PrecisionPlan(
            False,
            "fp32",
            f"TensorRT {major} builds strongly typed networks (no FP16 flag) and model.onnx "
            "is FP32, so the plan is fp32; convert the ONNX model to FP16 first (e.g. NVIDIA "
            "ModelOpt AutoCast) for an fp16 plan",
        )
    if not platform_has_fast_fp16:
        return PrecisionPlan(False, "fp32", "this GPU has no fast FP16: the plan is fp32")
    return PrecisionPlan(True, "fp16")


def onnx_has_reduced_precision(model: Any) -> bool:
    """Whether an `onnx.ModelProto` computes in FP16/BF16 anywhere: an input, output,
    value or initializer of that type, or a Cast to it."""
    import onnx

    reduced = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    graph = model.graph
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.tensor_type.elem_type in reduced:
            return True
    if any(init.data_type in reduced for init in graph.initializer):
        return True
    for node in graph.node:
        if node.op_type == "Cast":
            for attr in node.attribute:
                if attr.name == "to" and attr.i in reduced:
                    return True
    return False


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: the worst error relative to the output's
    scale (inf for a shape mismatch or a NaN/inf where the reference is finite)."""
    if actual.shape != expected.shape:
        return float("inf")
    if expected.size == 0:
        return 0.0
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    if not np.isfinite(a).all() and np.isfinite(e).all():
        return float("inf")
    scale = max(float(np.max(np.abs(e))), np.finfo(np.float64).tiny)
    error = float(np.max(np.abs(a - e))) / scale
    return float("inf") if np.isnan(error) else error


def mismatch_fraction(actual: np.ndarray, expected: np.ndarray) -> float:
    """Fraction of elements that differ (1.0 for a shape mismatch)."""
    if actual.shape != expected.shape:
        return 1.0
    if expected.size == 0:
        return 0.0
    return float(np.mean(actual != expected))


def validation_batch_sizes(profile: Mapping[str, ProfileShape]) -> tuple[int, ...]:
    """Batch sizes to validate at: the profile's min, opt and max batch."""
    first = next(iter(profile.values()))
    return tuple(sorted({first.min[0], first.opt[0], first.max[0]}))


def validation_inputs(
    inputs: Sequence[TensorSpec],
    profile: Mapping[str, ProfileShape],
    batch_size: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Seeded inputs at `batch_size`, other dims at the profile's opt.

    Floats are uniform in [0, 1) (inside the domain of any sane model); integers and
    bools are ones (a valid token id and attention mask, so no all-masked rows).
    """
    arrays = {}
    for spec in inputs:
        shape = (batch_size, *profile[spec.name].opt[1:])
        dtype = numpy_dtype(spec.datatype)
        if dtype.kind == "f":
            arrays[spec.name] = rng.random(shape).astype(dtype)
        else:
            arrays[spec.name] = np.ones(shape, dtype=dtype)
    return arrays


def compare_outputs(
    plan: Runner,
    reference: Runner,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    profile: Mapping[str, ProfileShape],
    precision: str,
    *,
    seed: int = VALIDATION_SEED,
) -> dict[str, float]:
    """Run both engines on the same seeded inputs at `validation_batch_sizes`.

    Returns:
        Per output, the worst error over the batch sizes.

    Raises:
        PlanValidationError: an error above the precision's bound.
    """
    rng = np.random.default_rng(seed)
    worst = {spec.name: 0.0 for spec in outputs}
    for batch_size in validation_batch_sizes(profile):
        sample = validation_inputs(inputs, profile, batch_size, rng)
        got = plan.infer(sample)
        want = reference.infer(sample)
        for spec in outputs:
            if numpy_dtype(spec.datatype).kind == "f":
                error = relative_error(got[spec.name], want[spec.name])
                bound = RELATIVE_ERROR_BOUNDS[precision]
                what = "relative error"
            else:
                error = mismatch_fraction(got[spec.name], want[spec.name])
                bound = MISMATCH_FRACTION_BOUNDS[precision]
                what = "fraction of differing elements"
            worst[spec.name] = max(worst[spec.name], error)
            if not error <= bound:
                raise PlanValidationError(
                    f"output '{spec.name}' at batch {batch_size}: {what} {error:.3g} vs ONNX "
                    f"Runtime exceeds the {precision} bound {bound:g}"
                )
    return worst


# ------------------------------------------------------------------------------------ build
def load_timing_cache(builder_config: Any, path: Path) -> Any:
    """Create the builder's timing cache from `path` (empty when absent or unusable).

    A cache from another GPU or TensorRT version is refused by TensorRT
    (`ignore_mismatch=False`) and replaced with an empty one, with a log line.
    """
    data = path.read_bytes() if path.is_file() else b""
    cache = builder_config.create_timing_cache(data)
    if cache is None or not builder_config.set_timing_cache(cache, ignore_mismatch=False):
        if data:
            logger.warning("timing cache %s does not fit this GPU/TensorRT: starting afresh", path)
        cache = builder_config.create_timing_cache(b"")
        builder_config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def save_timing_cache(builder_config: Any, path: Path) -> None:
    """Write the builder's timing cache (now holding this build's timings) atomically."""
    cache = builder_config.get_timing_cache()
    if cache is not None:
        atomic_write_bytes(path, bytes(cache.serialize()))


def build_serialized_plan(
    trt: Any,
    onnx_path: Path,
    profile: Mapping[str, ProfileShape],
    requested: str,
    *,
    model_has_reduced_precision: bool,
    workspace_bytes: int,
    timing_cache: Path,
) -> tuple[bytes, PrecisionPlan]:
    """Parse `onnx_path` into an explicit-batch network and build a plan for `profile`.

    Args:
        trt: the `tensorrt` module.
        onnx_path: the model.
        profile: one optimisation profile (every input).
        requested: the precision asked for (see `choose_precision`).
        model_has_reduced_precision: the model carries FP16/BF16 types.
        workspace_bytes: TensorRT's workspace memory pool limit.
        timing_cache: loaded before and saved after the build.

    Returns:
        The serialised plan and the precision it was built with.

    Raises:
        RuntimeError: the parser or the builder failed (with TensorRT's messages).
    """
    major = trt_major(str(trt.__version__))
    builder = trt.Builder(trt_logger())
    choice = choose_precision(
        requested,
        major,
        # NOTE: TensorRT 11 removed `platform_has_fast_fp16` (strong typing); not read there.
        platform_has_fast_fp16=major < 11 and bool(builder.platform_has_fast_fp16),
        model_has_reduced_precision=model_has_reduced_precision,
    )
    if choice.note:
        logger.warning("%s: asked for %s: %s", onnx_path, requested, choice.note)
    network = builder.create_network(network_flags(trt, major))
    parser = trt.OnnxParser(network, trt_logger())
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    optimization_profile = builder.create_optimization_profile()
    for name, shape in profile.items():
        optimization_profile.set_shape(name, shape.min, shape.opt, shape.max)
    config.add_optimization_profile(optimization_profile)
    if choice.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    load_timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a plan from {onnx_path} (see its log)")
    save_timing_cache(config, timing_cache)
    return bytes(serialized), choice


def build_engine(
    model_repository: Path,
    model: str,
    *,
    precision: str | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    version: int | None = None,
    device: int = 0,
    force: bool = False,
    make_plan_runner: Callable[[Path, ModelConfig, tuple[TensorSpec, ...]], Runner] | None = None,
    make_reference: Callable[[Path, ModelConfig, tuple[TensorSpec, ...]], Runner] | None = None,
    gpu_name: str | None = None,
) -> list[BuildResult]:
    """Build, validate and cache the TensorRT plan of each served version of a model.

    For each version (the `versions_served` highest, or `version`): skip it when the cache
    already holds a plan for exactly this ONNX file, TensorRT, GPU, precision and profile
    (unless `force`); else parse `model.onnx`, build with one optimisation profile
    (`engines.tensorrt.select_profile`) and the persistent timing cache
    (`<version>/plans/timing.cache`), write the plan to a staging file, run it and ONNX
    Runtime on seeded inputs at the profile's min, opt and max batch, and publish it only
    if every output is within the precision's bound; otherwise delete it and raise.

    Args:
        model_repository: the repository root.
        model: model name (its folder).
        precision: "fp16" or "fp32"; None = the config's `gpu.precision` (fp16 without one).
        workspace_bytes: TensorRT's workspace memory pool limit.
        version: build only this version.
        device: CUDA device to build and validate on.
        force: rebuild even when a matching plan is cached.
        make_plan_runner, make_reference: engine factories for validation (plan path or
            ONNX path, config, inputs); default `TensorRTEngine` and `OrtEngine` (tests
            inject fakes).
        gpu_name: the GPU's identity in the key; default `current_gpu_name(device)`.

    Returns:
        One result per version, in version order.

    Raises:
        RuntimeError: TensorRT or CUDA is missing, or TensorRT fails to parse or build.
        PlanValidationError: the plan's outputs are off (the plan is deleted).
        FileNotFoundError: no such model, version or `model.onnx`.
        ValueError: the config has no usable profile (e.g. variable dims without
            `gpu.profile_dims`).
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError(
            f"TensorRT cannot be imported ({exc}): build engines on a GPU host with the "
            "`gpu` extra (pip install '.[gpu]') or in the image of Dockerfile.gpu"
        ) from exc
    if gpu_name is None:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("building a TensorRT plan needs a CUDA GPU; none is available")
        torch.cuda.set_device(device)
        from engines.tensorrt import current_gpu_name

        gpu_name = current_gpu_name(device)
    model_dir = Path(model_repository) / model
    config = load_model_config(model_dir)
    found = version_dirs(model_dir)
    if version is not None:
        if version not in found:
            raise FileNotFoundError(f"model '{model}' has no version {version} in {model_dir}")
        chosen = [version]
    else:
        chosen = sorted(found)[-config.versions_served :]
        if not chosen:
            raise FileNotFoundError(f"model '{model}' has no version in {model_dir}")
    requested = precision or (config.gpu.precision if config.gpu is not None else "fp16")
    return [
        _build_version(
            trt,
            config,
            number,
            found[number],
            requested=requested,
            workspace_bytes=workspace_bytes,
            force=force,
            gpu_name=gpu_name,
            make_plan_runner=make_plan_runner or _tensorrt_runner(device),
            make_reference=make_reference or _ort_runner,
        )
        for number in chosen
    ]


def _build_version(
    trt: Any,
    config: ModelConfig,
    number: int,
    version_dir: Path,
    *,
    requested: str,
    workspace_bytes: int,
    force: bool,
    gpu_name: str,
    make_plan_runner: Callable[[Path, ModelConfig, tuple[TensorSpec, ...]], Runner],
    make_reference: Callable[[Path, ModelConfig, tuple[TensorSpec, ...]], Runner],
) -> BuildResult:
    onnx_path = version_dir / ONNX_FILENAME
    if not onnx_path.is_file():
        raise FileNotFoundError(f"{onnx_path} not found: TensorRT plans are built from ONNX")
    inputs = engine_input_specs(config)
    outputs = tuple(t.spec() for t in config.outputs)
    profile = profile_of(config, inputs)
    key = plan_key_for(
        onnx_path,
        profile,
        precision=requested,
        trt_version=str(trt.__version__),
        gpu_name=gpu_name,
    )
    cached = find_plan(version_dir, key)
    if cached is not None and not force:
        logger.info("%s/%d: plan %s is up to date", config.name, number, cached)
        return BuildResult(config.name, number, cached, key, built=False)
    import onnx

    logger.info(
        "%s/%d: building a TensorRT %s plan (%s asked) for %s, profile %s",
        config.name, number, key.trt_version, requested, gpu_name,
        {name: [list(p.min), list(p.opt), list(p.max)] for name, p in profile.items()},
    )  # fmt: skip
    start_ns = time.monotonic_ns()
    plan_bytes, choice = build_serialized_plan(
        trt,
        onnx_path,
        profile,
        requested,
        model_has_reduced_precision=onnx_has_reduced_precision(
            onnx.load(str(onnx_path), load_external_data=False)
        ),
        workspace_bytes=workspace_bytes,
        timing_cache=timing_cache_path(version_dir),
    )
    build_time_s = (time.monotonic_ns() - start_ns) / 1e9
    staged = staging_path(version_dir)
    try:
        atomic_write_bytes(staged, plan_bytes)
        errors = compare_outputs(
            make_plan_runner(staged, config, inputs),
            make_reference(onnx_path, config, inputs),
            inputs,
            outputs,
            profile,
            choice.effective,
        )
        final = publish_plan(
            version_dir,
            key,
            staged,
            {
                "effective_precision": choice.effective,
                "precision_note": choice.note,
                "build_time_s": round(build_time_s, 3),
                "validation_errors": errors,
                "plan_size_bytes": len(plan_bytes),
            },
        )
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    logger.info("%s/%d: plan %s built in %.1f s, validated %s", config.name, number, final,
                build_time_s, errors)  # fmt: skip
    return BuildResult(
        config.name, number, final, key, True, choice.effective, build_time_s, errors
    )


def _tensorrt_runner(
    device: int,
) -> Callable[[Path, ModelConfig, tuple[TensorSpec, ...]], Runner]:
    def make(path: Path, config: ModelConfig, inputs: tuple[TensorSpec, ...]) -> Runner:
        from engines.tensorrt import TensorRTEngine

        outputs = tuple(t.spec() for t in config.outputs)
        return TensorRTEngine(path, inputs, outputs, config.max_batch_size, device=device)

    return make


def _ort_runner(path: Path, config: ModelConfig, inputs: tuple[TensorSpec, ...]) -> Runner:
    from engines.ort import OrtEngine

    outputs = tuple(t.spec() for t in config.outputs)
    return OrtEngine(path, inputs, outputs, config.max_batch_size)


def tensorrt_models(model_repository: Path) -> list[str]:
    """Models of a repository whose config asks for the TensorRT GPU engine, sorted."""
    names = []
    for model_dir in sorted(Path(model_repository).iterdir()):
        if not (model_dir / "config.yaml").is_file():
            continue
        config = load_model_config(model_dir)
        if config.gpu is not None and config.gpu.engine == "tensorrt":
            names.append(model_dir.name)
    return names
