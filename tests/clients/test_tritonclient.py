"""The official `tritonclient[grpc]` client against a real batchwire server, unchanged.

Runs in its own pytest process (see the Makefile): tritonclient registers the protobuf
package `inference` too, so this process never imports batchwire's `protos`.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.support import ServerProcess, start_server
from trainer.data import load_digits_split

#: Fixed held-out images (indices into the seed-0 test split) for the functionality test.
FIXED_INDICES = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55)


@pytest.fixture(scope="module")
def client(server_process: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server_process.address) as c:
        yield c


@pytest.fixture(scope="module")
def images() -> tuple[np.ndarray, np.ndarray]:
    _, x_test, _, y_test = load_digits_split(seed=0)
    return x_test, y_test


def make_input(x: np.ndarray, name: str = "INPUT", datatype: str = "FP32") -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def test_server_and_model_state(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert not client.is_model_ready("nope")
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "batchwire"
    model = client.get_model_metadata("digits", as_json=True)
    assert model["inputs"] == [
        {"name": "INPUT", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}
    ]
    config = client.get_model_config("digits", as_json=True)["config"]
    assert config["max_batch_size"] == 64
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    assert config["dynamic_batching"]["preferred_batch_size"] == [16, 32]
    index = client.get_model_repository_index(as_json=True)
    assert index["models"] == [{"name": "digits", "version": "1", "state": "READY"}]


def test_functionality_fixed_digits_get_the_right_class(
    client: grpcclient.InferenceServerClient, images: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = images
    for i in FIXED_INDICES:
        result = client.infer("digits", [make_input(x[i : i + 1])], request_id=f"img-{i}")
        assert result.get_response().id == f"img-{i}"
        assert int(result.as_numpy("LABEL")[0, 0]) == int(y[i]), f"test image {i}"


def test_batch_and_requested_outputs(
    client: grpcclient.InferenceServerClient, images: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = images
    outputs = [grpcclient.InferRequestedOutput("PROBABILITIES")]
    result = client.infer("digits", [make_input(x[:64])], outputs=outputs)
    probs = result.as_numpy("PROBABILITIES")
    assert probs.shape == (64, 10)
    assert result.as_numpy("LABEL") is None
    assert (probs.argmax(axis=1) == y[:64]).mean() >= 0.9


def test_async_and_streaming_infer(
    client: grpcclient.InferenceServerClient,
    server_process: ServerProcess,
    images: tuple[np.ndarray, np.ndarray],
) -> None:
    x = images[0]
    expected = client.infer("digits", [make_input(x[:1])]).as_numpy("LABEL")
    done: queue.Queue[tuple[object, object]] = queue.Queue()
    client.async_infer(
        "digits", [make_input(x[:1])], lambda result, error: done.put((result, error))
    )
    result, error = done.get(timeout=30)
    assert error is None
    np.testing.assert_array_equal(result.as_numpy("LABEL"), expected)  # type: ignore[attr-defined]

    stream_results: queue.Queue[tuple[object, object]] = queue.Queue()
    with grpcclient.InferenceServerClient(server_process.address) as streamer:
        streamer.start_stream(
            callback=partial(lambda q, result, error: q.put((result, error)), stream_results)
        )
        for i in range(4):
            streamer.async_stream_infer("digits", [make_input(x[i : i + 1])], request_id=str(i))
        got = {}
        for _ in range(4):
            r, e = stream_results.get(timeout=30)
            assert e is None
            got[r.get_response().id] = int(r.as_numpy("LABEL")[0, 0])  # type: ignore[attr-defined]
        streamer.stop_stream()
    direct = client.infer("digits", [make_input(x[:4])]).as_numpy("LABEL")[:, 0]
    assert got == {str(i): int(direct[i]) for i in range(4)}


def test_statistics(
    client: grpcclient.InferenceServerClient, images: tuple[np.ndarray, np.ndarray]
) -> None:
    before = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    client.infer("digits", [make_input(images[0][:8])])
    after = client.get_inference_statistics("digits", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 8


BAD_CASES = {
    "unknown model": ("StatusCode.NOT_FOUND", "nope"),
    "unknown version": ("StatusCode.NOT_FOUND", "version '7'"),
    "missing input": ("StatusCode.INVALID_ARGUMENT", "missing input 'INPUT'"),
    "extra input": ("StatusCode.INVALID_ARGUMENT", "unexpected input 'EXTRA'"),
    "wrong datatype": ("StatusCode.INVALID_ARGUMENT", "FP64"),
    "wrong shape": ("StatusCode.INVALID_ARGUMENT", "[-1,1,8,8]"),
    "batch above max": ("StatusCode.INVALID_ARGUMENT", "max_batch_size"),
    "short raw buffer": ("StatusCode.INVALID_ARGUMENT", "expected 256"),
}


def _bad_call(client: grpcclient.InferenceServerClient, x: np.ndarray, case: str) -> None:
    one = x[:1]
    if case == "unknown model":
        client.infer("nope", [make_input(one)])
    elif case == "unknown version":
        client.infer("digits", [make_input(one)], model_version="7")
    elif case == "missing input":
        client.infer("digits", [])
    elif case == "extra input":
        client.infer("digits", [make_input(one), make_input(one, name="EXTRA")])
    elif case == "wrong datatype":
        client.infer("digits", [make_input(one.astype(np.float64), datatype="FP64")])
    elif case == "wrong shape":
        client.infer("digits", [make_input(x[:2].reshape(2, 64))])
    elif case == "batch above max":
        client.infer("digits", [make_input(np.zeros((65, 1, 8, 8), np.float32))])
    elif case == "short raw buffer":
        tensor = grpcclient.InferInput("INPUT", [1, 1, 8, 8], "FP32")
        tensor.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
        tensor._raw_content = tensor._raw_content[:-4]  # a client bug we must reject
        client.infer("digits", [tensor])


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_status_codes(
    client: grpcclient.InferenceServerClient, images: tuple[np.ndarray, np.ndarray], case: str
) -> None:
    status, words = BAD_CASES[case]
    with pytest.raises(InferenceServerException) as exc:
        _bad_call(client, images[0], case)
    assert exc.value.status() == status, exc.value.message()
    assert words in exc.value.message()
    ok = client.infer("digits", [make_input(images[0][:1])])
    assert int(ok.as_numpy("LABEL")[0, 0]) == int(images[1][0])


def test_load_and_unload(client: grpcclient.InferenceServerClient) -> None:
    client.unload_model("digits")
    try:
        assert not client.is_model_ready("digits")
    finally:
        client.load_model("digits")
    assert client.is_model_ready("digits")


def test_message_over_limit(digits_repository: Path, tmp_path: Path) -> None:
    server = start_server(digits_repository, tmp_path / "log", "--max-message-bytes", "4096")
    try:
        with grpcclient.InferenceServerClient(server.address) as small:
            with pytest.raises(InferenceServerException) as exc:
                small.infer("digits", [make_input(np.zeros((32, 1, 8, 8), np.float32))])
            assert exc.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
            assert small.is_server_live()
    finally:
        assert server.terminate() == 0


def test_wire_format_matches_tritonclient_descriptors(tmp_path: Path) -> None:
    """Every message and field batchwire declares has Triton's field number and type.

    batchwire's .proto files are compiled to a FileDescriptorSet (plain data, registered in
    no descriptor pool, so no clash with tritonclient's) and compared with tritonclient's.
    """
    import subprocess
    import sys

    from google.protobuf import descriptor_pb2
    from tritonclient.grpc import model_config_pb2, service_pb2

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "batchwire.pb"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--descriptor_set_out={out}",
         "--include_imports", "protos/model_config.proto", "protos/grpc_service.proto"],
        cwd=root, check=True,
    )  # fmt: skip
    ours = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    triton = {}
    for module in (service_pb2, model_config_pb2):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        stack = [("", m) for m in proto.message_type]
        while stack:
            prefix, message = stack.pop()
            triton[prefix + message.name] = message
            stack.extend((f"{prefix}{message.name}.", n) for n in message.nested_type)
    checked = 0
    for file in ours.file:
        stack = [("", m) for m in file.message_type]
        while stack:
            prefix, message = stack.pop()
            name = prefix + message.name
            assert name in triton, f"{name} is not a Triton message"
            theirs = {f.name: f for f in triton[name].field}
            for field in message.field:
                assert field.name in theirs, f"{name}.{field.name} is not in Triton's {name}"
                other = theirs[field.name]
                assert (field.number, field.type, field.label) == (
                    other.number,
                    other.type,
                    other.label,
                ), f"{name}.{field.name} differs on the wire"
                assert field.type_name.rsplit(".", 1)[-1] == other.type_name.rsplit(".", 1)[-1]
                checked += 1
            stack.extend((f"{name}.", n) for n in message.nested_type)
    assert checked > 100
    assert [m.name for m in ours.file[-1].service[0].method] == [
        m.name for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
    ][: len(ours.file[-1].service[0].method)]
