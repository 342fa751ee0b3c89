"""The open-loop generator: Poisson schedule, intended-time latency, and runs on a real server."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from loadtests import openloop
from loadtests.openloop import (
    RunResult,
    build_request,
    check_loopback,
    closed_loop,
    open_loop,
    poisson_arrivals_ns,
    run_closed_loop,
    run_open_loop,
    summarize,
)
from protos import grpc_service_pb2 as pb
from tests.support import ServerProcess

MS = 1_000_000


# --------------------------------------------------------------------------- fakes


class FakeClock:
    """A nanosecond clock that moves only when the generator sleeps (or a fake stalls)."""

    def __init__(self) -> None:
        self.now_ns = 0
        self._timers: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> int:
        return self.now_ns

    def call_at(self, when_ns: int, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (when_ns, next(self._seq), callback))

    async def sleep(self, seconds: float) -> None:
        # NOTE: let callbacks already due run at the current time before time moves on.
        await asyncio.sleep(0)
        target = self.now_ns + round(seconds * 1e9)
        while self._timers and self._timers[0][0] <= target:
            when, _, callback = heapq.heappop(self._timers)
            self.now_ns = max(self.now_ns, when)
            callback()
        self.now_ns = max(self.now_ns, target)
        await asyncio.sleep(0)


class FakeTransport:
    """Answers at once (on the next loop iteration) unless a stall applies.

    send_stall: (index, ns): starting request `index` blocks the generator for `ns`.
    server_stall: (start_ns, end_ns): requests started in the window are answered at end_ns.
    codes: status of request i is codes(i) (default OK).
    """

    def __init__(
        self,
        clock: FakeClock,
        *,
        send_stall: tuple[int, int] | None = None,
        server_stall: tuple[int, int] | None = None,
        codes: Callable[[int], str] = lambda i: "OK",
    ) -> None:
        self.clock = clock
        self.send_stall = send_stall
        self.server_stall = server_stall
        self.codes = codes
        self.started = 0

    def start(self, on_done: Callable[[str], None]) -> None:
        i = self.started
        self.started += 1
        if self.send_stall is not None and i == self.send_stall[0]:
            self.clock.now_ns += self.send_stall[1]
        code = self.codes(i)
        now = self.clock.now_ns
        if self.server_stall is not None and self.server_stall[0] <= now < self.server_stall[1]:
            self.clock.call_at(self.server_stall[1], partial(on_done, code))
        else:
            asyncio.get_running_loop().call_soon(on_done, code)


def every_ms(count: int) -> list[int]:
    return [k * MS for k in range(count)]


def latencies_ms(result: RunResult) -> np.ndarray:
    return (result.end_ns - result.intended_ns) / MS


def to_result(recorder: object, offered_rps: float = 1000.0) -> RunResult:
    return recorder.result("open", offered_rps, None, 0.1, 0)  # type: ignore[attr-defined,no-any-return]


# --------------------------------------------------------------------------- schedule


def test_poisson_schedule_has_the_requested_mean_and_exponential_gaps() -> None:
    rate_rps, duration_s = 1000.0, 100.0
    offsets = np.fromiter(
        poisson_arrivals_ns(rate_rps, duration_s, np.random.default_rng(7)), dtype=np.int64
    )
    gaps = np.diff(offsets, prepend=0)
    assert np.all(gaps >= 0) and offsets[-1] < duration_s * 1e9
    assert offsets.size == pytest.approx(rate_rps * duration_s, rel=0.02)
    assert gaps.mean() == pytest.approx(1e9 / rate_rps, rel=0.02)
    # Exponential gaps: standard deviation equals the mean (coefficient of variation 1).
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)


def test_poisson_schedule_is_seeded_and_capped() -> None:
    def first(seed: int) -> list[int]:
        return list(poisson_arrivals_ns(500.0, 10.0, np.random.default_rng(seed), 50))

    assert first(3) == first(3) != first(4)
    assert len(first(3)) == 50
    assert list(poisson_arrivals_ns(1e6, 10.0, np.random.default_rng(0), 0)) == []
    with pytest.raises(ValueError):
        next(poisson_arrivals_ns(0.0, 1.0, np.random.default_rng(0)))


# --------------------------------------------------------------------------- accounting


@pytest.mark.asyncio
async def test_a_stalled_send_counts_in_the_latency_of_requests_scheduled_during_it() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock, send_stall=(10, 50 * MS))  # request 10 blocks 50 ms
    recorder = await open_loop(
        transport, every_ms(100), drain_timeout_s=5.0, clock=clock, sleep=clock.sleep
    )
    result = to_result(recorder)
    latency = latencies_ms(result)
    expected = np.zeros(100)
    expected[10] = 50.0  # the stalled send itself
    expected[11:61] = 60.0 - np.arange(11, 61)  # scheduled during the stall, sent at 60 ms
    np.testing.assert_allclose(latency, expected)
    # Measured from the actual send, the same requests look instant: coordinated omission.
    service_ms = (result.end_ns - result.sent_ns) / MS
    assert service_ms[11:61].max() == 0.0
    summary = summarize(result)
    assert summary["ok"] == 100 and summary["errors"] == {}
    assert summary["send_lag_ms"]["max"] == pytest.approx(49.0)
    assert summary["generator_lagged"] is True
    assert summary["latency_ms"]["max"] == pytest.approx(50.0)


@pytest.mark.asyncio
async def test_a_stalled_server_counts_in_the_latency_and_sending_goes_on() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock, server_stall=(20 * MS, 70 * MS))
    recorder = await open_loop(
        transport, every_ms(100), drain_timeout_s=5.0, clock=clock, sleep=clock.sleep
    )
    result = to_result(recorder)
    expected = np.zeros(100)
    expected[20:70] = 70.0 - np.arange(20, 70)
    np.testing.assert_allclose(latencies_ms(result), expected)
    # The schedule was kept while the server stalled: open loop, no send lag.
    np.testing.assert_array_equal(result.sent_ns, result.intended_ns)
    summary = summarize(result)
    assert summary["send_lag_ms"]["max"] == 0.0 and summary["generator_lagged"] is False
    p = summary["latency_ms"]
    assert p["p50"] <= p["p90"] <= p["p99"] <= p["p99.9"] <= p["max"] == 50.0


@pytest.mark.asyncio
async def test_errors_are_counted_by_status_and_left_out_of_latency() -> None:
    clock = FakeClock()
    transport = FakeTransport(
        clock,
        server_stall=(0, 30 * MS),
        codes=lambda i: "DEADLINE_EXCEEDED" if i < 30 else "OK",
    )
    recorder = await open_loop(
        transport, every_ms(100), drain_timeout_s=5.0, clock=clock, sleep=clock.sleep
    )
    summary = summarize(to_result(recorder))
    assert summary["requests"] == 100 and summary["ok"] == 70
    assert summary["errors"] == {"DEADLINE_EXCEEDED": 30}
    assert summary["latency_ms"]["max"] == 0.0  # only OK responses, all instant


@pytest.mark.asyncio
async def test_closed_loop_workers_send_back_to_back_up_to_the_cap() -> None:
    clock = FakeClock()
    transport = FakeTransport(clock)
    recorder = await closed_loop(
        transport, 4, duration_s=3600.0, max_requests=40, drain_timeout_s=5.0, clock=clock
    )
    result = recorder.result("closed", None, 4, 3600.0, 0)
    assert transport.started == 40
    summary = summarize(result)
    assert summary["ok"] == 40 and summary["concurrency"] == 4


# --------------------------------------------------------------------------- request, address


def test_build_request_fills_the_metadata_shapes_with_seeded_data() -> None:
    metadata = pb.ModelMetadataResponse(
        name="m",
        inputs=[
            pb.ModelMetadataResponse.TensorMetadata(name="X", datatype="FP32", shape=[-1, 1, 8, 8]),
            pb.ModelMetadataResponse.TensorMetadata(name="N", datatype="INT64", shape=[-1, -1]),
        ],
    )
    request = build_request(metadata, "m", batch_size=4, seed=1)
    assert request.model_name == "m"
    assert [list(t.shape) for t in request.inputs] == [[4, 1, 8, 8], [4, 1]]
    x = np.frombuffer(request.raw_input_contents[0], dtype="<f4")
    n = np.frombuffer(request.raw_input_contents[1], dtype="<i8")
    assert x.size == 4 * 64 and n.size == 4
    assert x.min() >= 0.0 and x.max() <= 16.0
    assert n.min() >= 0 and n.max() <= 16
    assert build_request(metadata, "m", 4, seed=1) == request
    assert build_request(metadata, "m", 4, seed=2) != request


@pytest.mark.parametrize(
    "address", ["127.0.0.1:8001", "127.8.9.10:1", "localhost:80", "[::1]:8001"]
)
def test_loopback_addresses_are_accepted(address: str) -> None:
    assert check_loopback(address) == address


@pytest.mark.parametrize(
    "address", ["10.0.0.1:8001", "0.0.0.0:8001", "example.com:443", "[2001:db8::1]:80", "8001"]
)
def test_non_loopback_addresses_are_refused(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValueError):
        check_loopback(address)
    with pytest.raises(ValueError):
        asyncio.run(run_open_loop(address, b"", 10.0, 0.1))
    with pytest.raises(SystemExit) as exc:
        openloop.main(["--address", address, "--model", "digits", "--rate", "10"])
    assert exc.value.code == 2
    assert "address" in capsys.readouterr().err


# --------------------------------------------------------------------------- real server


@pytest.fixture(scope="module")
def digits_request(server_process: ServerProcess) -> pb.ModelInferRequest:
    return build_request(server_process.address, "digits", batch_size=1, seed=0)


@pytest.mark.asyncio
async def test_open_loop_against_the_server_has_no_errors(
    server_process: ServerProcess, digits_request: pb.ModelInferRequest
) -> None:
    result = await run_open_loop(
        server_process.address,
        digits_request,
        200.0,
        1.0,
        max_requests=10_000,
        timeout_s=5.0,
        seed=0,
    )
    summary = summarize(result)
    assert summary["errors"] == {}
    assert summary["ok"] == summary["requests"] > 100
    assert summary["achieved_rps"] > 0.5 * 200.0
    p = summary["latency_ms"]
    assert 0.0 < p["p50"] <= p["p90"] <= p["p99"] <= p["p99.9"] <= p["max"]
    assert summary["service_latency_ms"]["p50"] > 0.0


@pytest.mark.asyncio
async def test_open_loop_stops_at_max_requests(
    server_process: ServerProcess, digits_request: pb.ModelInferRequest
) -> None:
    result = await run_open_loop(
        server_process.address, digits_request, 500.0, 60.0, max_requests=25, timeout_s=5.0, seed=1
    )
    assert summarize(result)["ok"] == result.intended_ns.size == 25


@pytest.mark.asyncio
async def test_closed_loop_against_the_server_runs(
    server_process: ServerProcess, digits_request: pb.ModelInferRequest
) -> None:
    result = await run_closed_loop(
        server_process.address, digits_request, 4, 0.5, max_requests=10_000, timeout_s=5.0
    )
    summary = summarize(result)
    assert summary["errors"] == {} and summary["ok"] > 0
    assert summary["latency_ms"]["p50"] > 0.0


def test_cli_writes_json_and_png(server_process: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    code = openloop.main(
        ["--address", server_process.address, "--model", "digits", "--rates", "100", "200",
         "--duration-s", "0.5", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert [run["offered_rps"] for run in report["runs"]] == [100.0, 200.0]
    for run in report["runs"]:
        assert run["ok"] > 0 and run["errors"] == {}
        assert set(run["latency_ms"]) >= {"p50", "p90", "p99", "p99.9", "max"}
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
