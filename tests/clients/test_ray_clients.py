"""`tritonclient` and `perf_analyzer` against `batchwire serve --ray`, exactly as against
the plain front door: the plain front door's tritonclient tests, re-run on the Ray one.

`batchwire serve --ray` runs as a subprocess (this process must not import `protos`; see
test_tritonclient.py), which also checks the command: it starts a local Ray, prints its
`serving on` line, and on SIGTERM shuts Serve and Ray down and exits 0. Left out: streaming
and repository load/unload (not served by the Ray front door), and the message-size and
wire-format tests (they do not involve a server).
"""

from __future__ import annotations

import os
import queue
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="needs ray[serve] (the dev extra installs it)")

import tritonclient.grpc as grpcclient  # noqa: E402

from loadtests.perf_analyzer import (  # noqa: E402
    DEFAULT_TOOL,
    PERF_ANALYZER_TIMEOUT_S,
    parse_report,
    perf_analyzer_command,
)
from tests.clients.test_tritonclient import (  # noqa: E402, F401 - fixtures and tests, collected here
    client,
    images,
    make_input,
    test_bad_input_status_codes,
    test_batch_and_requested_outputs,
    test_functionality_fixed_digits_get_the_right_class,
    test_server_and_model_state,
    test_statistics,
)
from tests.support import ROOT, free_port  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

START_TIMEOUT_S = 180.0


@dataclass
class RayServer:
    """A `batchwire serve --ray` process and its gRPC address."""

    process: subprocess.Popen[str]
    port: int
    log_path: Path
    temp_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def ray_processes(temp_dir: Path) -> list[int]:
    """PIDs of the processes of the Ray session kept in `temp_dir` (GCS, raylet, workers)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(str(temp_dir) in part for part in proc.info["cmdline"] or ()):
                found.append(proc.info["pid"])
        except psutil.Error:
            continue
    return found


@pytest.fixture(scope="module")
def server_process(
    digits_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RayServer]:
    """`batchwire serve --ray` on the digits repository (one replica), stopped by SIGTERM."""
    log_path = tmp_path_factory.mktemp("ray_log") / "serve.log"
    # NOTE: a short path: Ray's unix sockets live in it (107-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="bw-ray-cli-"))
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", BATCHWIRE_RAY_TMPDIR=str(temp_dir))
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "batchwire", "serve", "--ray", "--model-repository",
             str(digits_repository), "--port", str(port), "--ray-http-port", str(free_port()),
             "--ray-num-cpus", "2"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
        )  # fmt: skip
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    ready = selector.select(timeout=START_TIMEOUT_S)
    line = process.stdout.readline() if ready else ""
    selector.close()
    server = RayServer(process, port, log_path, temp_dir)
    try:
        assert f"serving on 127.0.0.1:{port} models: digits" in line, log_path.read_text()[-3000:]
        yield server
    finally:
        session = ray_processes(temp_dir)
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        # The command owned its Ray: every process of that session is gone with it.
        deadline = time.monotonic() + 30
        while ray_processes(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = ray_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert code == 0, log_path.read_text()[-3000:]
        assert session, "found no Ray processes of the session while it served"
        assert not left, f"Ray processes left after SIGTERM: {left}"


def test_async_infer(
    client: grpcclient.InferenceServerClient,  # noqa: F811 - the imported fixture
    images: tuple[np.ndarray, np.ndarray],  # noqa: F811
) -> None:
    x = images[0]
    expected = client.infer("digits", [make_input(x[:1])]).as_numpy("LABEL")
    done: queue.Queue[tuple[object, object]] = queue.Queue()
    client.async_infer(
        "digits", [make_input(x[:1])], lambda result, error: done.put((result, error))
    )
    result, error = done.get(timeout=60)
    assert error is None
    np.testing.assert_array_equal(result.as_numpy("LABEL"), expected)  # type: ignore[attr-defined]


@pytest.mark.skipif(
    not DEFAULT_TOOL.exists(), reason="perf_analyzer is not installed: make perf-analyzer"
)
def test_perf_analyzer_measures_the_ray_front_door(
    server_process: RayServer, tmp_path: Path
) -> None:
    # perf_analyzer reads ModelMetadata and ModelConfig first, then ModelStatistics
    # around each window: all of them must answer as on the plain front door. This checks
    # that it works, not how fast: a loose stability bound (-s 1000) so that a busy box
    # cannot fail it (the benchmarks use -s 50).
    report = tmp_path / "report.csv"
    cmd = perf_analyzer_command(
        DEFAULT_TOOL, server_process.address, 4, 1000, report, model="digits"
    )
    cmd[cmd.index("-s") + 1] = "1000"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PERF_ANALYZER_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = parse_report(report.read_text(), proc.stdout)
    assert result["throughput_infer_s"] > 0
    assert result["p99_us"] >= result["p50_us"] > 0
    # Server-side counts from ModelStatistics: the batcher ran (at least one request each).
    assert result["mean_batch_size"] is not None and result["mean_batch_size"] >= 1.0
