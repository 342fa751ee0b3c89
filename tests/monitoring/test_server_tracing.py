"""End to end: a real server exports its spans over OTLP/gRPC to a receiver in this test."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from loadtests.otlp_sink import OtlpSink
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import ServerProcess, start_server

pytestmark = pytest.mark.timeout(180)

METHOD = "inference.GRPCInferenceService/ModelInfer"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
N_REQUESTS = 24


@pytest.fixture(scope="module")
def sink() -> Iterator[OtlpSink]:
    receiver = OtlpSink()
    try:
        yield receiver
    finally:
        receiver.stop()


@pytest.fixture(scope="module")
def traced_server(
    digits_repository: Path, sink: OtlpSink, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("traced") / "server.log"
    server = start_server(
        digits_repository, log, "--trace-sampling", "1", "--otlp-endpoint", sink.endpoint
    )
    try:
        yield server
    finally:
        assert server.terminate() == 0


def request(images: np.ndarray, request_id: str) -> pb.ModelInferRequest:
    out = pb.ModelInferRequest(model_name="digits", id=request_id)
    out.inputs.add(name="INPUT", datatype="FP32", shape=images.shape)
    out.raw_input_contents.append(images.astype(np.float32).tobytes())
    return out


def test_spans_arrive_over_otlp_with_parents_children_and_batch_links(
    traced_server: ServerProcess, sink: OtlpSink
) -> None:
    rng = np.random.default_rng(0)
    with grpc.insecure_channel(traced_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def call(i: int) -> None:
            parent = f"{i + 1:016x}"
            stub.ModelInfer(
                request(rng.random((2, 1, 8, 8)) * 16, f"r{i}"),
                metadata=[("traceparent", f"00-{TRACE_ID}-{parent}-01")],
                timeout=30,
            )

        # Concurrent calls so that batches hold several requests.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(call, range(N_REQUESTS)))
        with pytest.raises(grpc.RpcError) as bad:
            stub.ModelInfer(request(np.zeros((1, 1, 16, 16)), "bad"), timeout=30)
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    def complete(spans: list[dict[str, Any]]) -> bool:
        servers = [s for s in spans if s["name"] == METHOD]
        linked = sum(len(s["links"]) for s in spans if s["name"] == "batch")
        return len(servers) == N_REQUESTS + 1 and linked == N_REQUESTS

    spans = sink.wait_for(complete, timeout_s=60)
    servers = {s["attributes"]["batchwire.request.id"]: s for s in spans if s["name"] == METHOD}
    for i in range(N_REQUESTS):
        server = servers[f"r{i}"]
        assert server["trace_id"] == TRACE_ID
        assert server["parent_span_id"] == f"{i + 1:016x}"  # continued the traceparent
        assert server["kind"] == 2  # SPAN_KIND_SERVER
        attrs = server["attributes"]
        assert attrs["rpc.system.name"] == "grpc" and attrs["rpc.method"] == METHOD
        assert attrs["rpc.response.status_code"] == "OK"
        assert attrs["batchwire.model.name"] == "digits" and attrs["batchwire.lane"] == "batched"
        assert server["resource"]["service.name"] == "batchwire"
        children = {s["name"]: s for s in spans if s["parent_span_id"] == server["span_id"]}
        assert set(children) == {"decode", "queue", "encode"}
        for child in children.values():
            assert server["start_ns"] <= child["start_ns"] <= child["end_ns"] <= server["end_ns"]
    rejected = servers["bad"]
    assert rejected["attributes"]["rpc.response.status_code"] == "INVALID_ARGUMENT"
    assert rejected["attributes"]["rpc.grpc.status_code"] == 3

    # Every request is linked from exactly one batch span, whose size adds up its members.
    by_span_id = {s["span_id"]: s for s in servers.values()}
    seen: list[str] = []
    batches = [s for s in spans if s["name"] == "batch"]
    for batch in batches:
        members = [by_span_id[link["span_id"]] for link in batch["links"]]
        seen.extend(m["span_id"] for m in members)
        samples = sum(link["attributes"]["batchwire.request.samples"] for link in batch["links"])
        assert batch["attributes"]["batchwire.batch.size"] == samples
        assert batch["attributes"]["batchwire.batch.requests"] == len(members)
        engine = [s for s in spans if s["parent_span_id"] == batch["span_id"]]
        assert [s["name"] for s in engine] == ["engine"]
        for member in members:  # the batch ran while its members waited for it
            assert member["start_ns"] <= batch["start_ns"] <= batch["end_ns"] <= member["end_ns"]
    assert sorted(seen) == sorted(s["span_id"] for s in servers.values() if s is not rejected)
    assert max(b["attributes"]["batchwire.batch.requests"] for b in batches) > 1
