"""The CPU lane through a real server: small requests skip the queue, large ones batch."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import yaml

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import ServerProcess, start_server
from trainer.mlp64 import create_mlp64, mlp64_weights


@pytest.fixture(scope="module", params=[False, True], ids=["pool", "inline"])
def lane_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("lanes")
    create_mlp64(repository)
    config_path = repository / "mlp64" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["cpu_lane"] = {"max_samples": 4, "instances": 1, "inline": request.param}
    config_path.write_text(yaml.safe_dump(config))
    server = start_server(repository, repository / "server.log")
    try:
        yield server
    finally:
        assert server.terminate() == 0


def infer(stub: pb_grpc.GRPCInferenceServiceStub, x: np.ndarray) -> tuple[np.ndarray, str]:
    request = pb.ModelInferRequest(model_name="mlp64")
    request.inputs.add(name="INPUT", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    response = stub.ModelInfer(request)
    y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(x.shape)
    return y, response.parameters["batchwire_lane"].string_param


def test_small_requests_take_the_cpu_lane_and_large_ones_the_batcher(
    lane_server: ServerProcess,
) -> None:
    weights = mlp64_weights(0)
    rng = np.random.default_rng(1)
    with grpc.insecure_channel(lane_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for n, lane in ((1, "cpu"), (4, "cpu"), (5, "batched"), (64, "batched")):
            x = rng.standard_normal((n, 64)).astype(np.float32)
            y, got = infer(stub, x)
            assert got == lane, f"batch of {n}"
            np.testing.assert_allclose(y, np.maximum(x @ weights, 0), rtol=1e-5, atol=1e-5)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp64")).model_stats[0]
        assert stats.inference_stats.success.count == 4
        assert stats.inference_count == 1 + 4 + 5 + 64
        assert stats.execution_count == 4  # two lane runs + two batches
        assert {b.batch_size for b in stats.batch_stats} == {5, 64}  # what the batcher ran
