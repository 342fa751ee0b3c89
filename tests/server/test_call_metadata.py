"""`InferenceHandlers`: with tracing, a call's metadata reaches the servicer from grpc's own
handler lookup (no second `invocation_metadata()` build), and `traceparent` still works."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from server.servicer import CALL_METADATA, InferenceHandlers, call_metadata
from tests.support import start_traced_mlp64

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


@pytest.mark.asyncio
async def test_traced_calls_take_their_metadata_from_the_handler_lookup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up: list[tuple[str, Any]] = []
    service = InferenceHandlers.service

    def counting(self: InferenceHandlers, details: Any) -> Any:
        looked_up.append((details.method, details.invocation_metadata))
        handler = service(self, details)
        # What the lookup kept is what the servicer reads: mark it (the parent span id's
        # first digits become "ff"), and the spans show the mark.
        kept = CALL_METADATA.get()
        assert kept is details.invocation_metadata
        CALL_METADATA.set(
            tuple((k, f"{v[:36]}ff{v[38:]}" if k == "traceparent" else v) for k, v in kept)
        )
        return handler

    monkeypatch.setattr(InferenceHandlers, "service", counting)
    server, spans_file = await start_traced_mlp64(tmp_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for i, samples in enumerate([1, 1, 64]):  # the inline lane, then the batcher
                request = pb.ModelInferRequest(model_name="mlp64", id=f"r{i}")
                request.inputs.add(name="INPUT", datatype="FP32", shape=[samples, 64])
                request.raw_input_contents.append(np.full((samples, 64), 0.5, "f4").tobytes())
                parent = f"{i + 1:016x}"
                await stub.ModelInfer(
                    request, metadata=[("traceparent", f"00-{TRACE_ID}-{parent}-01")]
                )
            assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    finally:
        await server.stop(1.0)
    methods = [method for method, _ in looked_up]
    assert methods == ["/inference.GRPCInferenceService/ModelInfer"] * 3 + [
        "/inference.GRPCInferenceService/ServerLive"
    ]
    spans = [json.loads(line) for line in spans_file.read_text().splitlines()]
    servers = {s["attributes"]["batchwire.request.id"]: s for s in spans if s["kind"] == "SERVER"}
    assert sorted(servers) == ["r0", "r1", "r2"]
    for i in range(3):
        assert servers[f"r{i}"]["trace_id"] == TRACE_ID
        assert servers[f"r{i}"]["parent_span_id"] == f"ff{i + 1:014x}"
    assert {servers[f"r{i}"]["attributes"].get("batchwire.lane") for i in range(3)} == {
        "cpu", "batched"
    }  # fmt: skip


def test_call_metadata_falls_back_to_the_context() -> None:
    """Without `InferenceHandlers` (the servicer registered directly, or called by hand),
    the context builds the metadata; with them, what the lookup kept is used."""

    class Context:
        def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
            return (("from", "context"),)

    assert call_metadata(Context()) == (("from", "context"),)  # type: ignore[arg-type]
    token = CALL_METADATA.set((("from", "lookup"),))
    try:
        assert call_metadata(Context()) == (("from", "lookup"),)  # type: ignore[arg-type]
    finally:
        CALL_METADATA.reset(token)
