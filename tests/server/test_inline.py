"""The inline fast path answers exactly as the general path does, or steps aside."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio

from batchwire.errors import ErrorCode, InferenceError
from protos import grpc_service_pb2 as pb
from server.codec import decode_request, encode_response
from server.inline import InlinePath
from server.runtime import ModelRuntime, ModelVersion
from trainer.mlp64 import CPU_LANE_MAX_SAMPLES, create_mlp64


@pytest_asyncio.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[ModelRuntime]:
    create_mlp64(tmp_path)
    served = ModelRuntime(tmp_path)
    await served.start()
    try:
        yield served
    finally:
        await served.close()


def request(x: np.ndarray, **fields: object) -> pb.ModelInferRequest:
    out = pb.ModelInferRequest(model_name="mlp64", id="r1")
    out.inputs.add(name="INPUT", datatype="FP32", shape=x.shape)
    out.raw_input_contents.append(x.tobytes())
    for name, value in fields.items():
        setattr(out, name, value)
    return out


def fast_path(runtime: ModelRuntime) -> tuple[ModelVersion, InlinePath]:
    """mlp64's version and its fast path."""
    model = runtime.get("mlp64")
    path = InlinePath.of(model)
    assert path is not None and model.lane is not None
    return model, path


async def general(runtime: ModelRuntime, message: pb.ModelInferRequest) -> pb.ModelInferResponse:
    decoded = decode_request(message, None)
    return encode_response(await runtime.infer(message.model_name, "", decoded))


@pytest.mark.asyncio
async def test_a_valid_request_gets_the_general_paths_answer_and_counts(
    runtime: ModelRuntime,
) -> None:
    model, path = fast_path(runtime)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    fast = path.infer(request(x))
    assert fast is not None
    assert fast == await general(runtime, request(x))  # same message, byte for byte
    assert fast.parameters["batchwire_lane"].string_param == "cpu"
    assert model.stats.lane_requests["cpu"] == 2 and model.stats.success.count == 2
    assert model.lane is not None and model.lane.samples_total == 6
    # Request parameters change nothing on the lane (perf_analyzer sends one with each call).
    message = request(x)
    message.parameters["triton_enable_empty_final_response"].bool_param = True
    message.parameters["priority"].int64_param = 1
    assert path.infer(message) == fast
    # Requested outputs are honoured like the general path does.
    message = request(x)
    message.outputs.add(name="OUTPUT")
    answer = path.infer(message)
    assert answer is not None and [o.name for o in answer.outputs] == ["OUTPUT"]


def _typed_contents(m: pb.ModelInferRequest) -> None:
    del m.raw_input_contents[:]
    m.inputs[0].contents.fp32_contents.extend([0.0] * 64)


def _shape(dims: list[int]) -> Callable[[pb.ModelInferRequest], None]:
    def edit(m: pb.ModelInferRequest) -> None:
        del m.inputs[0].shape[:]
        m.inputs[0].shape.extend(dims)

    return edit


def _second_input(m: pb.ModelInferRequest) -> None:
    m.inputs.add(name="EXTRA", datatype="FP32", shape=[1, 64])
    m.raw_input_contents.append(np.zeros((1, 64), np.float32).tobytes())


STEP_ASIDE: dict[str, tuple[Callable[[pb.ModelInferRequest], object], ErrorCode | None]] = {
    "typed contents": (_typed_contents, None),
    "another datatype": (
        lambda m: setattr(m.inputs[0], "datatype", "FP64"),
        ErrorCode.INVALID_INPUT,
    ),
    "an unknown input": (lambda m: setattr(m.inputs[0], "name", "X"), ErrorCode.INVALID_INPUT),
    "a second input": (_second_input, ErrorCode.INVALID_INPUT),
    "a wrong width": (_shape([1, 32]), ErrorCode.INVALID_INPUT),
    "a negative dimension": (_shape([-1, 64]), ErrorCode.INVALID_INPUT),
    "a short buffer": (
        lambda m: m.raw_input_contents.__setitem__(0, b"\0" * 8),
        ErrorCode.INVALID_INPUT,
    ),
    "an unknown output": (lambda m: m.outputs.add(name="NOPE"), ErrorCode.INVALID_INPUT),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", sorted(STEP_ASIDE))
async def test_anything_else_steps_aside_before_any_work(runtime: ModelRuntime, case: str) -> None:
    model = runtime.get("mlp64")
    path = InlinePath.of(model)
    assert path is not None
    message = request(np.ones((1, 64), np.float32))
    edit, error = STEP_ASIDE[case]
    edit(message)
    assert path.infer(message) is None
    assert model.stats.success.count == model.stats.fail.count == 0
    assert model.lane is not None and model.lane.requests_total == 0
    if error is not None:  # and the general path produces the precise error
        with pytest.raises(InferenceError) as raised:
            await general(runtime, message)
        assert raised.value.code is error


@pytest.mark.asyncio
async def test_requests_larger_than_the_lane_go_to_the_batcher(runtime: ModelRuntime) -> None:
    path = InlinePath.of(runtime.get("mlp64"))
    assert path is not None
    x = np.zeros((CPU_LANE_MAX_SAMPLES + 1, 64), np.float32)
    assert path.infer(request(x)) is None
    assert (await general(runtime, request(x))).parameters["batchwire_lane"].string_param == (
        "batched"
    )


@pytest.mark.asyncio
async def test_a_closing_model_steps_aside(runtime: ModelRuntime) -> None:
    model = runtime.get("mlp64")
    path = InlinePath.of(model)
    assert path is not None
    await model.batcher.close(drain=True)
    assert path.infer(request(np.zeros((1, 64), np.float32))) is None


class LaneRecorder:
    """An observer wanting one CPU-lane request in `gap`."""

    def __init__(self, gap: int = 1) -> None:
        self.seen: list[tuple[np.ndarray, np.ndarray]] = []
        self.gap = gap
        self.lane_countdown = 1

    def on_batch(self, batch: object) -> None:
        pass

    def on_lane(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
        self.lane_countdown = self.gap
        self.seen.append((inputs["INPUT"], outputs["OUTPUT"]))


class FailingEngine:
    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError("boom")


@pytest.mark.asyncio
async def test_the_observer_sees_lane_requests_and_engine_failures_are_counted(
    runtime: ModelRuntime,
) -> None:
    model, path = fast_path(runtime)
    recorder = LaneRecorder()
    model.observer = recorder  # drift monitoring watches CPU-lane requests through this
    x = np.full((2, 64), 0.5, np.float32)
    before_ns = time.monotonic_ns()
    answer = path.infer(request(x))
    assert answer is not None and len(recorder.seen) == 1
    np.testing.assert_array_equal(recorder.seen[0][0], x)
    # The lane call's times and size, for the front door's trace spans.
    assert before_ns <= path.compute_start_ns <= path.compute_end_ns <= time.monotonic_ns()
    assert path.samples == 2
    model.lane.engines[0] = FailingEngine()  # type: ignore[call-overload]
    with pytest.raises(InferenceError) as raised:
        path.infer(request(x))
    assert path.compute_start_ns == path.compute_end_ns == path.samples == 0
    assert raised.value.code is ErrorCode.INTERNAL
    assert model.stats.fail.count == 1 and model.stats.failures == {"INTERNAL": 1}


@pytest.mark.asyncio
@pytest.mark.parametrize("inline", [True, False], ids=["fast path", "general path"])
async def test_the_lane_calls_the_observer_when_its_countdown_runs_out(
    runtime: ModelRuntime, inline: bool
) -> None:
    """Both ways onto the lane skip the requests the observer's countdown leaves out."""
    model, path = fast_path(runtime)
    recorder = LaneRecorder(gap=3)
    model.observer = recorder
    xs = [np.full((1, 64), i, np.float32) for i in range(8)]
    for x in xs:
        if inline:
            assert path.infer(request(x)) is not None
        else:
            await general(runtime, request(x))
    assert model.stats.lane_requests["cpu"] == 8
    assert [int(seen[0][0, 0]) for seen in recorder.seen] == [0, 3, 6]
    assert recorder.lane_countdown == 2  # the 8th request was the first of the next 3


class ReshapingEngine:
    """Answers with another datatype and a renamed output: what a template cannot cover."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["INPUT"]
        return {"OUTPUT": np.zeros((len(x), 3), np.float64)}


@pytest.mark.asyncio
async def test_response_templates_give_each_request_its_own_outputs(
    runtime: ModelRuntime,
) -> None:
    model, path = fast_path(runtime)
    rng = np.random.default_rng(1)
    # The second request of a size reuses the first's template; sizes have their own.
    for rows in (1, 1, 2, 1, 2):
        x = rng.standard_normal((rows, 64)).astype(np.float32)
        message = request(x, id=f"r{rows}-{rng.integers(1000)}")
        fast = path.infer(message)
        assert fast is not None and fast == await general(runtime, message)
        assert len(fast.raw_output_contents) == 1 and fast.id == message.id
    # An engine whose outputs no longer match a template gets metadata built afresh.
    model.lane.engines[0] = ReshapingEngine()  # type: ignore[call-overload]
    answer = path.infer(request(np.ones((1, 64), np.float32)))
    assert answer is not None
    assert [(o.datatype, list(o.shape)) for o in answer.outputs] == [("FP64", [1, 3])]
    assert answer.raw_output_contents[0] == np.zeros((1, 3), np.float64).tobytes()


class Context:
    """The parts of a grpc.aio ServicerContext that ModelInfer reads."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = metadata

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def done(self) -> bool:
        return False


@pytest.mark.asyncio
async def test_fast_path_requests_are_traced_and_feed_the_slo(tmp_path: Path) -> None:
    from monitoring.hub import Monitoring, MonitoringSettings
    from monitoring.tracing import TracingSettings
    from server.servicer import InferenceServicer

    create_mlp64(tmp_path / "repo")
    trace_file = tmp_path / "spans.jsonl"
    monitoring = Monitoring(
        MonitoringSettings(metrics_port=None, tracing=TracingSettings(trace_file=trace_file))
    )
    served = ModelRuntime(
        tmp_path / "repo", observer_factory=monitoring.observer_factory, on_load=monitoring.on_load
    )
    await served.start()
    await monitoring.start(served)
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        servicer = InferenceServicer(served, monitoring)
        context = Context((("traceparent", f"00-{trace_id}-{parent}-01"),))
        x = np.ones((2, 64), np.float32)
        answer = await servicer.ModelInfer(request(x), context)
        assert answer.parameters["batchwire_lane"].string_param == "cpu"
        assert served.get("mlp64").stats.lane_requests["cpu"] == 1  # it took the fast path
    finally:
        await monitoring.close()  # ships the spans
        await served.close()
    # The SLO monitor's span processor saw it (from the shipper thread).
    assert monitoring.slo.snapshot()["mlp64"]["slis"]["availability"]["events"] == 1
    rows = [json.loads(line) for line in trace_file.read_text().splitlines()]
    server = next(r for r in rows if r["kind"] == "SERVER")
    assert server["trace_id"] == trace_id and server["parent_span_id"] == parent
    attributes = server["attributes"]
    assert attributes["batchwire.lane"] == "cpu" and attributes["batchwire.request.samples"] == 2
    assert attributes["rpc.response.status_code"] == "OK"
    children = {r["name"]: r for r in rows if r["parent_span_id"] == server["span_id"]}
    assert set(children) == {"decode", "engine", "encode"}
    spans = [children["decode"], children["engine"], children["encode"]]
    for earlier, later in itertools.pairwise(spans):
        assert earlier["end_ns"] <= later["start_ns"]
    assert server["start_ns"] == spans[0]["start_ns"] and spans[-1]["end_ns"] == server["end_ns"]


class AbortingContext(Context):
    """Raises at `abort`, as grpc.aio does, keeping the status code."""

    code: grpc.StatusCode | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code = code
        raise grpc.aio.AbortError(details)


@pytest.mark.asyncio
async def test_fast_path_requests_feed_the_slo_without_tracing(tmp_path: Path) -> None:
    """Tracing off: a success goes to the model's SLO feed (kept on its fast path), a
    failure is recorded with its status, and a request the fast path steps aside from is
    counted once, by the general path."""
    from monitoring.hub import Monitoring, MonitoringSettings
    from server.servicer import InferenceServicer

    create_mlp64(tmp_path / "repo")
    monitoring = Monitoring(MonitoringSettings(metrics_port=None))
    served = ModelRuntime(
        tmp_path / "repo", observer_factory=monitoring.observer_factory, on_load=monitoring.on_load
    )
    await served.start()
    await monitoring.start(served)

    def slis() -> tuple[int, int, int]:
        state = monitoring.slo.snapshot()["mlp64"]["slis"]
        availability, latency = state["availability"], state["latency"]
        return availability["events"], availability["bad_events"], latency["events"]

    try:
        servicer = InferenceServicer(served, monitoring)
        ok = request(np.ones((2, 64), np.float32))
        await servicer.ModelInfer(ok, Context())
        await servicer.ModelInfer(ok, Context())
        assert slis() == (2, 0, 2)
        path = servicer._inline_path(ok)
        assert path is not None and path.slo_feed is monitoring.slo.ok_feeds["mlp64"]
        # Too many samples for the lane: the general path serves and counts it.
        big = request(np.ones((path._max_samples + 1, 64), np.float32))
        assert path.infer(big) is None
        await servicer.ModelInfer(big, Context())
        assert slis() == (3, 0, 3)
        served.get("mlp64").lane.engines[0] = FailingEngine()  # type: ignore[union-attr,call-overload]
        context = AbortingContext()
        with pytest.raises(grpc.aio.AbortError):
            await servicer.ModelInfer(ok, context)
        assert context.code == grpc.StatusCode.INTERNAL
        assert slis() == (4, 1, 3)  # INTERNAL: against availability only
    finally:
        await monitoring.close()
        await served.close()
