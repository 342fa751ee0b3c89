"""TensorRT lane logic without TensorRT: plan cache, profiles, dtype table, I/O checks, the
build pipeline and the loader's choice, against fakes; real TensorRT tests are marked."""

from __future__ import annotations

import argparse
import enum
import hashlib
import json
import logging
import sys
import types
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from batchwire.config import (
    GpuConfig,
    ModelConfig,
    ProfileDimsConfig,
    TensorConfig,
    load_model_config,
    version_dirs,
    write_model_config,
)
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import TensorSpec
from engines import loader, plan_cache
from engines import tensorrt as trt_engine
from engines.ort import OrtEngine
from engines.plan_cache import (
    PlanKey,
    atomic_write_bytes,
    find_plan,
    plan_path,
    publish_plan,
    remove_plan,
    sidecar_path,
    staging_path,
    timing_cache_path,
)
from engines.tensorrt import (
    IOTensor,
    ProfileShape,
    check_io,
    check_shape_in_profile,
    describe_io,
    max_output_shapes,
    numpy_dtype_of,
    select_profile,
    trt_major,
    volume,
)
from trainer import build_engine as be
from trainer.cli import add_build_engine_parser, run_build_engine
from trainer.mlp64 import create_mlp64

FAKE_GPU = "Fake GPU 80GB (sm_90)"


def _key(**changes: Any) -> PlanKey:
    key = PlanKey(
        onnx_sha256="ab" * 32,
        trt_version="10.8.0.43",
        gpu_name=FAKE_GPU,
        precision="fp16",
        profile=(("INPUT", (1, 64), (128, 64), (256, 64)),),
    )
    return replace(key, **changes)


def _publish(version_dir: Path, key: PlanKey, data: bytes = b"PLAN") -> Path:
    staged = staging_path(version_dir)
    staged.write_bytes(data)
    return publish_plan(version_dir, key, staged)


# ------------------------------------------------------------------------------ plan cache
def test_key_round_trips_through_json_and_names_a_short_file(tmp_path: Path) -> None:
    key = _key()
    assert PlanKey.from_json(json.loads(json.dumps(key.to_json()))) == key
    assert key.digest() == _key().digest() and len(key.digest()) == 16
    path = plan_path(tmp_path, key)
    assert path == tmp_path / "plans" / f"{key.digest()}.plan"
    assert sidecar_path(tmp_path, key) == path.with_suffix(".json")
    assert timing_cache_path(tmp_path) == tmp_path / "plans" / "timing.cache"


def test_published_plan_is_found_with_its_sidecar(tmp_path: Path) -> None:
    key = _key()
    assert find_plan(tmp_path, key) is None
    path = _publish(tmp_path, key)
    assert find_plan(tmp_path, key) == path and path.read_bytes() == b"PLAN"
    sidecar = json.loads(sidecar_path(tmp_path, key).read_text())
    assert sidecar["key"] == key.to_json()
    assert [p.name for p in (tmp_path / "plans").iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize(
    "changes",
    [
        {"onnx_sha256": "cd" * 32},
        {"trt_version": "10.9.0.34"},
        {"trt_version": "11.4.0.106"},
        {"gpu_name": "NVIDIA L4 (sm_89)"},
        {"precision": "fp32"},
        {"profile": (("INPUT", (1, 64), (128, 64), (512, 64)),)},  # max batch
        {"profile": (("INPUT", (1, 64), (64, 64), (256, 64)),)},  # opt batch
        {"profile": (("INPUT", (1, 64), (128, 64), (256, 64)), ("MASK", (1,), (1,), (1,)))},
    ],
    ids=["onnx", "trt-minor", "trt-major", "gpu", "precision", "max", "opt", "inputs"],
)
def test_any_difference_in_the_key_means_rebuild(tmp_path: Path, changes: dict[str, Any]) -> None:
    _publish(tmp_path, _key())
    other = _key(**changes)
    assert other.digest() != _key().digest()
    assert find_plan(tmp_path, other) is None


def test_a_sidecar_describing_another_key_is_never_trusted(tmp_path: Path) -> None:
    """A file-name (short hash) collision, or a sidecar overwritten by hand."""
    key = _key()
    path = _publish(tmp_path, key)
    sidecar = sidecar_path(tmp_path, key)
    sidecar.write_text(json.dumps({"key": _key(gpu_name="other").to_json()}))
    assert find_plan(tmp_path, key) is None
    assert path.exists()  # not ours to delete: the next build replaces it


@pytest.mark.parametrize("content", ["not json", "{}", '{"key": {"onnx_sha256": 1}}', "[]"])
def test_unreadable_sidecar_means_rebuild(tmp_path: Path, content: str) -> None:
    key = _key()
    _publish(tmp_path, key)
    sidecar_path(tmp_path, key).write_text(content)
    assert find_plan(tmp_path, key) is None


def test_plan_without_sidecar_or_sidecar_without_plan_is_ignored(tmp_path: Path) -> None:
    key = _key()
    path = _publish(tmp_path, key)
    sidecar_path(tmp_path, key).unlink()
    assert find_plan(tmp_path, key) is None
    path = _publish(tmp_path, key)
    path.unlink()
    assert find_plan(tmp_path, key) is None


def test_republishing_replaces_the_plan_and_remove_deletes_both(tmp_path: Path) -> None:
    key = _key()
    _publish(tmp_path, key, b"OLD")
    path = _publish(tmp_path, key, b"NEW")
    assert find_plan(tmp_path, key) == path and path.read_bytes() == b"NEW"
    remove_plan(tmp_path, key)
    assert not path.exists() and not sidecar_path(tmp_path, key).exists()
    remove_plan(tmp_path, key)  # absent: no error


def test_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "plans" / "x.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["x.bin"]


def test_file_sha256_follows_the_file_content(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"first")
    assert plan_cache.file_sha256(path) == hashlib.sha256(b"first").hexdigest()
    path.write_bytes(b"second, longer")
    assert plan_cache.file_sha256(path) == hashlib.sha256(b"second, longer").hexdigest()


def test_plan_key_changes_with_the_onnx_file(tmp_path: Path) -> None:
    onnx_path = tmp_path / "model.onnx"
    onnx_path.write_bytes(b"v1")
    profile = {"INPUT": ProfileShape((1, 4), (8, 4), (8, 4))}
    kw: dict[str, Any] = {"precision": "fp16", "trt_version": "10.8.0", "gpu_name": FAKE_GPU}
    first = trt_engine.plan_key_for(onnx_path, profile, **kw)
    assert first.profile == (("INPUT", (1, 4), (8, 4), (8, 4)),)
    onnx_path.write_bytes(b"v2 retrained")
    assert trt_engine.plan_key_for(onnx_path, profile, **kw).onnx_sha256 != first.onnx_sha256


# ------------------------------------------------------------------------------- profiles
IMAGE = TensorSpec("INPUT", "FP32", (1, 8, 8))
IDS = TensorSpec("input_ids", "INT64", (-1,))
MASK = TensorSpec("attention_mask", "INT64", (-1,))


def test_profile_batch_axis_min_1_opt_largest_preferred_max_max() -> None:
    profile = select_profile([IMAGE], 64, [16, 32])
    assert profile == {"INPUT": ProfileShape((1, 1, 8, 8), (32, 1, 8, 8), (64, 1, 8, 8))}


def test_profile_opt_is_max_batch_without_preferred_sizes() -> None:
    assert select_profile([IMAGE], 64)["INPUT"].opt == (64, 1, 8, 8)


def test_profile_variable_dims_come_from_profile_dims() -> None:
    dims = ProfileDimsConfig(min=[1], opt=[64], max=[256])
    profile = select_profile([IDS, MASK], 32, [8], {"input_ids": dims, "attention_mask": dims})
    assert profile["input_ids"] == ProfileShape((1, 1), (8, 64), (32, 256))
    assert list(profile) == ["input_ids", "attention_mask"]


def test_profile_dims_repeat_fixed_dims() -> None:
    spec = TensorSpec("X", "FP32", (3, -1))
    dims = ProfileDimsConfig(min=[3, 16], opt=[3, 32], max=[3, 64])
    assert select_profile([spec], 4, (), {"X": dims})["X"].max == (4, 3, 64)


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        (None, "gpu.profile_dims.input_ids"),
        (ProfileDimsConfig(min=[1, 1], opt=[2, 2], max=[3, 3]), "rank"),
        (ProfileDimsConfig(min=[0], opt=[2], max=[3]), "does not fit"),
        (ProfileDimsConfig(min=[4], opt=[2], max=[3]), "min <= opt <= max"),
    ],
)
def test_profile_rejects_missing_or_inconsistent_dims(
    dims: ProfileDimsConfig | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        select_profile([IDS], 8, (), {"input_ids": dims} if dims else None)


def test_profile_rejects_a_fixed_dim_that_differs() -> None:
    spec = TensorSpec("X", "FP32", (3, -1))
    dims = ProfileDimsConfig(min=[4, 1], opt=[4, 2], max=[4, 3])
    with pytest.raises(ValueError, match="does not fit"):
        select_profile([spec], 4, (), {"X": dims})


def test_profile_needs_a_batch_axis() -> None:
    with pytest.raises(ValueError, match="batch axis"):
        select_profile([IMAGE], 0)


def test_profile_of_reads_the_model_config() -> None:
    config = ModelConfig.model_validate(
        {
            "name": "m",
            "max_batch_size": 16,
            "inputs": [{"name": "input_ids", "datatype": "INT64", "dims": [-1]}],
            "outputs": [{"name": "Y", "datatype": "FP32", "dims": [4]}],
            "dynamic_batching": {"preferred_batch_size": [4, 8]},
            "gpu": {
                "engine": "tensorrt",
                "profile_dims": {"input_ids": {"min": [1], "opt": [32], "max": [128]}},
            },
        }
    )
    profile = trt_engine.profile_of(config, (IDS,))
    assert profile["input_ids"] == ProfileShape((1, 1), (8, 32), (16, 128))


# ------------------------------------------------------------- dtypes, shapes and I/O checks
class FakeDataType(enum.Enum):
    """Stands in for `tensorrt.DataType` (looked up by member name)."""

    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9


def test_dtype_table_maps_tensorrt_types_to_numpy() -> None:
    assert numpy_dtype_of(FakeDataType.FLOAT) == np.float32
    assert numpy_dtype_of(FakeDataType.HALF) == np.float16
    assert numpy_dtype_of(FakeDataType.INT64) == np.int64
    assert numpy_dtype_of(FakeDataType.BOOL) == np.bool_
    assert numpy_dtype_of(FakeDataType.UINT8) == np.uint8
    for name in ("BF16", "FP8", "INT4"):
        with pytest.raises(InferenceError) as exc:
            numpy_dtype_of(FakeDataType[name])
        assert exc.value.code is ErrorCode.UNSUPPORTED and name in exc.value.message


def test_volume_and_trt_major() -> None:
    assert volume((64, 1, 8, 8)) == 4096 and volume(()) == 1 and volume((0, 3)) == 0
    assert trt_major("10.8.0.43") == 10 and trt_major("11.4.0.106") == 11


def test_shape_in_profile() -> None:
    profile = ProfileShape((1, 1, 8, 8), (32, 1, 8, 8), (64, 1, 8, 8))
    check_shape_in_profile("INPUT", (64, 1, 8, 8), profile)
    check_shape_in_profile("INPUT", (1, 1, 8, 8), profile)
    for shape in [(65, 1, 8, 8), (0, 1, 8, 8), (4, 1, 8, 9), (4, 64)]:
        with pytest.raises(InferenceError) as exc:
            check_shape_in_profile("INPUT", shape, profile)
        assert exc.value.code is ErrorCode.INVALID_INPUT and "profile" in exc.value.message


class FakeTensorIOMode(enum.Enum):
    INPUT = 1
    OUTPUT = 2


FAKE_TRT_ENUMS = types.SimpleNamespace(TensorIOMode=FakeTensorIOMode)


class FakeCudaEngine:
    """An `ICudaEngine` with the name-based I/O API of TensorRT 10/11."""

    def __init__(self, tensors: list[tuple[str, bool, FakeDataType, tuple[int, ...]]]) -> None:
        self.tensors = tensors
        self.num_io_tensors = len(tensors)

    def get_tensor_name(self, i: int) -> str:
        return self.tensors[i][0]

    def _get(self, name: str) -> tuple[str, bool, FakeDataType, tuple[int, ...]]:
        return next(t for t in self.tensors if t[0] == name)

    def get_tensor_mode(self, name: str) -> FakeTensorIOMode:
        return FakeTensorIOMode.INPUT if self._get(name)[1] else FakeTensorIOMode.OUTPUT

    def get_tensor_dtype(self, name: str) -> FakeDataType:
        return self._get(name)[2]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._get(name)[3]

    def get_tensor_profile_shape(self, name: str, index: int) -> list[tuple[int, ...]]:
        assert index == 0 and self._get(name)[1]
        tail = self._get(name)[3][1:]
        return [(1, *tail), (32, *tail), (64, *tail)]


DIGITS_ENGINE = [
    ("INPUT", True, FakeDataType.FLOAT, (-1, 1, 8, 8)),
    ("PROBABILITIES", False, FakeDataType.FLOAT, (-1, 10)),
    ("LABEL", False, FakeDataType.INT64, (-1, 1)),
]
DIGITS_IN = (TensorSpec("INPUT", "FP32", (1, 8, 8)),)
DIGITS_OUT = (TensorSpec("PROBABILITIES", "FP32", (10,)), TensorSpec("LABEL", "INT64", (1,)))


def test_describe_io_reads_names_modes_dtypes_and_profiles() -> None:
    tensors = describe_io(FakeCudaEngine(DIGITS_ENGINE), FAKE_TRT_ENUMS)
    assert [t.name for t in tensors] == ["INPUT", "PROBABILITIES", "LABEL"]
    assert tensors[0] == IOTensor(
        "INPUT",
        True,
        np.dtype(np.float32),
        (-1, 1, 8, 8),
        ProfileShape((1, 1, 8, 8), (32, 1, 8, 8), (64, 1, 8, 8)),
    )
    assert not tensors[2].is_input and tensors[2].dtype == np.int64 and tensors[2].profile is None
    check_io(tensors, DIGITS_IN, DIGITS_OUT, "plan")
    check_io(tensors, DIGITS_IN, DIGITS_OUT[:1], "plan")  # declared outputs: a subset


@pytest.mark.parametrize(
    ("inputs", "outputs", "message"),
    [
        ((), DIGITS_OUT, "undeclared ['INPUT']"),
        ((*DIGITS_IN, TensorSpec("MASK", "FP32", (1,))), DIGITS_OUT, "missing ['MASK']"),
        (DIGITS_IN, (TensorSpec("OTHER", "FP32", (10,)),), "missing ['OTHER']"),
        ((TensorSpec("INPUT", "FP16", (1, 8, 8)),), DIGITS_OUT, "is FP32 in the engine"),
        (DIGITS_IN, (TensorSpec("LABEL", "INT32", (1,)),), "is INT64 in the engine"),
        ((TensorSpec("INPUT", "FP32", (8, 8)),), DIGITS_OUT, "has shape [-1, 1, 8, 8]"),
        ((TensorSpec("INPUT", "FP32", (1, 8, 9)),), DIGITS_OUT, "declared dims [1, 8, 9]"),
    ],
)
def test_check_io_names_what_differs(
    inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...], message: str
) -> None:
    tensors = describe_io(FakeCudaEngine(DIGITS_ENGINE), FAKE_TRT_ENUMS)
    with pytest.raises(InferenceError) as exc:
        check_io(tensors, inputs, outputs, "plan")
    assert exc.value.code is ErrorCode.INTERNAL and message in exc.value.message


class FakeContext:
    """An `IExecutionContext` whose output shapes follow the input's batch."""

    def __init__(self, out_tails: dict[str, tuple[int, ...]], refuse: bool = False) -> None:
        self.out_tails = out_tails
        self.refuse = refuse
        self.input_shapes: dict[str, tuple[int, ...]] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.input_shapes[name] = tuple(shape)
        return not self.refuse

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        batch = next(iter(self.input_shapes.values()))[0]
        return (batch, *self.out_tails[name])


def test_output_buffers_are_sized_at_the_profile_max() -> None:
    profile = {"INPUT": ProfileShape((1, 1, 8, 8), (32, 1, 8, 8), (64, 1, 8, 8))}
    context = FakeContext({"PROBABILITIES": (10,), "LABEL": (1,)})
    shapes = max_output_shapes(context, profile, ["PROBABILITIES", "LABEL"])
    assert context.input_shapes == {"INPUT": (64, 1, 8, 8)}
    assert shapes == {"PROBABILITIES": (64, 10), "LABEL": (64, 1)}
    assert volume(shapes["PROBABILITIES"]) * np.dtype(np.float32).itemsize == 2560


def test_data_dependent_output_shapes_and_refused_shapes_fail() -> None:
    profile = {"INPUT": ProfileShape((1, 4), (2, 4), (4, 4))}
    with pytest.raises(InferenceError) as exc:
        max_output_shapes(FakeContext({"Y": (-1,)}), profile, ["Y"])
    assert exc.value.code is ErrorCode.UNSUPPORTED
    with pytest.raises(InferenceError) as exc:
        max_output_shapes(FakeContext({"Y": (4,)}, refuse=True), profile, ["Y"])
    assert exc.value.code is ErrorCode.INTERNAL


# ------------------------------------------------------------------- build: pure decisions
def test_network_flags_explicit_batch_only_before_tensorrt_10() -> None:
    fake = types.SimpleNamespace(
        NetworkDefinitionCreationFlag=types.SimpleNamespace(EXPLICIT_BATCH=0)
    )
    assert be.network_flags(fake, 8) == 1
    assert be.network_flags(fake, 10) == 0 and be.network_flags(fake, 11) == 0


@pytest.mark.parametrize(
    ("requested", "major", "fast", "reduced", "flag", "effective", "noted"),
    [
        ("fp16", 10, True, False, True, "fp16", False),
        ("fp16", 10, False, False, False, "fp32", True),  # no fast FP16 on this GPU
        ("fp16", 11, True, False, False, "fp32", True),  # 11.x: no flag, FP32 model
        ("fp16", 11, True, True, False, "fp16", False),  # 11.x: the model's own FP16 types
        ("fp32", 10, True, False, False, "fp32", False),
        ("fp32", 11, True, False, False, "fp32", False),
        ("fp32", 10, True, True, False, "fp16", True),  # FP16 types are kept
    ],
)
def test_precision_choice(
    requested: str,
    major: int,
    fast: bool,
    reduced: bool,
    flag: bool,
    effective: str,
    noted: bool,
) -> None:
    choice = be.choose_precision(
        requested, major, platform_has_fast_fp16=fast, model_has_reduced_precision=reduced
    )
    assert (choice.fp16_flag, choice.effective, choice.note is not None) == (flag, effective, noted)
    if major >= 11 and noted:
        assert "ModelOpt AutoCast" in (choice.note or "")


def test_precision_choice_rejects_unknown_precision() -> None:
    with pytest.raises(ValueError):
        be.choose_precision(
            "int8", 10, platform_has_fast_fp16=True, model_has_reduced_precision=False
        )


def _onnx_model(
    elem: int = TensorProto.FLOAT, *, initializer: int | None = None, cast_to: int | None = None
) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", ["X"], ["Y"])]
    inits = []
    if initializer is not None:
        inits.append(helper.make_tensor("W", initializer, [1], [1.0]))
    if cast_to is not None:
        nodes = [helper.make_node("Cast", ["X"], ["Y"], to=cast_to)]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("X", elem, [None, 4])],
        [helper.make_tensor_value_info("Y", cast_to or elem, [None, 4])],
        initializer=inits,
    )
    return helper.make_model(graph)


def test_onnx_reduced_precision_detection() -> None:
    assert not be.onnx_has_reduced_precision(_onnx_model())
    assert be.onnx_has_reduced_precision(_onnx_model(TensorProto.FLOAT16))
    assert be.onnx_has_reduced_precision(_onnx_model(initializer=TensorProto.FLOAT16))
    assert be.onnx_has_reduced_precision(_onnx_model(cast_to=TensorProto.BFLOAT16))
    assert not be.onnx_has_reduced_precision(_onnx_model(cast_to=TensorProto.DOUBLE))


def test_relative_error() -> None:
    expected = np.array([[1.0, -2.0], [0.5, 4.0]], dtype=np.float32)
    assert be.relative_error(expected, expected) == 0.0
    off = expected.copy()
    off[0, 0] += 0.004
    assert be.relative_error(off, expected) == pytest.approx(0.001, rel=1e-3)
    nan = expected.copy()
    nan[1, 1] = np.nan
    assert be.relative_error(nan, expected) == float("inf")
    assert be.relative_error(expected[:1], expected) == float("inf")
    zeros = np.zeros(3, dtype=np.float32)
    assert be.relative_error(zeros, zeros) == 0.0
    assert be.relative_error(zeros + 1e-3, zeros) > 1e6


def test_mismatch_fraction() -> None:
    a = np.array([1, 2, 3, 4])
    assert be.mismatch_fraction(a, a) == 0.0
    assert be.mismatch_fraction(np.array([1, 2, 3, 5]), a) == 0.25
    assert be.mismatch_fraction(a[:2], a) == 1.0


def test_validation_inputs_are_seeded_and_within_the_profile() -> None:
    profile = {
        "INPUT": ProfileShape((1, 1, 8, 8), (32, 1, 8, 8), (64, 1, 8, 8)),
        "MASK": ProfileShape((1, 1), (32, 16), (64, 128)),
    }
    specs = [TensorSpec("INPUT", "FP32", (1, 8, 8)), TensorSpec("MASK", "INT64", (-1,))]
    assert be.validation_batch_sizes(profile) == (1, 32, 64)
    one = be.validation_inputs(specs, profile, 4, np.random.default_rng(0))
    two = be.validation_inputs(specs, profile, 4, np.random.default_rng(0))
    np.testing.assert_array_equal(one["INPUT"], two["INPUT"])
    assert one["INPUT"].shape == (4, 1, 8, 8) and one["INPUT"].dtype == np.float32
    assert one["INPUT"].min() >= 0.0 and one["INPUT"].max() < 1.0
    assert one["MASK"].shape == (4, 16) and (one["MASK"] == 1).all()


class ScaledRunner:
    """Wraps a runner and perturbs float outputs by a relative `error` (or flips labels)."""

    def __init__(self, inner: Any, error: float = 0.0, flip: bool = False) -> None:
        self.inner, self.error, self.flip = inner, error, flip

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v.copy() for k, v in self.inner.infer(inputs).items()}
        for array in out.values():
            if array.dtype.kind == "f":
                array += self.error * np.abs(array).max()
            elif self.flip:
                array += 1
        return out


class MlpReference:
    """relu(x @ W) of mlp64 in numpy: the 'ONNX Runtime' side."""

    def __init__(self, weights: np.ndarray) -> None:
        self.weights = weights

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"OUTPUT": np.maximum(inputs["INPUT"] @ self.weights, 0)}


@pytest.mark.parametrize(
    ("precision", "error", "ok"),
    [("fp32", 0.0, True), ("fp32", 1e-3, False), ("fp16", 1e-3, True), ("fp16", 5e-2, False)],
)
def test_compare_outputs_applies_the_precision_bound(
    precision: str, error: float, ok: bool
) -> None:
    reference = MlpReference(np.random.default_rng(1).standard_normal((64, 64)).astype("f4"))
    profile = {"INPUT": ProfileShape((1, 64), (8, 64), (16, 64))}
    specs = (TensorSpec("INPUT", "FP32", (64,)),)
    outs = (TensorSpec("OUTPUT", "FP32", (64,)),)
    plan = ScaledRunner(reference, error)
    if ok:
        errors = be.compare_outputs(plan, reference, specs, outs, profile, precision)
        assert errors["OUTPUT"] == pytest.approx(error, rel=1e-3, abs=1e-9)
    else:
        with pytest.raises(be.PlanValidationError, match=f"{precision} bound"):
            be.compare_outputs(plan, reference, specs, outs, profile, precision)


def test_compare_outputs_counts_flipped_labels() -> None:
    class Labels:
        def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {"LABEL": np.zeros((inputs["INPUT"].shape[0], 1), dtype=np.int64)}

    profile = {"INPUT": ProfileShape((1, 4), (2, 4), (4, 4))}
    specs = (TensorSpec("INPUT", "FP32", (4,)),)
    outs = (TensorSpec("LABEL", "INT64", (1,)),)
    assert be.compare_outputs(Labels(), Labels(), specs, outs, profile, "fp16") == {"LABEL": 0.0}
    with pytest.raises(be.PlanValidationError, match="differing elements"):
        be.compare_outputs(
            ScaledRunner(Labels(), flip=True), Labels(), specs, outs, profile, "fp16"
        )


# -------------------------------------------------------------------- build with a fake trt
class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+timings"


class FakeBuilderConfig:
    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.cache: FakeTimingCache | None = None

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.record["pool"] = (pool, size)

    def add_optimization_profile(self, profile: Any) -> int:
        self.record["profile"] = profile.shapes
        return 0

    def set_flag(self, flag: str) -> None:
        self.record.setdefault("flags", []).append(flag)

    def create_timing_cache(self, data: bytes) -> FakeTimingCache:
        self.record.setdefault("timing_loaded", []).append(bytes(data))
        return FakeTimingCache(bytes(data))

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False
        ok = not cache.data.startswith(b"FOREIGN")
        self.cache = cache if ok else None
        return ok

    def get_timing_cache(self) -> FakeTimingCache | None:
        return self.cache


def make_fake_trt(version: str, record: dict[str, Any], *, fail_build: bool = False) -> Any:
    """A `tensorrt` module stand-in with the builder API used by build_serialized_plan."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]
    major = trt_major(version)

    class Logger:
        WARNING = "warning"

        def __init__(self, level: str) -> None:
            self.level = level

    class Profile:
        def __init__(self) -> None:
            self.shapes: dict[str, tuple[Any, ...]] = {}

        def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
            self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger: Logger) -> None:
            if major < 11:
                self.platform_has_fast_fp16 = True

        def create_network(self, flags: int) -> str:
            record["network_flags"] = flags
            return "network"

        def create_builder_config(self) -> FakeBuilderConfig:
            return FakeBuilderConfig(record)

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: str, config: Any) -> bytes | None:
            record["builds"] = record.get("builds", 0) + 1
            return None if fail_build else b"FAKE-PLAN-" + version.encode()

    class OnnxParser:
        num_errors = 0

        def __init__(self, network: str, logger: Logger) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            record["parsed"] = path
            return True

    trt.Logger = Logger  # type: ignore[attr-defined]
    trt.Builder = Builder  # type: ignore[attr-defined]
    trt.OnnxParser = OnnxParser  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")  # type: ignore[attr-defined]
    # TensorRT 11 removed BuilderFlag.FP16: the fake has no such member there.
    flags = {"FP16": "fp16"} if major < 11 else {}
    trt.BuilderFlag = types.SimpleNamespace(**flags)  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)  # type: ignore[attr-defined]
    return trt


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Installs a fake `tensorrt` (10.8) and returns a setter for other versions."""
    record: dict[str, Any] = {}

    def install(version: str = "10.8.0.43", **kw: Any) -> dict[str, Any]:
        record.clear()
        monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt(version, record, **kw))
        trt_engine.trt_logger.cache_clear()
        return record

    install()
    yield install
    trt_engine.trt_logger.cache_clear()


@pytest.fixture
def mlp_repo(tmp_path: Path) -> Path:
    """mlp64 (ONNX, FP32 [-1, 64], max batch 256) with a `gpu: tensorrt` section."""
    create_mlp64(tmp_path)
    model_dir = tmp_path / "mlp64"
    config = load_model_config(model_dir)
    config.gpu = GpuConfig(engine="tensorrt", precision="fp16")
    write_model_config(model_dir, config)
    return tmp_path


def _ort(path: Path, config: ModelConfig, inputs: tuple[TensorSpec, ...]) -> OrtEngine:
    onnx_path = path if path.suffix == ".onnx" else path.parents[1] / "model.onnx"
    return OrtEngine(onnx_path, inputs, tuple(t.spec() for t in config.outputs), 256)


def _build(repo: Path, **kw: Any) -> list[be.BuildResult]:
    """build_engine with ONNX Runtime standing in for the plan (exact agreement)."""
    kw.setdefault("make_plan_runner", _ort)
    kw.setdefault("make_reference", _ort)
    return be.build_engine(repo, "mlp64", gpu_name=FAKE_GPU, **kw)


def test_build_publishes_a_validated_plan_with_profile_flags_and_timing_cache(
    mlp_repo: Path, fake_trt: Any
) -> None:
    record = fake_trt()
    (result,) = _build(mlp_repo, workspace_bytes=1 << 30)
    version_dir = version_dirs(mlp_repo / "mlp64")[1]
    assert result.built and result.precision == "fp16" and result.version == 1
    assert result.plan_path.read_bytes() == b"FAKE-PLAN-10.8.0.43"
    assert find_plan(version_dir, result.key) == result.plan_path
    assert result.key.gpu_name == FAKE_GPU and result.key.trt_version == "10.8.0.43"
    assert record["network_flags"] == 0 and record["flags"] == ["fp16"]
    assert record["pool"] == ("workspace", 1 << 30)
    assert record["profile"] == {"INPUT": ((1, 64), (256, 64), (256, 64))}
    assert record["parsed"] == str(version_dir / "model.onnx")
    assert timing_cache_path(version_dir).read_bytes() == b"+timings"
    sidecar = json.loads(sidecar_path(version_dir, result.key).read_text())
    assert sidecar["effective_precision"] == "fp16"
    assert sidecar["validation_errors"] == {"OUTPUT": 0.0}
    assert not [p for p in (version_dir / "plans").iterdir() if p.name.startswith(".")]


def test_second_build_is_skipped_until_forced_and_reloads_the_timing_cache(
    mlp_repo: Path, fake_trt: Any
) -> None:
    fake_trt()
    (first,) = _build(mlp_repo)
    record = fake_trt()
    (again,) = _build(mlp_repo)
    assert not again.built and again.plan_path == first.plan_path and "builds" not in record
    (forced,) = _build(mlp_repo, force=True)
    assert forced.built and record["builds"] == 1
    assert record["timing_loaded"] == [b"+timings"]  # the saved cache was loaded back


def test_new_tensorrt_version_or_precision_builds_a_new_plan(mlp_repo: Path, fake_trt: Any) -> None:
    fake_trt()
    (first,) = _build(mlp_repo)
    fake_trt("10.9.0.34")
    (upgraded,) = _build(mlp_repo)
    (fp32,) = _build(mlp_repo, precision="fp32")
    paths = {first.plan_path, upgraded.plan_path, fp32.plan_path}
    assert upgraded.built and fp32.built and len(paths) == 3
    assert fp32.key.precision == "fp32" and fp32.precision == "fp32"


def test_tensorrt_11_builds_fp32_without_the_fp16_flag_and_says_so(
    mlp_repo: Path, fake_trt: Any, caplog: pytest.LogCaptureFixture
) -> None:
    record = fake_trt("11.4.0.106")
    with caplog.at_level(logging.WARNING):
        (result,) = _build(mlp_repo)
    assert result.built and result.precision == "fp32" and result.key.precision == "fp16"
    assert "flags" not in record and record["network_flags"] == 0
    assert "strongly typed" in caplog.text and "ModelOpt AutoCast" in caplog.text


def test_failed_validation_deletes_the_plan_and_raises(mlp_repo: Path, fake_trt: Any) -> None:
    fake_trt()

    def off_by_percent(path: Path, config: ModelConfig, inputs: Any) -> ScaledRunner:
        return ScaledRunner(_ort(path, config, inputs), 0.05)

    with pytest.raises(be.PlanValidationError, match="fp16 bound"):
        _build(mlp_repo, make_plan_runner=off_by_percent)
    plans = version_dirs(mlp_repo / "mlp64")[1] / "plans"
    assert sorted(p.name for p in plans.iterdir()) == ["timing.cache"]


def test_foreign_timing_cache_is_replaced(
    mlp_repo: Path, fake_trt: Any, caplog: pytest.LogCaptureFixture
) -> None:
    record = fake_trt()
    version_dir = version_dirs(mlp_repo / "mlp64")[1]
    atomic_write_bytes(timing_cache_path(version_dir), b"FOREIGN-cache")
    with caplog.at_level(logging.WARNING):
        _build(mlp_repo)
    assert record["timing_loaded"] == [b"FOREIGN-cache", b""]
    assert "starting afresh" in caplog.text
    assert timing_cache_path(version_dir).read_bytes() == b"+timings"


def test_builder_failure_raises_and_leaves_no_plan(mlp_repo: Path, fake_trt: Any) -> None:
    fake_trt(fail_build=True)
    with pytest.raises(RuntimeError, match="failed to build"):
        _build(mlp_repo)
    plans = version_dirs(mlp_repo / "mlp64")[1] / "plans"
    assert not list(plans.glob("*.plan")) and not list(plans.glob(".*"))


def test_build_without_tensorrt_says_how_to_get_it(
    mlp_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    with pytest.raises(RuntimeError, match=r"\.\[gpu\]"):
        be.build_engine(mlp_repo, "mlp64")


def test_variable_dims_without_profile_dims_fail_with_the_config_key(
    mlp_repo: Path, fake_trt: Any
) -> None:
    model_dir = mlp_repo / "mlp64"
    config = load_model_config(model_dir)
    config.inputs = [TensorConfig(name="INPUT", datatype="FP32", dims=[-1])]
    write_model_config(model_dir, config)
    with pytest.raises(ValueError, match="gpu.profile_dims.INPUT"):
        _build(mlp_repo)


def test_tensorrt_models_lists_only_tensorrt_configs(mlp_repo: Path) -> None:
    create_mlp64(mlp_repo / "other")
    assert be.tensorrt_models(mlp_repo) == ["mlp64"]
    assert be.tensorrt_models(mlp_repo / "other") == []


# -------------------------------------------------------------------------------------- CLI
def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_build_engine_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["build-engine", *argv])


def test_cli_parses_build_engine_arguments(tmp_path: Path) -> None:
    args = _parse("digits", "--model-repository", str(tmp_path), "--precision", "fp32")
    assert (args.model, args.model_repository, args.precision) == ("digits", tmp_path, "fp32")
    assert args.func is run_build_engine and not args.all and args.workspace_mib == 4096
    with pytest.raises(SystemExit):
        _parse("digits", "--precision", "int8")


def test_cli_needs_one_model_or_all(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_build_engine(_parse()) == 2
    assert run_build_engine(_parse("digits", "--all")) == 2
    assert "name one MODEL or pass --all" in capsys.readouterr().out


def test_cli_all_reports_each_failure_and_exits_1(
    mlp_repo: Path, fake_trt: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The fake TensorRT cannot build real plans (and this host has no CUDA): mlp64 fails,
    # is reported on its own line, and the exit code says so.
    assert run_build_engine(_parse("--all", "--model-repository", str(mlp_repo))) == 1
    assert "mlp64: FAILED" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_build_engine(_parse("--all", "--model-repository", str(empty))) == 0
    assert "no model" in capsys.readouterr().out


# ----------------------------------------------------------------------------------- loader
def test_loader_falls_back_to_cpu_without_cuda(
    mlp_repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(loader, "cuda_available", lambda: False)
    config = load_model_config(mlp_repo / "mlp64")
    with caplog.at_level(logging.INFO):
        engine = loader.load_engine(config, version_dirs(mlp_repo / "mlp64")[1])
    assert isinstance(engine, OrtEngine)
    assert "CUDA is not available" in caplog.text and "serving on the CPU" in caplog.text
    assert loader.instance_count(config) == config.instance_count


def test_loader_falls_back_to_cpu_without_tensorrt(
    mlp_repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(loader, "cuda_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    config = load_model_config(mlp_repo / "mlp64")
    with caplog.at_level(logging.WARNING):
        engine = loader.load_engine(config, version_dirs(mlp_repo / "mlp64")[1])
    assert isinstance(engine, OrtEngine) and "TensorRT cannot be imported" in caplog.text


class RecordingTensorRTEngine:
    """Stands in for TensorRTEngine: records how the loader built it."""

    bucket_sizes: tuple[int, ...] = ()

    def __init__(self, plan: Path, inputs: Any, outputs: Any, max_batch_size: int) -> None:
        self.plan, self.inputs, self.outputs = plan, inputs, outputs
        self.max_batch_size = max_batch_size


@pytest.fixture
def gpu_host(monkeypatch: pytest.MonkeyPatch, fake_trt: Any) -> None:
    """CUDA 'available', fake TensorRT 10.8, a fake GPU name, a recording engine class."""
    monkeypatch.setattr(loader, "cuda_available", lambda: True)
    monkeypatch.setattr(trt_engine, "current_gpu_name", lambda device=0: FAKE_GPU)
    monkeypatch.setattr(trt_engine, "TensorRTEngine", RecordingTensorRTEngine)


def test_loader_without_a_plan_falls_back_and_names_the_command(
    mlp_repo: Path, gpu_host: None, caplog: pytest.LogCaptureFixture
) -> None:
    config = load_model_config(mlp_repo / "mlp64")
    with caplog.at_level(logging.WARNING):
        engine = loader.load_engine(config, version_dirs(mlp_repo / "mlp64")[1])
    assert isinstance(engine, OrtEngine)
    assert "batchwire build-engine mlp64" in caplog.text and FAKE_GPU in caplog.text


def test_loader_loads_the_plan_built_for_this_gpu_and_tensorrt(
    mlp_repo: Path, gpu_host: None
) -> None:
    (result,) = _build(mlp_repo)
    config = load_model_config(mlp_repo / "mlp64")
    version_dir = version_dirs(mlp_repo / "mlp64")[1]
    engine = loader.load_engine(config, version_dir)
    assert isinstance(engine, RecordingTensorRTEngine) and engine.plan == result.plan_path
    assert engine.inputs == (TensorSpec("INPUT", "FP32", (64,)),) and engine.max_batch_size == 256
    assert isinstance(loader.load_engine(config, version_dir, gpu=False), OrtEngine)
    config.gpu = GpuConfig(engine="tensorrt", instances=3)
    assert loader.instance_count(config) == 3


def test_loader_ignores_a_plan_for_another_gpu_or_precision(
    mlp_repo: Path, gpu_host: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    _build(mlp_repo)
    config = load_model_config(mlp_repo / "mlp64")
    version_dir = version_dirs(mlp_repo / "mlp64")[1]
    monkeypatch.setattr(trt_engine, "current_gpu_name", lambda device=0: "NVIDIA L4 (sm_89)")
    assert isinstance(loader.load_engine(config, version_dir), OrtEngine)
    monkeypatch.setattr(trt_engine, "current_gpu_name", lambda device=0: FAKE_GPU)
    config.gpu = GpuConfig(engine="tensorrt", precision="fp32")
    assert isinstance(loader.load_engine(config, version_dir), OrtEngine)


# ------------------------------------------------------------------ real TensorRT on a GPU
def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.slow
@pytest.mark.skipif(not _tensorrt_importable(), reason="needs TensorRT (`gpu` extra) and a GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_real_plan_of_digits_matches_onnx_runtime(
    digits_repository: Path, tmp_path: Path, precision: str
) -> None:
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(digits_repository, repo)
    model_dir = repo / "digits"
    config = load_model_config(model_dir)
    config.gpu = GpuConfig(engine="tensorrt", precision=precision)  # type: ignore[arg-type]
    write_model_config(model_dir, config)
    (result,) = be.build_engine(repo, "digits")
    assert result.built and result.plan_path.is_file()
    assert be.build_engine(repo, "digits")[0].built is False  # cached
    version_dir = version_dirs(model_dir)[1]
    engine = loader.load_engine(config, version_dir)
    assert isinstance(engine, trt_engine.TensorRTEngine) and engine.bucket_sizes == ()
    engine.warmup()
    reference = loader.load_engine(config, version_dir, gpu=False)
    rng = np.random.default_rng(3)
    for batch in (1, 7, 32, 64):
        x = (rng.random((batch, 1, 8, 8)) * 16).astype(np.float32)
        got, want = engine.infer({"INPUT": x}), reference.infer({"INPUT": x})
        bound = be.RELATIVE_ERROR_BOUNDS[result.precision]
        assert be.relative_error(got["PROBABILITIES"], want["PROBABILITIES"]) < bound
        assert got["LABEL"].shape == (batch, 1) and got["LABEL"].dtype == np.int64
    with pytest.raises(InferenceError) as exc:
        engine.infer({"INPUT": np.zeros((65, 1, 8, 8), dtype=np.float32)})
    assert exc.value.code is ErrorCode.INVALID_INPUT
