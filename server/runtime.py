"""The model runtime: repository + engines + batchers, with no knowledge of gRPC or Ray."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from batching.batcher import BatchObserver, DynamicBatcher
from batching.lane import CpuLane
from batching.policy import BatchPolicy
from batchwire.config import ModelConfig, load_model_config, version_dirs
from batchwire.datatypes import datatype_of
from batchwire.errors import ErrorCode, InferenceError
from batchwire.histogram import Histogram
from batchwire.types import InferRequest, InferResponse, RequestTiming, TensorSpec
from engines.base import Engine
from engines.loader import instance_count, load_engine

logger = logging.getLogger(__name__)

#: Modules of the engines that run on a GPU (the loader falls back to CPU engines).
GPU_ENGINE_MODULES = frozenset({"engines.tensorrt", "engines.cuda"})


@dataclass(slots=True)
class Duration:
    """A count and the total nanoseconds they took (Triton's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


@dataclass(slots=True)
class VersionStats:
    """Request-level outcomes of one model version (batch-level counts live in the batcher).

    Attributes:
        success: requests that succeeded, and their time inside the runtime.
        fail: requests that failed after validation started.
        last_inference_ms: wall-clock time of the last success (Triton's `last_inference`).
        lane_requests: successful requests by lane (`cpu`, `batched`).
        failures: failed requests by error code (ErrorCode value).
        rejected: requests rejected as invalid, by reason (`shape`, `datatype`...).
        latency_hist: time inside the runtime of successful requests.
    """

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    last_inference_ms: int = 0
    lane_requests: dict[str, int] = field(default_factory=lambda: {"cpu": 0, "batched": 0})
    failures: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    latency_hist: Histogram = field(default_factory=Histogram)

    def count_failure(self, exc: InferenceError) -> None:
        """Count one failed request by its code (and reason, when it was rejected)."""
        code = exc.code.value
        self.failures[code] = self.failures.get(code, 0) + 1
        if exc.code is ErrorCode.INVALID_INPUT:
            reason = exc.reason or "invalid"
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def count_success(self, lane: str, elapsed_ns: int) -> None:
        """Count one successful request: its lane and its time inside the runtime."""
        self.success.add(elapsed_ns)
        self.latency_hist.observe_ns(elapsed_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.lane_requests[lane] += 1

    def count_error(self, exc: BaseException, elapsed_ns: int) -> None:
        """Count one request that failed after validation (any exception)."""
        if isinstance(exc, InferenceError):
            self.count_failure(exc)
        self.fail.add(elapsed_ns)


class ModelObserver(BatchObserver, Protocol):
    """Monitoring of one model version: sees its batches and some of its CPU-lane requests.

    The lane decrements `lane_countdown` for each request it computes and calls `on_lane`
    when it reaches 0 or below (`on_lane` sets it again): an observer that needs one
    request in N costs the others a decrement, not a call.
    """

    lane_countdown: int
    """CPU-lane requests left until the next `on_lane` call (1: the next request)."""

    def on_lane(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        """Observe one request computed on the CPU lane and set `lane_countdown` (on the
        event loop: keep it cheap)."""


#: Builds the observer of a model version being loaded: (config, version, folder) -> observer.
ObserverFactory = Callable[[ModelConfig, int, Path], "ModelObserver | None"]


@dataclass(slots=True)
class ModelVersion:
    """One loaded version: its engine instances, its batcher and its statistics."""

    config: ModelConfig
    version: int
    path: Path
    batcher: DynamicBatcher
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    lane: CpuLane | None = None
    on_gpu: bool = False
    """The batched lane runs a GPU engine (TensorRT or CUDA TorchScript)."""
    stats: VersionStats = field(default_factory=VersionStats)
    observer: ModelObserver | None = None
    """Monitoring hooks (tracing, drift), or None."""

    async def close(self, *, drain: bool = True) -> None:
        """Stop the batcher (draining it when asked), then the CPU lane."""
        await self.batcher.close(drain=drain)
        if self.lane is not None:
            await asyncio.to_thread(self.lane.close)


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """A model in the repository and its state (Triton's RepositoryIndex entry)."""

    name: str
    version: str
    state: str
    reason: str = ""


class ModelRuntime:
    """Serves every model in a model repository.

    The front doors call `infer` with plain dataclasses; this class validates the request
    against the model's declared inputs, hands it to the version's dynamic batcher and
    returns the requested outputs.

    Args:
        repository: the model repository folder (`<model>/config.yaml`, `<model>/<version>/`).
        intra_op_threads: overrides every model's `intra_op_threads` when set.
        observer_factory: builds each loaded version's monitoring hooks (None = none).
        on_load: called with each model's config after it (re)loads; `on_unload` with its
            name after it unloads (monitoring keeps its per-model state in step).
    """

    def __init__(
        self,
        repository: Path,
        *,
        intra_op_threads: int | None = None,
        observer_factory: ObserverFactory | None = None,
        on_load: Callable[[ModelConfig], None] | None = None,
        on_unload: Callable[[str], None] | None = None,
    ) -> None:
        self.repository = repository
        self.intra_op_threads = intra_op_threads
        self.observer_factory = observer_factory
        self.on_load = on_load
        self.on_unload = on_unload
        self._models: dict[str, dict[int, ModelVersion]] = {}
        self._load_errors: dict[str, str] = {}
        self._lock = asyncio.Lock()

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Load every model found in the repository (a model that fails is logged, not fatal)."""
        for name in self.repository_models():
            try:
                await self.load(name)
            except InferenceError as exc:
                logger.error("model %s failed to load: %s", name, exc.message)

    async def close(self, *, drain: bool = True) -> None:
        """Stop every batcher; with `drain`, queued requests finish first."""
        async with self._lock:
            models, self._models = self._models, {}
        await asyncio.gather(
            *(
                v.batcher.close(drain=drain)
                for versions in models.values()
                for v in versions.values()
            )
        )

    def repository_models(self) -> list[str]:
        """Names of the model folders (those with a config.yaml) in the repository."""
        if not self.repository.is_dir():
            return []
        return sorted(p.parent.name for p in self.repository.glob("*/config.yaml"))

    async def load(self, name: str) -> None:
        """Load (or reload) a model from the repository; the old versions drain afterwards.

        Raises:
            InferenceError: NOT_FOUND when the repository has no such model or no version;
                INTERNAL when its config or engine fails to load.
        """
        model_dir = self.repository / name
        if not (model_dir / "config.yaml").is_file():
            raise InferenceError(ErrorCode.NOT_FOUND, f"model '{name}' is not in the repository")
        try:
            versions = await asyncio.to_thread(self._build_versions, model_dir)
        except InferenceError as exc:
            self._load_errors[name] = exc.message
            raise
        except Exception as exc:  # config or engine errors: report, keep serving others
            self._load_errors[name] = str(exc)
            raise InferenceError(
                ErrorCode.INTERNAL, f"model '{name}' failed to load: {exc}"
            ) from exc
        for v in versions.values():
            v.batcher.start()
        async with self._lock:
            old = self._models.get(name, {})
            self._models[name] = versions
            self._load_errors.pop(name, None)
        for v in old.values():
            await v.close(drain=True)
        if self.on_load is not None:
            self.on_load(next(iter(versions.values())).config)
        logger.info("loaded model %s versions %s", name, sorted(versions))

    async def unload(self, name: str) -> None:
        """Stop serving a model; its queued requests finish first.

        Raises:
            InferenceError: NOT_FOUND when the model is not loaded.
        """
        async with self._lock:
            versions = self._models.pop(name, None)
        if versions is None:
            raise InferenceError(ErrorCode.NOT_FOUND, f"model '{name}' is not loaded")
        for v in versions.values():
            await v.close(drain=True)
        if self.on_unload is not None:
            self.on_unload(name)
        logger.info("unloaded model %s", name)

    def _build_versions(self, model_dir: Path) -> dict[int, ModelVersion]:
        config = load_model_config(model_dir)
        if config.name != model_dir.name:
            raise InferenceError(
                ErrorCode.INTERNAL,
                f"config.yaml names the model '{config.name}' but its folder is '{model_dir.name}'",
            )
        found = version_dirs(model_dir)
        if not found:
            raise InferenceError(ErrorCode.NOT_FOUND, f"model '{config.name}' has no version")
        chosen = sorted(found)[-config.versions_served :]
        threads = self.intra_op_threads or config.intra_op_threads
        versions: dict[int, ModelVersion] = {}
        for number in chosen:
            engines: list[Engine] = [
                load_engine(config, found[number], intra_op_threads=threads)
                for _ in range(instance_count(config))
            ]
            for engine in engines:
                engine.warmup()
            observer = (
                self.observer_factory(config, number, found[number])
                if self.observer_factory is not None
                else None
            )
            batching = config.dynamic_batching
            policy = BatchPolicy.from_config(batching, config.max_batch_size)
            batcher = DynamicBatcher(
                engines,
                policy,
                max_queue_size=batching.max_queue_size if batching else 0,
                default_timeout_ns=batching.default_timeout_us * 1000 if batching else 0,
                name=f"{config.name}/{number}",
                pad_variable_dims=config.pad_variable_dims,
                observer=observer,
            )
            lane = None
            if config.cpu_lane is not None:
                lane_config = config.cpu_lane
                # The CPU lane runs CPU engines even where the batched lane has a GPU one.
                lane_engines = [
                    load_engine(config, found[number], intra_op_threads=threads, gpu=False)
                    for _ in range(1 if lane_config.inline else lane_config.instances)
                ]
                for engine in lane_engines:
                    engine.warmup()
                lane = CpuLane(
                    lane_engines,
                    max_samples=lane_config.max_samples,
                    inline=lane_config.inline,
                    name=f"{config.name}/{number}",
                )
            versions[number] = ModelVersion(
                config=config,
                version=number,
                path=found[number],
                batcher=batcher,
                inputs=tuple(t.spec() for t in config.inputs),
                outputs=tuple(t.spec() for t in config.outputs),
                lane=lane,
                on_gpu=type(engines[0]).__module__ in GPU_ENGINE_MODULES,
                observer=observer,
            )
        return versions

    # ----------------------------------------------------------------- queries
    def get(self, name: str, version: str = "") -> ModelVersion:
        """The loaded version `version` ("" = the latest loaded) of model `name`.

        Raises:
            InferenceError: NOT_FOUND for an unknown model or version.
        """
        versions = self._models.get(name)
        if versions is None:
            raise InferenceError(ErrorCode.NOT_FOUND, f"unknown model '{name}'")
        if not version:
            return versions[max(versions)]
        try:
            return versions[int(version)]
        except (ValueError, KeyError):
            loaded = ",".join(str(v) for v in sorted(versions))
            raise InferenceError(
                ErrorCode.NOT_FOUND,
                f"unknown version '{version}' of model '{name}' (loaded: {loaded})",
            ) from None

    def versions(self, name: str) -> list[int]:
        """Loaded version numbers of a model (empty if not loaded)."""
        return sorted(self._models.get(name, {}))

    def loaded(self) -> Iterable[ModelVersion]:
        """Every loaded model version."""
        for versions in self._models.values():
            yield from versions.values()

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether the model (version) is loaded and accepting requests."""
        try:
            return not self.get(name, version).batcher.closed
        except InferenceError:
            return False

    @property
    def ready(self) -> bool:
        """Every model found in the repository at start-up loaded."""
        return not self._load_errors

    def index(self) -> list[IndexEntry]:
        """Every model in the repository with its state, loaded or not."""
        entries: list[IndexEntry] = []
        for name in sorted(set(self.repository_models()) | set(self._models)):
            versions = self._models.get(name)
            if versions:
                entries.extend(IndexEntry(name, str(v), "READY") for v in sorted(versions))
            else:
                entries.append(
                    IndexEntry(name, "", "UNAVAILABLE", self._load_errors.get(name, "unloaded"))
                )
        return entries

    # ----------------------------------------------------------------- inference
    async def infer(self, name: str, version: str, request: InferRequest) -> InferResponse:
        """Validate a request, run it through the version's batcher, return its outputs.

        Raises:
            InferenceError: NOT_FOUND, INVALID_INPUT, QUEUE_FULL, DEADLINE_EXCEEDED,
                UNAVAILABLE or INTERNAL.
        """
        model = self.get(name, version)
        return await self.run(model, request, self.check(model, request))

    def check(self, model: ModelVersion, request: InferRequest) -> int:
        """Validate a request against a loaded version (`infer`'s first half, for front
        doors that time it separately); counts a rejection in the version's statistics.

        Returns:
            The request's size in samples.

        Raises:
            InferenceError: INVALID_INPUT naming the tensor and what was expected.
        """
        try:
            return validate(model, request)
        except InferenceError as exc:
            model.stats.count_failure(exc)
            model.stats.fail.add(0)
            raise

    async def run(
        self,
        model: ModelVersion,
        request: InferRequest,
        samples: int,
        *,
        trace: object | None = None,
        timing: RequestTiming | None = None,
    ) -> InferResponse:
        """Run a checked request on the CPU lane or through the batcher (`infer`'s second half).

        Args:
            model: the version `check` validated the request against.
            request: the request.
            samples: what `check` returned.
            trace: an opaque trace handle passed to the batcher (for batch span links).
            timing: filled in with queue and compute times, when given.

        Raises:
            InferenceError: QUEUE_FULL, DEADLINE_EXCEEDED, UNAVAILABLE or INTERNAL.
        """
        start_ns = time.monotonic_ns()
        lane = "batched"
        try:
            outputs = None
            if model.lane is not None and not model.batcher.closed:
                outputs = await model.lane.try_run(request.inputs, samples)
            if outputs is None:
                outputs = await model.batcher.submit(
                    request.inputs,
                    deadline_ns=request.deadline_ns,
                    priority=request.priority,
                    trace=trace,
                    timing=timing,
                )
            else:
                lane = "cpu"
                if timing is not None:
                    # NOTE: the lane ran inline or on its thread between these two points;
                    # the span covers the hand-off too (it is the lane's cost).
                    timing.compute_start_ns = start_ns
                    timing.compute_end_ns = time.monotonic_ns()
                    timing.batch_samples = samples
                    timing.batch_requests = 1
                observer = model.observer
                if observer is not None:
                    observer.lane_countdown -= 1
                    if observer.lane_countdown <= 0:
                        observer.on_lane(request.inputs, outputs)
        except BaseException as exc:
            model.stats.count_error(exc, time.monotonic_ns() - start_ns)
            raise
        model.stats.count_success(lane, time.monotonic_ns() - start_ns)
        if request.requested_outputs is not None:
            outputs = {k: outputs[k] for k in request.requested_outputs}
        return InferResponse(
            model_name=model.config.name,
            model_version=str(model.version),
            outputs=outputs,
            id=request.id,
            parameters={"batchwire_lane": lane},
        )


def _dims_text(dims: Iterable[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def validate(model: ModelVersion, request: InferRequest) -> int:
    """Check a request against the model's declared inputs and outputs (Triton-strict).

    Returns:
        The request's batch size in samples (1 when the model does not batch).

    Raises:
        InferenceError: INVALID_INPUT naming the tensor and what was expected.
    """
    config = model.config
    name = config.name
    inputs = request.inputs
    declared = {spec.name for spec in model.inputs}
    for given in inputs:
        if given not in declared:
            raise InferenceError(
                ErrorCode.INVALID_INPUT,
                f"unexpected input '{given}' for model '{name}'; expected {sorted(declared)}",
                reason="unexpected_input",
            )
    required = _required_inputs(model, inputs)
    batch_size: int | None = None
    batching = config.max_batch_size > 0
    for spec in model.inputs:
        array = inputs.get(spec.name)
        if array is None:
            if spec.name not in required:
                continue
            raise InferenceError(
                ErrorCode.INVALID_INPUT,
                f"missing input '{spec.name}' for model '{name}'; expected {sorted(required)}",
                reason="missing_input",
            )
        datatype = datatype_of(array)
        if datatype != spec.datatype:
            raise InferenceError(
                ErrorCode.INVALID_INPUT,
                f"input '{spec.name}': datatype {datatype} does not match the model's "
                f"{spec.datatype}",
                reason="datatype",
            )
        shape = array.shape
        expected = ((-1,) if batching else ()) + spec.dims
        if len(shape) != len(expected) or any(
            e != -1 and s != e for s, e in zip(shape, expected, strict=True)
        ):
            raise InferenceError(
                ErrorCode.INVALID_INPUT,
                f"input '{spec.name}': shape {_dims_text(shape)} does not match the model's "
                f"{_dims_text(expected)}",
                reason="shape",
            )
        if batching:
            n = shape[0]
            if n < 1 or n > config.max_batch_size:
                raise InferenceError(
                    ErrorCode.INVALID_INPUT,
                    f"input '{spec.name}': batch size {n} is outside 1..{config.max_batch_size} "
                    f"(max_batch_size of model '{name}')",
                    reason="batch_size",
                )
            if batch_size is None:
                batch_size = n
            elif n != batch_size:
                raise InferenceError(
                    ErrorCode.INVALID_INPUT,
                    f"input '{spec.name}': batch size {n} differs from the other inputs' "
                    f"{batch_size}",
                    reason="batch_size",
                )
    if request.requested_outputs is not None:
        known = {spec.name for spec in model.outputs}
        for out in request.requested_outputs:
            if out not in known:
                raise InferenceError(
                    ErrorCode.INVALID_INPUT,
                    f"unexpected output '{out}' for model '{name}'; expected {sorted(known)}",
                    reason="unexpected_output",
                )
    return batch_size if batch_size is not None else 1


def _required_inputs(model: ModelVersion, inputs: Mapping[str, object]) -> set[str]:
    """Inputs this request must carry: the non-optional ones, and for a model with a
    tokenizer either the text input alone or the token ids and mask."""
    config = model.config
    tokenizer = config.tokenizer
    required = {t.name for t in config.inputs if not t.optional}
    if tokenizer is None:
        return required
    text, tokens = tokenizer.text_input, {tokenizer.input_ids, tokenizer.attention_mask}
    if text in inputs:
        extra = tokens & inputs.keys()
        if extra:
            raise InferenceError(
                ErrorCode.INVALID_INPUT,
                f"model '{config.name}': send either '{text}' or {sorted(tokens)}, not both "
                f"(got {sorted(inputs)})",
                reason="text_and_tokens",
            )
        return required | {text}
    return required | tokens
