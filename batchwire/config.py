"""Schema of `model_repository/<model>/config.yaml`: written by `trainer/`, read by `server/`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from batchwire.types import TensorSpec

Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip

Backend = Literal["onnxruntime", "torchscript"]

#: Triton `platform` string reported by ModelConfig/ModelMetadata for each backend.
PLATFORMS: dict[str, str] = {"onnxruntime": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}

CONFIG_FILENAME = "config.yaml"
#: Where `serve`, `train`, `import` and `build-engine` look when not told otherwise.
DEFAULT_REPOSITORY = Path("model_repository")


class TensorConfig(BaseModel):
    """One declared input or output tensor."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Tensor name, as clients send it and as the engine knows it."""
    datatype: Datatype
    """Open Inference Protocol datatype label (e.g. FP32)."""
    dims: list[int]
    """Shape without the batch dimension when `max_batch_size > 0`; -1 = variable."""
    optional: bool = False
    """An input a request may leave out (Triton's `optional`); see `TokenizerConfig`."""

    def spec(self) -> TensorSpec:
        """The hot-path (frozen dataclass) form of this tensor."""
        return TensorSpec(self.name, self.datatype, tuple(self.dims))


class DynamicBatchingConfig(BaseModel):
    """Dynamic batching policy (Triton's `dynamic_batching`, units in the names)."""

    model_config = ConfigDict(extra="forbid")

    preferred_batch_size: list[int] = Field(default_factory=list)
    """Batch sizes (in samples) that are dispatched at once when reached."""
    max_queue_delay_us: int = Field(default=100, ge=0)
    """Longest the oldest queued request waits for a batch to fill."""
    max_queue_size: int = Field(default=0, ge=0)
    """Queued requests beyond this are rejected at once (RESOURCE_EXHAUSTED); 0 = unbounded."""
    default_timeout_us: int = Field(default=0, ge=0)
    """Queue timeout for requests that set none (0 = none); a request may only lower it."""


class TokenizerConfig(BaseModel):
    """Server-side tokenisation of a text input (a Hugging Face fast tokenizer file).

    A request sends either `text_input` (BYTES, one UTF-8 string per sample) or the
    pre-tokenised `input_ids` + `attention_mask`; the server tokenises text before
    batching, and the batcher pads the sequence axis per batch.
    """

    model_config = ConfigDict(extra="forbid")

    text_input: str = "TEXT"
    """Name of the BYTES input holding the text."""
    path: str = "tokenizer.json"
    """The tokenizer file, relative to the version folder."""
    max_length: int = Field(default=256, ge=1)
    """Longer texts are truncated to this many tokens."""
    input_ids: str = "input_ids"
    """Engine input that receives the token ids (INT64)."""
    attention_mask: str = "attention_mask"
    """Engine input that receives the attention mask (INT64)."""


class CpuLaneConfig(BaseModel):
    """The CPU-concurrency lane: cheap requests skip the batch queue.

    Routing rule: a request with at most `max_samples` samples runs at once on a free
    lane instance, with no batching delay; when every lane instance is busy (or the
    request is larger) it goes to the dynamic batcher, where load forms batches.
    """

    model_config = ConfigDict(extra="forbid")

    max_samples: int = Field(default=1, ge=1)
    """Requests with at most this many samples are eligible for the lane."""
    instances: int = Field(default=1, ge=1)
    """Engine instances in the lane's pool, each on its own thread."""
    inline: bool = False
    """Run on the event loop thread itself (one at a time, no thread hand-off): only for
    models whose compute takes microseconds, or the loop stalls while they run."""


class ProfileDimsConfig(BaseModel):
    """TensorRT optimisation-profile range of one input's non-batch dims (`gpu.profile_dims`).

    Each list has one entry per declared dim (batch axis excluded); a fixed dim repeats
    its declared size, a variable (-1) dim gives its smallest, typical and largest size.
    """

    model_config = ConfigDict(extra="forbid")

    min: list[int]
    """Smallest size of each dim the engine accepts."""
    opt: list[int]
    """Size TensorRT tunes its kernels for."""
    max: list[int]
    """Largest size of each dim the engine accepts (device buffers are sized for it)."""


class GpuConfig(BaseModel):
    """The GPU engine of a model: used when the host has CUDA, else the CPU `backend` serves.

    TensorRT runs `model.onnx` through a plan built by `batchwire build-engine` for this
    GPU, TensorRT version and model (`<version>/plans/`); `torchscript_cuda` runs `model.pt`
    with one CUDA graph per bucket batch size.
    """

    model_config = ConfigDict(extra="forbid")

    engine: Literal["tensorrt", "torchscript_cuda"]
    """Which GPU engine serves the model."""
    precision: Literal["fp32", "fp16"] = "fp16"
    """Compute precision. TensorRT 11 takes reduced precision from the ONNX model's own
    types only (no FP16 flag), so an FP32 model builds as fp32 there (logged)."""
    instances: int = Field(default=1, ge=1)
    """GPU engine instances, each with its own CUDA stream (and TensorRT execution
    context) and thread; replaces `instance_count` when the GPU engine serves."""
    bucket_sizes: list[int] | None = None
    """`torchscript_cuda` only: batch sizes with a captured CUDA graph; batches are padded
    up to the next one. None = powers of two up to `max_batch_size`, plus it."""
    profile_dims: dict[str, ProfileDimsConfig] | None = None
    """`tensorrt` only: min/opt/max of the non-batch dims of each input with variable
    (-1) dims; inputs with fixed dims need no entry."""


class BurnRateAlertConfig(BaseModel):
    """One multiwindow burn-rate alert: it fires while the error budget burns faster than
    `burn_rate` over both the long and the short window (Google SRE workbook, ch. 5)."""

    model_config = ConfigDict(extra="forbid")

    severity: Literal["page", "ticket"]
    """How the alert is routed."""
    burn_rate: float = Field(gt=0)
    """Budget consumption rate, in multiples of the rate that spends it in the SLO period."""
    long_window_s: float = Field(gt=0)
    """The window that makes the alert significant."""
    short_window_s: float = Field(gt=0)
    """The window that makes the alert reset soon after the burn stops."""


def _default_burn_rate_alerts() -> list[BurnRateAlertConfig]:
    hour = 3600.0
    return [
        BurnRateAlertConfig(
            severity="page", burn_rate=14.4, long_window_s=hour, short_window_s=300
        ),
        BurnRateAlertConfig(
            severity="page", burn_rate=6.0, long_window_s=6 * hour, short_window_s=1800
        ),
        BurnRateAlertConfig(
            severity="ticket", burn_rate=1.0, long_window_s=72 * hour, short_window_s=6 * hour
        ),
    ]


class SloConfig(BaseModel):
    """Service-level objectives of one model, checked by the latency-SLO monitor.

    A request is *good for latency* when it succeeds within `latency_threshold_ms`, and
    *available* unless it fails with a server-side status (see `monitoring/slo.py`).
    """

    model_config = ConfigDict(extra="forbid")

    latency_threshold_ms: float = Field(gt=0)
    """The latency a request must beat (end to end inside the server)."""
    latency_objective: float = Field(default=0.99, gt=0, lt=1)
    """Fraction of requests that must beat the threshold (0.99 = "99% under X ms")."""
    availability_objective: float = Field(default=0.999, gt=0, lt=1)
    """Fraction of requests that must not fail with a server-side error."""
    period_s: float = Field(default=30 * 24 * 3600.0, gt=0)
    """The SLO period over which the error budget is counted (default 30 days)."""
    alerts: list[BurnRateAlertConfig] = Field(default_factory=_default_burn_rate_alerts)
    """Burn-rate alerts (default: page 14.4x over 1 h & 5 min, page 6x over 6 h & 30 min,
    ticket 1x over 3 d & 6 h)."""


class DriftConfig(BaseModel):
    """Input/output drift monitoring against the version's reference profile
    (`<version>/reference_profile.json`, written by the trainer)."""

    model_config = ConfigDict(extra="forbid")

    window_samples: int = Field(default=2000, ge=10)
    """Live samples kept in the sliding window that is compared with the reference."""
    min_samples: int = Field(default=200, ge=1)
    """No score is reported before the window holds this many samples."""
    warn_psi: float = Field(default=0.1, gt=0)
    """PSI above this logs a warning."""
    alert_psi: float = Field(default=0.25, gt=0)
    """PSI above this fires the drift alert."""
    confidence_output: str | None = None
    """Output holding class probabilities; its top-class confidence is monitored too."""
    max_samples_per_s: float = Field(default=200.0, ge=0)
    """At most about this many samples a second join the window (whole requests or
    batches, taken while the budget lasts; 0 = every sample). Above that rate the window
    spans `window_samples / max_samples_per_s` seconds or more (10 s with the defaults)
    instead of the last fraction of a second: a burst of odd inputs from one client
    moves the scores without owning the window, and the monitoring costs the event loop
    less. The CPU lane offers the monitor about one request in `rate /
    max_samples_per_s` (re-estimated every evaluation); the others cost a counter
    decrement."""


class AutoscalingConfig(BaseModel):
    """Ray Serve `autoscaling_config` of a model's deployment."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(default=1, ge=0)
    """Fewest replicas kept running."""
    max_replicas: int = Field(default=4, ge=1)
    """Most replicas the autoscaler may start."""
    target_ongoing_requests: float = Field(default=32.0, gt=0)
    """Ongoing requests per replica the autoscaler aims at (a batch needs several)."""
    upscale_delay_s: float = Field(default=10.0, ge=0)
    """How long demand must stay high before replicas are added."""
    downscale_delay_s: float = Field(default=120.0, ge=0)
    """How long demand must stay low before replicas are removed."""
    look_back_period_s: float = Field(default=30.0, gt=0)
    """Window over which ongoing requests are averaged for each decision."""


class RayConfig(BaseModel):
    """How a model runs as a Ray Serve deployment (`batchwire serve --ray`)."""

    model_config = ConfigDict(extra="forbid")

    num_cpus: float = Field(default=0.5, ge=0)
    """CPUs reserved per replica (`ray_actor_options.num_cpus`; a replica runs one engine
    thread per instance beside its event loop)."""
    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs reserved per replica (`ray_actor_options.num_gpus`; > 0 for the GPU lane)."""
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    """Requests one replica accepts at once; None = max_batch_size x (instances + 1), so
    the batcher can fill batches while one runs."""
    autoscaling: AutoscalingConfig | None = None
    """Autoscaling bounds; None = a fixed `num_replicas`."""
    num_replicas: int = Field(default=1, ge=1)
    """Replicas when `autoscaling` is None."""


class ModelConfig(BaseModel):
    """Everything the server needs to know to serve one model."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Model name, equal to its folder name in the repository."""
    backend: Backend = "onnxruntime"
    """Engine that runs the model on CPU hosts."""
    max_batch_size: int = Field(default=0, ge=0)
    """Largest batch (in samples) the engine accepts; 0 = the model does not batch."""
    inputs: list[TensorConfig]
    """Declared inputs, in the order the engine expects them."""
    outputs: list[TensorConfig]
    """Declared outputs."""
    dynamic_batching: DynamicBatchingConfig | None = None
    """Batching policy; None runs each request on its own."""
    instance_count: int = Field(default=1, ge=1)
    """Engine instances (each with its own thread) that may run batches concurrently."""
    intra_op_threads: int = Field(default=1, ge=1)
    """Intra-op threads per engine instance (1 avoids oversubscribing small hosts)."""
    versions_served: int = Field(default=1, ge=1)
    """How many of the highest-numbered versions to load (Triton's `latest` policy)."""
    tokenizer: TokenizerConfig | None = None
    """Tokenise a BYTES text input in the server before batching (None = no text input)."""
    pad_variable_dims: bool = False
    """Batch requests whose variable (-1) dims differ by zero-padding them to the largest;
    only for models that mask padding (attention_mask)."""
    cpu_lane: CpuLaneConfig | None = None
    """Route cheap requests to a bounded pool with no batching delay (None = batcher only)."""
    gpu: GpuConfig | None = None
    """Serve with a GPU engine where CUDA is available (None = the CPU `backend` only)."""
    slo: SloConfig | None = None
    """Latency and availability objectives (None = no SLO monitoring for this model)."""
    drift: DriftConfig | None = None
    """Drift monitoring against the reference profile (None = off)."""
    ray: RayConfig = Field(default_factory=RayConfig)
    """Resources and autoscaling of the model's Ray Serve deployment (`serve --ray` only)."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        for group in (self.inputs, self.outputs):
            names = [t.name for t in group]
            if len(names) != len(set(names)):
                raise ValueError(f"duplicate tensor names in {names}")
        if self.dynamic_batching is not None:
            for size in self.dynamic_batching.preferred_batch_size:
                if not 1 <= size <= max(self.max_batch_size, 1):
                    raise ValueError(
                        f"preferred_batch_size {size} outside 1..max_batch_size "
                        f"({self.max_batch_size})"
                    )
        if self.gpu is not None:
            if self.max_batch_size < 1:
                raise ValueError("gpu engines need a batch axis (max_batch_size >= 1)")
            for size in self.gpu.bucket_sizes or ():
                if not 1 <= size <= self.max_batch_size:
                    raise ValueError(
                        f"gpu.bucket_sizes {size} outside 1..max_batch_size ({self.max_batch_size})"
                    )
            declared = {t.name for t in self.inputs}
            unknown = sorted(set(self.gpu.profile_dims or {}) - declared)
            if unknown:
                raise ValueError(f"gpu.profile_dims names unknown inputs {unknown}")
        return self

    @property
    def platform(self) -> str:
        """Triton platform string for this model's backend."""
        return PLATFORMS[self.backend]


def load_model_config(model_dir: Path) -> ModelConfig:
    """Read and validate `<model_dir>/config.yaml`.

    Raises:
        FileNotFoundError: the file is absent.
        pydantic.ValidationError: the file does not match the schema.
    """
    data = yaml.safe_load((model_dir / CONFIG_FILENAME).read_text())
    return ModelConfig.model_validate(data)


def write_model_config(model_dir: Path, config: ModelConfig) -> Path:
    """Write `config` as `<model_dir>/config.yaml` and return the path."""
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / CONFIG_FILENAME
    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return path


def version_dirs(model_dir: Path) -> dict[int, Path]:
    """Numbered version folders of a model (`<model_dir>/<int>/`), by version number."""
    return {int(p.name): p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()}
