"""Both engines on a freshly trained digits model: functionality, validation and error paths."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from batchwire.config import ModelConfig, TensorConfig, load_model_config, version_dirs
from batchwire.datatypes import numpy_dtype
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import TensorSpec
from engines.base import Engine
from engines.loader import ENGINE_FILENAMES, load_engine, zero_inputs
from engines.ort import OrtEngine
from engines.torchscript import TorchScriptEngine
from trainer.data import load_digits_split

ROOT = Path(__file__).resolve().parents[2]
BACKENDS = ("onnxruntime", "torchscript")
#: Held-out images (indices into the seed-0 test split), one of each digit 0..9.
FIXED_IMAGES: dict[int, int] = {24: 0, 16: 1, 6: 2, 2: 3, 13: 4, 14: 5, 1: 6, 0: 7, 7: 8, 40: 9}
MIN_ACCURACY = 0.95
#: Generous ceiling for the median of 20 batches of 64 (measured: ~0.4 ms ORT, ~1.5 ms TS).
MAX_MEDIAN_BATCH64_S = 0.25


@pytest.fixture(scope="module")
def config(digits_repository: Path) -> ModelConfig:
    return load_model_config(digits_repository / "digits")


@pytest.fixture(scope="module")
def version_dir(digits_repository: Path) -> Path:
    return version_dirs(digits_repository / "digits")[1]


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    _, x_test, _, y_test = load_digits_split(seed=0)
    return x_test, y_test


def _load(config: ModelConfig, version_dir: Path, backend: str) -> Engine:
    engine = load_engine(config.model_copy(update={"backend": backend}), version_dir)
    engine.warmup()
    return engine


@pytest.fixture(scope="module")
def engines(config: ModelConfig, version_dir: Path) -> dict[str, Engine]:
    return {backend: _load(config, version_dir, backend) for backend in BACKENDS}


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request: pytest.FixtureRequest, engines: dict[str, Engine]) -> Engine:
    return engines[request.param]


# ------------------------------------------------------------------- functionality
def test_loader_picks_engine_by_backend(engines: dict[str, Engine], config: ModelConfig) -> None:
    assert isinstance(engines["onnxruntime"], OrtEngine)
    assert isinstance(engines["torchscript"], TorchScriptEngine)
    for engine in engines.values():
        assert isinstance(engine, Engine)
        assert engine.inputs == tuple(t.spec() for t in config.inputs)
        assert engine.outputs == tuple(t.spec() for t in config.outputs)
        assert engine.max_batch_size == config.max_batch_size == 64


def test_classifies_fixed_held_out_images(
    engine: Engine, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    x_test, y_test = held_out
    indices = list(FIXED_IMAGES)
    expected = np.array(list(FIXED_IMAGES.values()))
    np.testing.assert_array_equal(y_test[indices], expected)  # the split itself is stable
    out = engine.infer({"INPUT": x_test[indices]})
    np.testing.assert_array_equal(out["LABEL"][:, 0], expected)
    np.testing.assert_array_equal(out["PROBABILITIES"].argmax(axis=1), expected)


def test_one_image_at_a_time(engine: Engine, held_out: tuple[np.ndarray, np.ndarray]) -> None:
    x_test, _ = held_out
    for index, digit in FIXED_IMAGES.items():
        out = engine.infer({"INPUT": x_test[index : index + 1]})
        assert out["LABEL"].tolist() == [[digit]]


# ---------------------------------------------------------------------- validation
def test_held_out_accuracy(engine: Engine, held_out: tuple[np.ndarray, np.ndarray]) -> None:
    x_test, y_test = held_out
    out = engine.infer({"INPUT": x_test})
    accuracy = float(np.mean(out["LABEL"][:, 0] == y_test))
    assert accuracy >= MIN_ACCURACY
    np.testing.assert_array_equal(out["LABEL"][:, 0], out["PROBABILITIES"].argmax(axis=1))


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_batch_axis_and_dtypes(
    engine: Engine, held_out: tuple[np.ndarray, np.ndarray], batch_size: int
) -> None:
    x_test, _ = held_out
    out = engine.infer({"INPUT": x_test[:batch_size]})
    assert list(out) == [spec.name for spec in engine.outputs]
    for spec in engine.outputs:
        assert out[spec.name].dtype == numpy_dtype(spec.datatype)
        assert out[spec.name].shape == (batch_size, *spec.dims)
    np.testing.assert_allclose(out["PROBABILITIES"].sum(axis=1), 1.0, rtol=1e-5)
    assert np.all((out["PROBABILITIES"] >= 0) & (out["PROBABILITIES"] <= 1))


def test_result_does_not_depend_on_batch_mates(
    engine: Engine, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    """What dynamic batching relies on: a sample's output is the same alone or in a batch."""
    x_test, _ = held_out
    batched = engine.infer({"INPUT": x_test[:64]})
    for i in (0, 31, 63):
        alone = engine.infer({"INPUT": x_test[i : i + 1]})
        np.testing.assert_allclose(
            alone["PROBABILITIES"][0], batched["PROBABILITIES"][i], atol=1e-6
        )
        assert alone["LABEL"][0, 0] == batched["LABEL"][i, 0]


def test_read_only_input_buffer(engine: Engine, held_out: tuple[np.ndarray, np.ndarray]) -> None:
    """Decoded request tensors are `np.frombuffer` views of immutable bytes."""
    x_test, _ = held_out
    frozen = np.frombuffer(x_test[:7].tobytes(), dtype=np.float32).reshape(7, 1, 8, 8)
    assert not frozen.flags.writeable
    out = engine.infer({"INPUT": frozen})
    expected = engine.infer({"INPUT": x_test[:7].copy()})
    np.testing.assert_array_equal(out["LABEL"], expected["LABEL"])
    np.testing.assert_array_equal(out["PROBABILITIES"], expected["PROBABILITIES"])


def test_engines_agree(engines: dict[str, Engine], held_out: tuple[np.ndarray, np.ndarray]) -> None:
    x_test, _ = held_out
    ort_out = engines["onnxruntime"].infer({"INPUT": x_test})
    ts_out = engines["torchscript"].infer({"INPUT": x_test})
    np.testing.assert_allclose(ort_out["PROBABILITIES"], ts_out["PROBABILITIES"], atol=1e-4)
    np.testing.assert_array_equal(ort_out["LABEL"], ts_out["LABEL"])


def test_batch_of_64_latency_ceiling(
    engine: Engine, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    batch = {"INPUT": np.ascontiguousarray(held_out[0][:64])}
    durations_ns = []
    for _ in range(20):
        start_ns = time.monotonic_ns()
        engine.infer(batch)
        durations_ns.append(time.monotonic_ns() - start_ns)
    assert np.median(durations_ns) / 1e9 < MAX_MEDIAN_BATCH64_S


def test_warmup_inputs_follow_the_declared_specs(config: ModelConfig) -> None:
    specs = tuple(t.spec() for t in config.inputs)
    arrays = zero_inputs(specs, config.max_batch_size)
    assert arrays["INPUT"].shape == (1, 1, 8, 8) and arrays["INPUT"].dtype == np.float32
    variable = (TensorConfig(name="X", datatype="INT32", dims=[-1, 3]).spec(),)
    assert zero_inputs(variable, 0)["X"].shape == (1, 3)
    assert zero_inputs(variable, 8, batch_size=4)["X"].shape == (4, 1, 3)
    with pytest.raises(InferenceError) as exc:
        zero_inputs((TensorConfig(name="S", datatype="BYTES", dims=[1]).spec(),), 8)
    assert exc.value.code is ErrorCode.UNSUPPORTED


# -------------------------------------------------------------------- error paths
@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_model_file_is_not_found(
    config: ModelConfig, version_dir: Path, tmp_path: Path, backend: str
) -> None:
    empty = tmp_path / "1"
    empty.mkdir()
    for name in ENGINE_FILENAMES.values():
        if name != ENGINE_FILENAMES[backend]:
            shutil.copy(version_dir / name, empty / name)
    with pytest.raises(InferenceError) as exc:
        load_engine(config.model_copy(update={"backend": backend}), empty)
    assert exc.value.code is ErrorCode.NOT_FOUND
    assert ENGINE_FILENAMES[backend] in exc.value.message


def test_corrupt_onnx_file_is_internal(config: ModelConfig, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(InferenceError) as exc:
        load_engine(config, tmp_path)
    assert exc.value.code is ErrorCode.INTERNAL


@pytest.mark.parametrize(
    ("inputs", "outputs", "words"),
    [
        ([("IMAGE", "FP32", [1, 8, 8])], None, ["IMAGE", "INPUT"]),
        ([("INPUT", "FP64", [1, 8, 8])], None, ["FP64", "FP32"]),
        ([("INPUT", "FP32", [64])], None, ["INPUT", "shape"]),
        ([("INPUT", "FP32", [1, 8, 9])], None, ["INPUT", "shape"]),
        (None, [("SCORES", "FP32", [10])], ["SCORES"]),
        (None, [("LABEL", "INT32", [1])], ["INT32", "INT64"]),
    ],
)
def test_ort_engine_rejects_a_config_that_does_not_match_the_model(
    config: ModelConfig,
    version_dir: Path,
    inputs: list[tuple[str, str, list[int]]] | None,
    outputs: list[tuple[str, str, list[int]]] | None,
    words: list[str],
) -> None:
    def specs(entries: list[tuple[str, str, list[int]]] | None) -> tuple[TensorSpec, ...]:
        return tuple(TensorConfig(name=n, datatype=d, dims=s).spec() for n, d, s in entries or [])  # type: ignore[arg-type]

    declared_in = specs(inputs) or tuple(t.spec() for t in config.inputs)
    declared_out = specs(outputs) or tuple(t.spec() for t in config.outputs)
    with pytest.raises(InferenceError) as exc:
        OrtEngine(version_dir / "model.onnx", declared_in, declared_out, config.max_batch_size)
    assert exc.value.code is ErrorCode.INTERNAL
    for word in words:
        assert word in exc.value.message


def test_ort_engine_rejects_a_wrong_input_at_run_time(engines: dict[str, Engine]) -> None:
    with pytest.raises(InferenceError) as exc:
        engines["onnxruntime"].infer({"INPUT": np.zeros((2, 1, 8, 8), dtype=np.float64)})
    assert exc.value.code is ErrorCode.INVALID_INPUT


def test_torchscript_engine_errors(
    config: ModelConfig, version_dir: Path, engines: dict[str, Engine]
) -> None:
    with pytest.raises(InferenceError) as exc:
        engines["torchscript"].infer({"IMAGE": np.zeros((2, 1, 8, 8), dtype=np.float32)})
    assert exc.value.code is ErrorCode.INVALID_INPUT and "INPUT" in exc.value.message
    extra_output = (
        *engines["torchscript"].outputs,
        TensorConfig(name="X", datatype="FP32", dims=[1]).spec(),
    )
    engine = TorchScriptEngine(
        version_dir / "model.pt", engines["torchscript"].inputs, extra_output, 64
    )
    with pytest.raises(InferenceError) as exc:
        engine.warmup()
    assert exc.value.code is ErrorCode.INTERNAL and "returned 2 outputs" in exc.value.message
    with pytest.raises(InferenceError) as exc:
        engine.infer({"INPUT": np.zeros((2, 3), dtype=np.float32)})
    assert exc.value.code is ErrorCode.INTERNAL


def test_onnx_path_does_not_import_torch(digits_repository: Path) -> None:
    """A server of ONNX models (and `batchwire serve`'s CLI) never pays for importing torch."""
    code = (
        "import sys; from pathlib import Path\n"
        "import trainer.cli, trainer.data\n"
        "from batchwire.config import load_model_config\n"
        "from engines.loader import load_engine\n"
        f"model_dir = Path({str(digits_repository / 'digits')!r})\n"
        "engine = load_engine(load_model_config(model_dir), model_dir / '1')\n"
        "engine.warmup()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_torchscript_engine_on_cuda(
    engines: dict[str, Engine], version_dir: Path, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available (torch.cuda.is_available() is False)")
    cpu = engines["torchscript"]
    gpu = TorchScriptEngine(
        version_dir / "model.pt", cpu.inputs, cpu.outputs, cpu.max_batch_size, device="cuda"
    )
    gpu.warmup()
    x_test, _ = held_out
    out = gpu.infer({"INPUT": x_test})
    expected = cpu.infer({"INPUT": x_test})
    assert out["PROBABILITIES"].dtype == np.float32 and out["LABEL"].dtype == np.int64
    np.testing.assert_allclose(out["PROBABILITIES"], expected["PROBABILITIES"], atol=1e-4)
    np.testing.assert_array_equal(out["LABEL"], expected["LABEL"])


def test_cuda_device_without_cuda_is_unavailable(version_dir: Path, config: ModelConfig) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here; this checks the error on hosts without it")
    specs_in = tuple(t.spec() for t in config.inputs)
    specs_out = tuple(t.spec() for t in config.outputs)
    with pytest.raises(InferenceError) as exc:
        TorchScriptEngine(version_dir / "model.pt", specs_in, specs_out, 64, device="cuda")
    assert exc.value.code is ErrorCode.UNAVAILABLE
