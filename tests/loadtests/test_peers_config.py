"""The side-by-side benchmark's own logic: peers' model and config, launch specs, the table.

None of these needs MLServer, PyTriton or perf_analyzer installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from loadtests import bench, perf_analyzer
from loadtests.peers import launch, model
from loadtests.peers.bare_grpc import BareServicer, bare_model_config
from loadtests.peers.model_config_wire import model_config_response
from protos import grpc_service_pb2 as pb
from protos import model_config_pb2 as mc
from trainer.mlp64 import (
    MAX_BATCH_SIZE,
    MAX_QUEUE_DELAY_US,
    create_mlp64,
    mlp64_config,
    mlp64_weights,
)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_peer_weights_equal_batchwire_weights(seed: int) -> None:
    ours = model.mlp64_weights(seed)
    assert ours.dtype == np.float32
    assert np.array_equal(ours, mlp64_weights(seed))


def test_peer_settings_match_batchwire_mlp64_config() -> None:
    config = mlp64_config()
    assert (model.MAX_BATCH_SIZE, model.MAX_QUEUE_DELAY_US) == (MAX_BATCH_SIZE, MAX_QUEUE_DELAY_US)
    assert [(t.name, t.dims) for t in config.inputs] == [(model.INPUT_NAME, [model.WIDTH])]
    assert [(t.name, t.dims) for t in config.outputs] == [(model.OUTPUT_NAME, [model.WIDTH])]


def test_forward_is_batched_relu_matmul() -> None:
    x = np.random.default_rng(3).standard_normal((5, model.WIDTH)).astype(np.float32)
    w = model.mlp64_weights(0)
    y = model.mlp64_forward(x, w)
    assert y.shape == (5, model.WIDTH) and y.dtype == np.float32
    assert np.allclose(y, np.maximum(x @ w, 0)) and (y >= 0).all()
    assert np.allclose(y[2:3], model.mlp64_forward(x[2:3], w))


def test_hand_encoded_model_config_is_what_protobuf_encodes() -> None:
    expected = pb.ModelConfigResponse()
    config = expected.config
    config.name = "mlp64"
    config.max_batch_size = 256
    config.input.add(name="INPUT", data_type=mc.TYPE_FP32, dims=[64])
    config.output.add(name="OUTPUT", data_type=mc.TYPE_FP32, dims=[64])
    config.dynamic_batching.max_queue_delay_microseconds = 100
    config.backend = "mlserver"
    wire = model_config_response(backend="mlserver")
    assert wire == expected.SerializeToString()
    assert pb.ModelConfigResponse.FromString(wire) == expected


def test_hand_encoding_handles_negative_and_multi_byte_dims() -> None:
    wire = model_config_response(
        "m", max_batch_size=0, dims=(-1, 3, 300), max_queue_delay_us=70_000
    )
    config = pb.ModelConfigResponse.FromString(wire).config
    assert config.name == "m" and config.max_batch_size == 0
    assert list(config.input[0].dims) == [-1, 3, 300] == list(config.output[0].dims)
    assert config.dynamic_batching.max_queue_delay_microseconds == 70_000


def test_bare_and_mlserver_report_the_same_shapes() -> None:
    wire = pb.ModelConfigResponse.FromString(model_config_response()).config
    bare = bare_model_config()
    assert bare.max_batch_size == wire.max_batch_size
    assert [(i.name, i.data_type, list(i.dims)) for i in bare.input] == [
        (i.name, i.data_type, list(i.dims)) for i in wire.input
    ]
    assert [(o.name, list(o.dims)) for o in bare.output] == [
        (o.name, list(o.dims)) for o in wire.output
    ]


class _AbortContext:
    """The one ServicerContext call the bare servicer makes on a bad request."""

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise grpc.aio.AbortError(f"{code}: {details}")


@pytest.mark.parametrize("engine", ["numpy", "onnxruntime"])
def test_bare_servicer_infers_a_batch(engine: str, tmp_path: Path) -> None:
    x = np.random.default_rng(4).standard_normal((3, model.WIDTH)).astype(np.float32)
    request = pb.ModelInferRequest(model_name="mlp64", id="r7")
    request.inputs.add(name="INPUT", datatype="FP32", shape=[3, model.WIDTH])
    request.raw_input_contents.append(x.tobytes())
    onnx = None
    if engine == "onnxruntime":  # `bare-ort`: batchwire's own export of mlp64
        onnx = str(create_mlp64(tmp_path) / "model.onnx")
    servicer = BareServicer(onnx)
    response = asyncio.run(servicer.ModelInfer(request, _AbortContext()))
    assert response.id == "r7" and list(response.outputs[0].shape) == [3, model.WIDTH]
    y = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(3, model.WIDTH)
    assert np.allclose(y, np.maximum(x @ mlp64_weights(0), 0), atol=1e-6)
    with pytest.raises(grpc.aio.AbortError, match="NOT_FOUND"):
        request.model_name = "other"
        asyncio.run(servicer.ModelInfer(request, _AbortContext()))


def _ports() -> Callable[[], int]:
    counter = iter(range(20000, 20100))
    return lambda: next(counter)


def test_batchwire_spec_serves_the_repository_on_a_loopback_port_zero(tmp_path: Path) -> None:
    spec = launch.server_spec("batchwire", model_repository=tmp_path, python="py")
    assert spec.argv[:3] == ["py", "-m", "batchwire"]
    assert spec.argv[spec.argv.index("--model-repository") + 1] == str(tmp_path)
    assert spec.argv[spec.argv.index("--host") + 1] == "127.0.0.1"
    assert spec.argv[spec.argv.index("--port") + 1] == "0"
    assert spec.address is None and spec.env == {}
    with pytest.raises(ValueError, match="repository"):
        launch.server_spec("batchwire")


def test_bare_spec_runs_in_batchwire_venv() -> None:
    spec = launch.server_spec("bare", python="py")
    assert spec.argv == ["py", "-m", "loadtests.peers.bare_grpc", "--host", "127.0.0.1",
                         "--port", "0"]  # fmt: skip
    assert spec.address is None


def test_bare_ort_spec_runs_the_repositorys_onnx_file(tmp_path: Path) -> None:
    spec = launch.server_spec("bare-ort", model_repository=tmp_path, python="py")
    assert spec.argv[:3] == ["py", "-m", "loadtests.peers.bare_grpc"]
    assert spec.argv[spec.argv.index("--onnx") + 1] == str(tmp_path / "mlp64" / "1" / "model.onnx")
    with pytest.raises(ValueError, match="repository"):
        launch.server_spec("bare-ort")


def test_mlserver_spec_uses_its_venv_and_three_distinct_ports() -> None:
    spec = launch.server_spec("mlserver", port=_ports(), libdir=lambda p: "/never")
    assert spec.argv[0] == str(launch.PEERS_DIR / ".venv-mlserver" / "bin" / "python")
    assert spec.argv[1:3] == ["-m", "loadtests.peers.mlserver_peer"]
    ports = [
        spec.argv[spec.argv.index(f) + 1] for f in ("--grpc-port", "--http-port", "--metrics-port")
    ]
    assert ports == ["20000", "20001", "20002"]
    assert spec.address == "127.0.0.1:20000"
    assert spec.env == {}  # no libpython needed: LD_LIBRARY_PATH only for PyTriton


def test_pytriton_spec_puts_its_libpython_first_on_the_library_path() -> None:
    seen: list[Path] = []

    def libdir(python: Path) -> str:
        seen.append(python)
        return "/opt/py/lib"

    spec = launch.server_spec(
        "pytriton", port=_ports(), libdir=libdir, environ={"LD_LIBRARY_PATH": "/x:/y"}
    )
    assert seen == [launch.PEERS_DIR / ".venv-pytriton" / "bin" / "python"]
    assert spec.env == {"LD_LIBRARY_PATH": "/opt/py/lib:/x:/y"}
    assert spec.argv[1:3] == ["-m", "loadtests.peers.pytriton_peer"]
    assert spec.address == "127.0.0.1:20000"
    assert launch.with_library_path("/l", {}) == {"LD_LIBRARY_PATH": "/l"}


def test_unknown_server_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown server"):
        launch.server_spec("ray")


def test_free_port_is_bindable_on_loopback() -> None:
    assert 0 < launch.free_port() < 65536


def test_perf_analyzer_command_has_the_agreed_flags() -> None:
    cmd = perf_analyzer.perf_analyzer_command(
        Path("pa"), "127.0.0.1:1", 32, 3000, Path("r.csv"), model="mlp64"
    )
    assert " ".join(cmd) == (
        "pa -m mlp64 -i grpc -u 127.0.0.1:1 -b 1 --concurrency-range 32 -s 50 --percentile 99"
        " -p 3000 -f r.csv"
    )
    with_data = perf_analyzer.perf_analyzer_command(
        Path("pa"), "127.0.0.1:1", 32, 3000, Path("r.csv"), model="mlp64",
        input_data=Path("in.json"),
    )  # fmt: skip
    assert with_data == cmd[:-2] + ["--input-data", "in.json", "-f", "r.csv"]


WITH_SERVER_STATS = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,"
    "Server Compute Input,Server Compute Infer,Server Compute Output,Client Recv,"
    "p50 latency,p90 latency,p95 latency,p99 latency\n"
    "32,3574.2,5,2000,300,10,80,5,3,8570,12000,15000,19350\n"
)
CLIENT_ONLY = (
    "Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,p90 latency,"
    "p95 latency,p99 latency\n1,1218.09,2,0,771,914,1031,1282\n"
)
STDOUT_WITH_COUNTS = """  Server:
    Inference count: 10000
    Execution count: 625
    Successful request count: 10000
"""


def test_parse_report_with_server_statistics() -> None:
    run = perf_analyzer.parse_report(WITH_SERVER_STATS, STDOUT_WITH_COUNTS)
    assert run["throughput_infer_s"] == 3574.2 and run["p50_us"] == 8570 and run["p99_us"] == 19350
    assert run["server_queue_us"] == 300 and run["server_compute_infer_us"] == 80
    assert run["mean_batch_size"] == 16.0


def test_parse_report_without_server_statistics() -> None:
    run = perf_analyzer.parse_report(CLIENT_ONLY, "Client:\n Throughput: 1218 infer/sec\n")
    assert run["throughput_infer_s"] == 1218.09 and run["p99_us"] == 1282
    assert run["server_queue_us"] is None and run["mean_batch_size"] is None


def _run(
    throughput: float, p50_us: float = 1000.0, batch: float | None = None
) -> dict[str, object]:
    return {"throughput_infer_s": throughput, "p50_us": p50_us, "p99_us": 2 * p50_us,
            "mean_batch_size": batch}  # fmt: skip


def test_median_run_is_by_throughput() -> None:
    runs = [_run(300, 1), _run(100, 2), _run(200, 3)]
    assert bench.median_run(runs)["p50_us"] == 3


def test_table_shows_batchwire_over_peer_ratio_and_failures() -> None:
    cells = [
        bench.Cell("batchwire", 32, [_run(3000, batch=12.5), _run(3600), _run(3300)]),
        bench.Cell("mlserver", 32, [_run(1650)]),
        bench.Cell("bare", 32, errors=["start: boom"]),
        bench.Cell("pytriton", 1, [_run(400)]),
    ]
    assert bench.throughput_ratio(cells, cells[1]) == pytest.approx(2.0)
    assert bench.throughput_ratio(cells, cells[3]) is None  # no batchwire at c=1
    table = bench.format_table(cells)
    lines = table.splitlines()
    assert "batchwire/peer" in lines[0]
    assert lines[2].split()[:3] == ["pytriton", "1", "400"]  # c=1 first
    batchwire = lines[3].split()
    assert batchwire[:3] == ["batchwire", "32", "3300"] and batchwire[6] == "1.00x"
    assert "2.00x" in lines[4]
    assert "failed" in lines[5] and "boom" in lines[5]


def _openloop_row(rate: float, ok: float, p50: float | None, lagged: bool = False) -> dict:
    return {
        "offered_rps": rate, "achieved_rps": ok, "errors": {"DEADLINE_EXCEEDED": 2} if lagged
        else {}, "latency_ms": {"p50": p50, "p99": None if p50 is None else p50 * 4},
        "generator_lagged": lagged,
    }  # fmt: skip


def test_openloop_table_lists_each_server_and_rate_in_server_order() -> None:
    servers = {
        "bare": {"extra_loads": [{"result": {"runs": [_openloop_row(500, 499, 0.5)]}}]},
        "batchwire": {
            "extra_loads": [
                {
                    "result": {
                        "runs": [
                            _openloop_row(500, 500, 0.4),
                            _openloop_row(3000, 2100, None, lagged=True),
                        ]
                    }
                }  # fmt: skip
            ]
        },
        "mlserver": {"errors": ["start: boom"]},
    }
    lines = bench.format_openloop_table(servers).splitlines()
    assert "p99 ms" in lines[0] and len(lines) == 5
    assert lines[2].split() == ["batchwire", "500", "500", "0.40", "1.60", "0"]
    assert lines[3].split() == ["batchwire", "3000", "2100", "-", "-", "2", "generator", "lagged"]
    assert lines[4].split()[:2] == ["bare", "500"]


def test_bare_server_starts_answers_correctly_and_stops(tmp_path: Path) -> None:
    server = launch.start_server(launch.server_spec("bare"), tmp_path, ready_timeout_s=60)
    try:
        assert server.address.startswith("127.0.0.1:")
        launch.check_mlp64(server.address)
    finally:
        code = launch.stop_server(server, timeout_s=10)
    assert code == 0
