"""Every RPC and every bad input, through a real server process, with batchwire's own stubs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import ServerProcess, start_server
from trainer.data import load_digits_split

StubT = pb_grpc.GRPCInferenceServiceStub


@pytest.fixture(scope="module")
def channel(server_process: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server_process.address) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> StubT:
    return pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    _, x_test, _, y_test = load_digits_split(seed=0)
    return x_test, y_test


def infer_request(x: np.ndarray, *, model: str = "digits", **kw: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, **kw)  # type: ignore[arg-type]
    request.inputs.add(name="INPUT", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype=np.float32).tobytes())
    return request


def outputs_of(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {
        out.name: np.frombuffer(raw, dtype=dtypes[out.datatype]).reshape(tuple(out.shape))
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }


def assert_code(
    exc: pytest.ExceptionInfo[grpc.RpcError], code: grpc.StatusCode, *words: str
) -> None:
    err = exc.value
    assert err.code() == code, err.details()  # type: ignore[attr-defined]
    for word in words:
        assert word in err.details(), err.details()  # type: ignore[attr-defined]


# ------------------------------------------------------------------ health and metadata
def test_live_ready_and_metadata(stub: StubT) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "batchwire" and meta.version
    assert "model_repository" in meta.extensions


def test_model_ready_is_false_for_unknown_model_or_version(stub: StubT) -> None:
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits")).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits", version="1")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name="digits", version="99")).ready


def test_model_metadata_and_config(stub: StubT) -> None:
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="digits"))
    assert meta.name == "digits" and list(meta.versions) == ["1"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("INPUT", "FP32", [-1, 1, 8, 8])
    ]
    assert {t.name: list(t.shape) for t in meta.outputs} == {
        "PROBABILITIES": [-1, 10],
        "LABEL": [-1, 1],
    }
    config = stub.ModelConfig(pb.ModelConfigRequest(name="digits")).config
    assert config.name == "digits" and config.max_batch_size == 64
    assert [list(i.dims) for i in config.input] == [[1, 8, 8]]
    assert config.HasField("dynamic_batching")
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32]
    from protos import model_config_pb2 as mc

    group = config.instance_group[0]
    assert (group.kind, group.count) == (mc.ModelInstanceGroup.KIND_CPU, 1)  # no GPU here


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService"):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert "inference.GRPCInferenceService" in names and "grpc.health.v1.Health" in names


# ------------------------------------------------------------------ inference
def test_infer_classifies_held_out_digits(
    stub: StubT, images: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = images
    response = stub.ModelInfer(infer_request(x[:20], id="req-7"))
    assert response.id == "req-7" and response.model_name == "digits"
    assert response.model_version == "1"
    out = outputs_of(response)
    assert out["PROBABILITIES"].shape == (20, 10)
    np.testing.assert_allclose(out["PROBABILITIES"].sum(axis=1), 1.0, rtol=1e-5)
    assert (out["LABEL"][:, 0] == out["PROBABILITIES"].argmax(axis=1)).all()
    assert (out["LABEL"][:, 0] == y[:20]).mean() >= 0.9


def test_typed_contents_match_raw(stub: StubT, images: tuple[np.ndarray, np.ndarray]) -> None:
    x = images[0][:3]
    typed = pb.ModelInferRequest(model_name="digits")
    tensor = typed.inputs.add(name="INPUT", datatype="FP32", shape=x.shape)
    tensor.contents.fp32_contents.extend(x.reshape(-1).tolist())
    raw_out = outputs_of(stub.ModelInfer(infer_request(x)))
    typed_out = outputs_of(stub.ModelInfer(typed))
    np.testing.assert_array_equal(raw_out["LABEL"], typed_out["LABEL"])
    np.testing.assert_allclose(raw_out["PROBABILITIES"], typed_out["PROBABILITIES"], rtol=1e-6)


def test_requested_outputs_subset(stub: StubT, images: tuple[np.ndarray, np.ndarray]) -> None:
    request = infer_request(images[0][:2])
    request.outputs.add(name="LABEL")
    response = stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["LABEL"]


def test_statistics_count_inferences(stub: StubT, images: tuple[np.ndarray, np.ndarray]) -> None:
    def stats() -> pb.ModelStatistics:
        reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name="digits"))
        assert len(reply.model_stats) == 1
        return reply.model_stats[0]

    before = stats()
    stub.ModelInfer(infer_request(images[0][:5]))
    after = stats()
    assert after.inference_count == before.inference_count + 5
    assert after.execution_count == before.execution_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.last_inference > 0


# ------------------------------------------------------------------ bad input
def _valid(stub: StubT, images: tuple[np.ndarray, np.ndarray]) -> None:
    out = outputs_of(stub.ModelInfer(infer_request(images[0][:1])))
    assert out["LABEL"][0, 0] == images[1][0]


def bad_requests(
    x: np.ndarray,
) -> dict[str, tuple[pb.ModelInferRequest, grpc.StatusCode, tuple[str, ...]]]:
    one = x[:1]
    cases: dict[str, tuple[pb.ModelInferRequest, grpc.StatusCode, tuple[str, ...]]] = {}
    cases["unknown model"] = (
        infer_request(one, model="nope"),
        grpc.StatusCode.NOT_FOUND,
        ("nope",),
    )
    cases["unknown version"] = (
        infer_request(one, model_version="9"),
        grpc.StatusCode.NOT_FOUND,
        ("version '9'",),
    )
    missing = pb.ModelInferRequest(model_name="digits")
    cases["missing input"] = (missing, grpc.StatusCode.INVALID_ARGUMENT, ("missing input 'INPUT'",))
    extra = infer_request(one)
    extra.inputs.add(name="EXTRA", datatype="FP32", shape=[1])
    extra.raw_input_contents.append(np.zeros(1, np.float32).tobytes())
    cases["extra input"] = (extra, grpc.StatusCode.INVALID_ARGUMENT, ("unexpected input 'EXTRA'",))
    wrong_dtype = pb.ModelInferRequest(model_name="digits")
    wrong_dtype.inputs.add(name="INPUT", datatype="FP64", shape=one.shape)
    wrong_dtype.raw_input_contents.append(one.astype(np.float64).tobytes())
    cases["wrong datatype"] = (wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT, ("FP64", "FP32"))
    cases["wrong shape"] = (
        infer_request(x[:2].reshape(2, 1, 4, 16)), grpc.StatusCode.INVALID_ARGUMENT,
        ("'INPUT'", "[2,1,4,16]", "[-1,1,8,8]"),
    )  # fmt: skip
    short = infer_request(one)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-4]
    cases["short raw buffer"] = (
        short,
        grpc.StatusCode.INVALID_ARGUMENT,
        ("'INPUT'", "252 bytes", "256"),
    )
    big = np.zeros((65, 1, 8, 8), np.float32)
    cases["batch above max"] = (infer_request(big), grpc.StatusCode.INVALID_ARGUMENT, ("65", "64"))
    bad_label = infer_request(one)
    bad_label.inputs[0].datatype = "FLOAT32"
    cases["unknown datatype"] = (bad_label, grpc.StatusCode.INVALID_ARGUMENT, ("FLOAT32",))
    mixed = infer_request(one)
    mixed.inputs[0].contents.fp32_contents.extend([0.0])
    cases["raw and typed mixed"] = (mixed, grpc.StatusCode.INVALID_ARGUMENT, ("contents",))
    out = infer_request(one)
    out.outputs.add(name="NOPE")
    cases["unknown output"] = (out, grpc.StatusCode.INVALID_ARGUMENT, ("'NOPE'",))
    return cases


@pytest.mark.parametrize("case", list(bad_requests(np.zeros((2, 1, 8, 8), np.float32))))
def test_bad_input_gets_a_clear_error_and_the_next_request_succeeds(
    stub: StubT, images: tuple[np.ndarray, np.ndarray], case: str
) -> None:
    request, code, words = bad_requests(images[0])[case]
    with pytest.raises(grpc.RpcError) as exc:
        stub.ModelInfer(request)
    assert_code(exc, code, *words)
    _valid(stub, images)


def test_unknown_model_metadata_and_config_are_not_found(stub: StubT) -> None:
    for call, req in (
        (stub.ModelMetadata, pb.ModelMetadataRequest(name="nope")),
        (stub.ModelConfig, pb.ModelConfigRequest(name="nope")),
        (stub.ModelStatistics, pb.ModelStatisticsRequest(name="nope")),
    ):
        with pytest.raises(grpc.RpcError) as exc:
            call(req)
        assert_code(exc, grpc.StatusCode.NOT_FOUND, "nope")


# ------------------------------------------------------------------ repository extension
def test_repository_index_unload_and_load(
    stub: StubT, images: tuple[np.ndarray, np.ndarray]
) -> None:
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest())
    assert [(m.name, m.version, m.state) for m in index.models] == [("digits", "1", "READY")]
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="digits"))
    try:
        assert not stub.ModelReady(pb.ModelReadyRequest(name="digits")).ready
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest())
        assert [(m.name, m.state) for m in index.models] == [("digits", "UNAVAILABLE")]
        assert not stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True)).models
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(infer_request(images[0][:1]))
        assert_code(exc, grpc.StatusCode.NOT_FOUND, "digits")
    finally:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="digits"))
    assert stub.ModelReady(pb.ModelReadyRequest(name="digits")).ready
    _valid(stub, images)
    with pytest.raises(grpc.RpcError) as exc:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"))
    assert_code(exc, grpc.StatusCode.NOT_FOUND, "nope")


# ------------------------------------------------------------------ limits and shutdown
def test_message_over_the_configured_size_is_resource_exhausted(
    digits_repository: Path, tmp_path: Path, images: tuple[np.ndarray, np.ndarray]
) -> None:
    server = start_server(digits_repository, tmp_path / "log", "--max-message-bytes", "4096")
    try:
        with grpc.insecure_channel(server.address) as ch:
            small_stub = pb_grpc.GRPCInferenceServiceStub(ch)
            with pytest.raises(grpc.RpcError) as exc:
                small_stub.ModelInfer(infer_request(images[0][:32]))  # 8 KiB of pixels
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            _valid(small_stub, images)
    finally:
        assert server.terminate() == 0


def _wait_for_queue_depth(server: ServerProcess, depth: int, futures: list[Any]) -> None:
    """Poll the server's `batchwire_queue_depth` until it reaches `depth` (fails if a call
    ends first, or after 60 s)."""
    import time
    import urllib.request

    deadline = time.monotonic() + 60
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    while time.monotonic() < deadline:
        assert not any(f.done() for f in futures), "a call ended before all were queued"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        queued = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("batchwire_queue_depth{")
        )
        if queued >= depth:
            return
        time.sleep(0.02)  # (polling an observable state, not standing in for it)
    raise AssertionError(f"fewer than {depth} requests queued after 60 s")


def test_sigterm_finishes_queued_requests_then_exits_zero(
    digits_repository: Path, tmp_path: Path, images: tuple[np.ndarray, np.ndarray]
) -> None:
    # A copy of the repository whose batcher holds requests for 1.5 s, so they are
    # still queued when SIGTERM arrives.
    import shutil

    import yaml

    repository = tmp_path / "repo"
    shutil.copytree(digits_repository, repository)
    config_path = repository / "digits" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["dynamic_batching"].update(max_queue_delay_us=1_500_000, preferred_batch_size=[])
    config_path.write_text(yaml.safe_dump(config))
    server = start_server(repository, tmp_path / "log")
    try:
        with grpc.insecure_channel(server.address) as ch:
            slow_stub = pb_grpc.GRPCInferenceServiceStub(ch)
            x = images[0]
            futures = [slow_stub.ModelInfer.future(infer_request(x[i : i + 1])) for i in range(6)]
            # NOTE: signal only once the six are in the batcher's queue (its depth on the
            # metrics endpoint): a call the server has received but not yet handed to
            # its handler is cancelled by grpc's stop, as any new call is.
            _wait_for_queue_depth(server, 6, futures)
            server.process.send_signal(15)
            results = [outputs_of(f.result(timeout=60)) for f in futures]
        for out in results:  # every queued request got its complete answer
            assert out["PROBABILITIES"].shape == (1, 10)
            assert out["LABEL"][0, 0] == out["PROBABILITIES"][0].argmax()
        assert server.process.wait(timeout=60) == 0
    finally:
        server.terminate()
    assert "draining" in server.log()
