"""End to end through a real server: an injected slow engine fires the SLO page and
recovers; shifted inputs fire the drift alert; normal traffic fires nothing."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from batchwire.config import (
    BurnRateAlertConfig,
    DynamicBatchingConfig,
    ModelConfig,
    SloConfig,
    TensorConfig,
    load_model_config,
    write_model_config,
)
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from tests.support import ServerProcess, start_server
from trainer.data import MAX_INTENSITY, load_digits_split

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

WIDTH = 64
THRESHOLD_MS = 50.0
FAST_PAGE = "14.4x/4s/1s"


class Spin(torch.nn.Module):
    """y = x after `rounds` tanh(y @ W) steps: `rounds` makes the engine as slow as asked."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.eye(WIDTH) * 0.5)

    def forward(self, x: torch.Tensor, rounds: torch.Tensor) -> torch.Tensor:
        y = x
        for _ in range(int(rounds.max())):
            y = torch.tanh(y @ self.w)
        return y


def calibrated_rounds(stub: pb_grpc.GRPCInferenceServiceStub, target_s: float) -> int:
    """Rounds that make the served engine take about `target_s` (the box's speed varies)."""
    rounds = 1000
    for _ in range(6):
        start = time.perf_counter()
        stub.ModelInfer(spin_request(rounds), timeout=60)
        took_s = time.perf_counter() - start
        if took_s >= target_s:
            break
        rounds = int(rounds * min(10.0, 1.2 * target_s / max(took_s, 1e-3)))
    return rounds


@pytest.fixture(scope="module")
def spin_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("spin_repo")
    version = repository / "spin" / "1"
    version.mkdir(parents=True)
    torch.jit.script(Spin()).save(str(version / "model.pt"))
    config = ModelConfig(
        name="spin",
        backend="torchscript",
        max_batch_size=8,
        inputs=[
            TensorConfig(name="X", datatype="FP32", dims=[WIDTH]),
            TensorConfig(name="ROUNDS", datatype="INT64", dims=[1]),
        ],
        outputs=[TensorConfig(name="Y", datatype="FP32", dims=[WIDTH])],
        dynamic_batching=DynamicBatchingConfig(max_queue_delay_us=100),
        slo=SloConfig(
            latency_threshold_ms=THRESHOLD_MS,
            # The default rules with windows shrunk 900x (1 h -> 4 s, 5 min -> 1 s...).
            alerts=[
                BurnRateAlertConfig.model_validate(r)
                for r in (
                    {"severity": "page", "burn_rate": 14.4, "long_window_s": 4,
                     "short_window_s": 1},
                    {"severity": "page", "burn_rate": 6, "long_window_s": 24, "short_window_s": 2},
                    {"severity": "ticket", "burn_rate": 1, "long_window_s": 288,
                     "short_window_s": 24},
                )
            ],
        ),
    )  # fmt: skip
    write_model_config(repository / "spin", config)
    return repository


@pytest.fixture(scope="module")
def spin_server(
    spin_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    server = start_server(spin_repository, tmp_path_factory.mktemp("spin") / "server.log")
    try:
        yield server
    finally:
        assert server.terminate() == 0


def get_json(server: ServerProcess, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}{path}", timeout=10) as r:
        return json.loads(r.read())


def until(condition: Callable[[], bool], work: Callable[[], None], timeout_s: float) -> None:
    """Do `work` repeatedly until `condition` holds (raises after `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        work()


def spin_request(rounds: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="spin")
    request.inputs.add(name="X", datatype="FP32", shape=[1, WIDTH])
    request.inputs.add(name="ROUNDS", datatype="INT64", shape=[1, 1])
    request.raw_input_contents.append(np.ones((1, WIDTH), np.float32).tobytes())
    request.raw_input_contents.append(np.array([[rounds]], np.int64).tobytes())
    return request


def test_slow_engine_fires_the_fast_burn_page_and_recovers(spin_server: ServerProcess) -> None:
    with grpc.insecure_channel(spin_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def fast(n: int = 20) -> None:
            for _ in range(n):
                stub.ModelInfer(spin_request(0), timeout=30)

        def alerts() -> list[dict[str, Any]]:
            return list(get_json(spin_server, "/slo")["spin"]["alerts"])

        # Normal traffic for longer than the long window: nothing fires.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            fast()
            assert alerts() == []
        state = get_json(spin_server, "/slo")["spin"]
        assert state["slis"]["latency"]["bad_events"] == 0
        assert state["recent"]["latency_ms"]["p99"] < THRESHOLD_MS

        # The engine turns slow (3x the threshold): the fast-burn page fires.
        slow_rounds = calibrated_rounds(stub, 3 * THRESHOLD_MS / 1000)
        with ThreadPoolExecutor(2) as pool:

            def slow_burst() -> None:
                list(pool.map(lambda _: stub.ModelInfer(spin_request(slow_rounds), timeout=60),
                              range(4)))  # fmt: skip

            until(lambda: any(a["rule"] == FAST_PAGE for a in alerts()), slow_burst, 60)
        firing = [a for a in alerts() if a["rule"] == FAST_PAGE]
        assert firing[0]["sli"] == "latency" and firing[0]["severity"] == "page"
        with urllib.request.urlopen(
            f"http://127.0.0.1:{spin_server.metrics_port}/metrics", timeout=10
        ) as r:
            metrics = r.read().decode()
        assert (
            'batchwire_slo_alert_firing{model="spin",rule="14.4x/4s/1s",severity="page",'
            'sli="latency"} 1.0' in metrics
        )

        # The engine is fast again: once the short window holds only fast requests, the
        # page resolves (the long window still remembers the burst).
        until(lambda: not any(a["rule"] == FAST_PAGE for a in alerts()), fast, 60)

    events = [
        json.loads(line.split(": ", 1)[1])
        for line in spin_server.log().splitlines()
        if "monitoring.slo" in line and '"slo_alert"' in line
    ]
    page = [e["state"] for e in events if e["rule"] == FAST_PAGE and e["sli"] == "latency"]
    assert page == ["firing", "resolved"]


@pytest.fixture(scope="module")
def digits_server(
    digits_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The trained digits served with every sample joining the drift window
    (`max_samples_per_s: 0`): what the window holds is what the test sent, however fast it
    sends (the sample budget is `tests/monitoring/test_drift.py`'s business)."""
    work = tmp_path_factory.mktemp("drift")
    repository = work / "repository"
    shutil.copytree(digits_repository, repository)
    config = load_model_config(repository / "digits")
    assert config.drift is not None
    drift = config.drift.model_copy(update={"max_samples_per_s": 0})
    write_model_config(repository / "digits", config.model_copy(update={"drift": drift}))
    server = start_server(repository, work / "server.log")
    try:
        yield server
    finally:
        assert server.terminate() == 0


def digits_request(images: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="digits")
    request.inputs.add(name="INPUT", datatype="FP32", shape=images.shape)
    request.raw_input_contents.append(images.astype(np.float32).tobytes())
    return request


def test_shifted_inputs_fire_the_drift_alert_and_rejections_are_counted(
    digits_server: ServerProcess,
) -> None:
    x_test = load_digits_split(0)[1]
    with grpc.insecure_channel(digits_server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def send(images: np.ndarray) -> None:
            for chunk in np.array_split(images, len(images) // 20):
                stub.ModelInfer(digits_request(chunk), timeout=30)

        def drift() -> dict[str, Any]:
            return dict(get_json(digits_server, "/drift")["digits/1"])

        send(x_test)  # 360 held-out digits: above min_samples (200)
        until(lambda: bool(drift()["scores"]), lambda: time.sleep(0.1), 30)
        assert set(drift()["states"].values()) == {"ok"}, drift()

        # Inverted intensities fill the window (2000 samples): the alert fires.
        inverted = MAX_INTENSITY - np.concatenate([x_test] * 6)
        send(inverted)
        until(lambda: drift()["states"].get("INPUT:mean") == "alert", lambda: time.sleep(0.1), 30)
        assert drift()["scores"]["INPUT"] > 0.25

        # A higher resolution is rejected, and counted by reason.
        with pytest.raises(grpc.RpcError) as error:
            stub.ModelInfer(digits_request(np.zeros((1, 1, 16, 16))), timeout=30)
        assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with urllib.request.urlopen(
        f"http://127.0.0.1:{digits_server.metrics_port}/metrics", timeout=10
    ) as r:
        metrics = r.read().decode()
    assert (
        'batchwire_rejected_inputs_total{model="digits",reason="shape",version="1"} 1.0' in metrics
    )
    assert 'batchwire_drift_state{feature="INPUT:mean",model="digits",version="1"} 2.0' in metrics
    assert '"state": "alert"' in digits_server.log()
