"""CUDA TorchScript lane: bucket helpers, the batcher's bucket padding and the gpu config
(CPU); the engine itself with CUDA graphs on the digits model (marked `gpu`)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from batching.batcher import DynamicBatcher
from batching.policy import BatchPolicy
from batching.tensors import pad_batch
from batchwire.config import (
    GpuConfig,
    ModelConfig,
    load_model_config,
    version_dirs,
    write_model_config,
)
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import TensorSpec
from engines import loader
from engines.cuda import (
    CudaTorchScriptEngine,
    default_bucket_sizes,
    next_bucket,
    normalize_bucket_sizes,
)
from engines.torchscript import TorchScriptEngine

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda.is_available())")


# ---------------------------------------------------------------------------- bucket helpers
def test_default_buckets_are_powers_of_two_plus_the_max() -> None:
    assert default_bucket_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert default_bucket_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert default_bucket_sizes(1) == (1,)
    assert default_bucket_sizes(3) == (1, 2, 3)
    with pytest.raises(ValueError):
        default_bucket_sizes(0)


def test_configured_buckets_are_sorted_unique_and_include_the_max() -> None:
    assert normalize_bucket_sizes(None, 16) == (1, 2, 4, 8, 16)
    assert normalize_bucket_sizes([], 16) == (1, 2, 4, 8, 16)
    assert normalize_bucket_sizes([8, 3, 8], 16) == (3, 8, 16)
    assert normalize_bucket_sizes([16], 16) == (16,)
    for bad in ([0], [17]):
        with pytest.raises(ValueError, match="outside"):
            normalize_bucket_sizes(bad, 16)


def test_next_bucket_is_the_smallest_that_fits() -> None:
    buckets = (1, 2, 4, 8, 16)
    assert [next_bucket(buckets, n) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert next_bucket(buckets, 17) is None
    assert next_bucket((), 1) is None


# ------------------------------------------------------------------------------ gpu config
BASE = {
    "name": "m",
    "max_batch_size": 8,
    "inputs": [{"name": "X", "datatype": "FP32", "dims": [4]}],
    "outputs": [{"name": "Y", "datatype": "FP32", "dims": [4]}],
}


def test_configs_without_gpu_are_unchanged_and_gpu_defaults_hold() -> None:
    assert ModelConfig.model_validate(BASE).gpu is None
    config = ModelConfig.model_validate({**BASE, "gpu": {"engine": "torchscript_cuda"}})
    assert config.gpu == GpuConfig(engine="torchscript_cuda")
    assert (config.gpu.precision, config.gpu.instances, config.gpu.bucket_sizes) == (
        "fp16",
        1,
        None,
    )


def test_gpu_section_round_trips_through_yaml(tmp_path: Path) -> None:
    config = ModelConfig.model_validate(
        {
            **BASE,
            "gpu": {"engine": "tensorrt", "precision": "fp32", "instances": 2,
                    "profile_dims": {"X": {"min": [4], "opt": [4], "max": [4]}}},
        }
    )  # fmt: skip
    write_model_config(tmp_path, config)
    assert load_model_config(tmp_path) == config
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["gpu"]["engine"] == "tensorrt"


ONE = {"min": [1], "opt": [1], "max": [1]}


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"gpu": {"engine": "cuda"}}, "engine"),
        ({"gpu": {"engine": "tensorrt", "precision": "int8"}}, "precision"),
        ({"gpu": {"engine": "tensorrt", "instances": 0}}, "instances"),
        ({"gpu": {"engine": "torchscript_cuda", "bucket_sizes": [9]}}, "bucket_sizes 9"),
        ({"gpu": {"engine": "tensorrt"}, "max_batch_size": 0}, "max_batch_size >= 1"),
        ({"gpu": {"engine": "tensorrt", "profile_dims": {"Z": ONE}}}, r"unknown inputs \['Z'\]"),
        ({"gpu": {"engine": "tensorrt", "fp16": True}}, "fp16"),
    ],
)
def test_gpu_section_is_validated(update: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig.model_validate({**BASE, **update})


# ------------------------------------------------------------ batcher pads to bucket sizes
class BucketEngine:
    """A CPU fake of a fixed-bucket engine: y = 2x, refuses any other batch size."""

    inputs = (TensorSpec("X", "FP32", (1,)),)
    outputs = (TensorSpec("Y", "FP32", (1,)),)
    max_batch_size = 8
    bucket_sizes = (1, 2, 4, 8)

    def __init__(self) -> None:
        self.seen: list[int] = []

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = inputs["X"].shape[0]
        self.seen.append(n)
        if n not in self.bucket_sizes:
            raise InferenceError(ErrorCode.INTERNAL, f"batch of {n} is not a bucket size")
        return {"Y": inputs["X"] * 2}

    def warmup(self) -> None:
        pass


def _x(*values: float) -> dict[str, np.ndarray]:
    return {"X": np.array(values, dtype=np.float32).reshape(-1, 1)}


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_batcher_pads_batches_to_the_next_bucket_and_drops_the_padding() -> None:
    engine = BucketEngine()
    batcher = DynamicBatcher(
        [engine],  # type: ignore[list-item]
        BatchPolicy(max_batch_size=8, max_queue_delay_ns=50_000_000, preferred_batch_sizes=(3,)),
    )
    batcher.start()
    try:
        results = await asyncio.gather(batcher.submit(_x(1)), batcher.submit(_x(2, 3)))
        single = await batcher.submit(_x(*range(5)))
    finally:
        await batcher.close()
    assert engine.seen == [4, 8]  # 3 samples -> bucket 4, then 5 -> bucket 8
    np.testing.assert_array_equal(results[0]["Y"], [[2.0]])
    np.testing.assert_array_equal(results[1]["Y"], [[4.0], [6.0]])
    assert single["Y"].shape == (5, 1)
    assert batcher.stats.samples_total == 8  # samples, not padded rows
    assert batcher.stats.batch_sizes == {3: 1, 5: 1}


# ------------------------------------------------------------------ loader and construction
@pytest.fixture(scope="module")
def digits(digits_repository: Path) -> tuple[ModelConfig, Path]:
    model_dir = digits_repository / "digits"
    config = load_model_config(model_dir)
    config = config.model_copy(update={"gpu": GpuConfig(engine="torchscript_cuda")})
    return config, version_dirs(model_dir)[1]


@pytest.mark.skipif(CUDA, reason="checks the CPU fallback of a host without CUDA")
def test_loader_falls_back_to_the_cpu_backend_without_cuda(
    digits: tuple[ModelConfig, Path], caplog: pytest.LogCaptureFixture
) -> None:
    config, version_dir = digits
    with caplog.at_level("INFO"):
        engine = loader.load_engine(config, version_dir)
    assert not isinstance(engine, CudaTorchScriptEngine)
    assert "CUDA is not available" in caplog.text
    assert loader.instance_count(config) == config.instance_count


def test_engine_refuses_what_cuda_graphs_cannot_run(digits: tuple[ModelConfig, Path]) -> None:
    config, version_dir = digits
    outputs = tuple(t.spec() for t in config.outputs)
    variable = (TensorSpec("INPUT", "FP32", (1, -1, 8)),)
    for inputs, max_batch in ((variable, 64), (tuple(t.spec() for t in config.inputs), 0)):
        with pytest.raises(InferenceError) as exc:
            CudaTorchScriptEngine(version_dir / "model.pt", inputs, outputs, max_batch)
        assert exc.value.code is ErrorCode.UNSUPPORTED


@pytest.mark.skipif(CUDA, reason="checks the error of a host without CUDA")
def test_engine_without_cuda_is_unavailable(digits: tuple[ModelConfig, Path]) -> None:
    config, version_dir = digits
    with pytest.raises(InferenceError) as exc:
        CudaTorchScriptEngine(
            version_dir / "model.pt",
            tuple(t.spec() for t in config.inputs),
            tuple(t.spec() for t in config.outputs),
            config.max_batch_size,
        )
    assert exc.value.code is ErrorCode.UNAVAILABLE


# ------------------------------------------------------------------------- on a CUDA GPU
def _engine(
    digits: tuple[ModelConfig, Path], *, graphs: bool = True, precision: str = "fp32"
) -> CudaTorchScriptEngine:
    config, version_dir = digits
    return CudaTorchScriptEngine(
        version_dir / "model.pt",
        tuple(t.spec() for t in config.inputs),
        tuple(t.spec() for t in config.outputs),
        config.max_batch_size,
        precision=precision,
        cuda_graphs=graphs,
    )


def _images(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"INPUT": (rng.random((n, 1, 8, 8)) * 16).astype(np.float32)}


@pytest.mark.gpu
@needs_cuda
def test_loader_picks_the_cuda_engine(digits: tuple[ModelConfig, Path]) -> None:
    config, version_dir = digits
    engine = loader.load_engine(config, version_dir)
    assert isinstance(engine, CudaTorchScriptEngine)
    assert engine.bucket_sizes == (1, 2, 4, 8, 16, 32, 64)
    assert not isinstance(loader.load_engine(config, version_dir, gpu=False), CudaTorchScriptEngine)


@pytest.mark.gpu
@needs_cuda
def test_graph_replay_equals_eager_on_every_bucket(digits: tuple[ModelConfig, Path]) -> None:
    graphed, eager = _engine(digits), _engine(digits, graphs=False)
    graphed.warmup()
    eager.warmup()
    for size in graphed.bucket_sizes:
        sample = _images(size, seed=size)
        got, want = graphed.infer(sample), eager.infer(sample)
        np.testing.assert_allclose(got["PROBABILITIES"], want["PROBABILITIES"], atol=1e-6)
        np.testing.assert_array_equal(got["LABEL"], want["LABEL"])
        assert got["PROBABILITIES"].dtype == np.float32 and got["LABEL"].dtype == np.int64
        assert got["LABEL"].shape == (size, 1)


@pytest.mark.gpu
@needs_cuda
def test_fp16_is_close_to_the_cpu_reference(digits: tuple[ModelConfig, Path]) -> None:
    config, version_dir = digits
    engine = _engine(digits, precision="fp16")
    cpu = TorchScriptEngine(
        version_dir / "model.pt",
        tuple(t.spec() for t in config.inputs),
        tuple(t.spec() for t in config.outputs),
        config.max_batch_size,
    )
    sample = _images(64, seed=1)
    got, want = engine.infer(sample), cpu.infer(sample)
    assert got["PROBABILITIES"].dtype == np.float32
    np.testing.assert_allclose(got["PROBABILITIES"], want["PROBABILITIES"], atol=1e-2)
    assert np.mean(got["LABEL"] == want["LABEL"]) >= 0.95


@pytest.mark.gpu
@needs_cuda
def test_only_bucket_sizes_are_accepted(digits: tuple[ModelConfig, Path]) -> None:
    engine = _engine(digits)
    with pytest.raises(InferenceError) as exc:
        engine.infer(_images(3))
    assert exc.value.code is ErrorCode.INTERNAL and "bucket" in exc.value.message
    with pytest.raises(InferenceError) as exc:
        engine.infer({"INPUT": np.zeros((4, 1, 8, 9), dtype=np.float32)})
    assert exc.value.code is ErrorCode.INVALID_INPUT


@pytest.mark.gpu
@needs_cuda
def test_results_are_not_overwritten_by_the_next_batch(digits: tuple[ModelConfig, Path]) -> None:
    engine = _engine(digits)
    first = engine.infer(_images(8, seed=1))
    kept = first["PROBABILITIES"].copy()
    engine.infer(_images(8, seed=2))
    np.testing.assert_array_equal(first["PROBABILITIES"], kept)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.asyncio
async def test_batcher_with_the_cuda_engine_pads_and_splits(
    digits: tuple[ModelConfig, Path],
) -> None:
    engine, eager = _engine(digits), _engine(digits, graphs=False)
    batcher = DynamicBatcher(
        [engine], BatchPolicy(max_batch_size=64, max_queue_delay_ns=20_000_000)
    )
    batcher.start()
    requests = [_images(n, seed=n) for n in (1, 2, 3)]  # 6 samples -> bucket 8
    try:
        results = await asyncio.gather(*(batcher.submit(r) for r in requests))
    finally:
        await batcher.close()
    batch = pad_batch({"INPUT": np.concatenate([r["INPUT"] for r in requests])}, 8)
    want = eager.infer(batch)["PROBABILITIES"]
    start = 0
    for request, result in zip(requests, results, strict=True):
        n = request["INPUT"].shape[0]
        np.testing.assert_allclose(result["PROBABILITIES"], want[start : start + n], atol=1e-6)
        start += n


@pytest.mark.gpu
@needs_cuda
def test_graph_replay_speed_up_is_reported(digits: tuple[ModelConfig, Path]) -> None:
    """Printed, not asserted: the speed-up depends on the GPU, driver and model size."""
    graphed, eager = _engine(digits), _engine(digits, graphs=False)
    for size in (1, 64):
        sample = _images(size)
        timings = {}
        for name, engine in (("graph", graphed), ("eager", eager)):
            for _ in range(20):
                engine.infer(sample)
            start = time.perf_counter()
            runs = 200
            for _ in range(runs):
                engine.infer(sample)
            timings[name] = (time.perf_counter() - start) / runs
        print(
            f"digits batch {size}: eager {timings['eager'] * 1e6:.0f} us, "
            f"CUDA graph {timings['graph'] * 1e6:.0f} us per batch "
            f"(speed-up x{timings['eager'] / timings['graph']:.2f})"
        )
