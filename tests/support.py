"""Test support: a real `batchwire serve` process on 127.0.0.1:0, or a traced in-process
server (no protobuf imports at import time)."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 120.0


def free_port() -> int:
    """A port free on 127.0.0.1 right now (for servers that cannot bind port 0, e.g. Ray's
    gRPC proxy; another process could take it before they bind, which is rare here)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A `batchwire serve` subprocess and the address it listens on."""

    process: subprocess.Popen[str]
    port: int
    log_path: Path
    metrics_port: int | None = None
    """Port of its /metrics endpoint (None with --no-metrics / --no-monitoring)."""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def terminate(self, timeout_s: float = 60.0) -> int:
        """Send SIGTERM and wait for the exit code (kills only if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def start_server(repository: Path, log_path: Path, *extra: str) -> ServerProcess:
    """Start `python -m batchwire serve --port 0` and wait for its 'serving on' line."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "batchwire", "serve", "--model-repository", str(repository),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    # NOTE: blocks on the pipe until the server prints its one stdout line (or exits).
    ready = selector.select(timeout=START_TIMEOUT_S)
    line = process.stdout.readline() if ready else ""
    selector.close()
    if "serving on" not in line:
        process.kill()
        process.wait()
        raise RuntimeError(f"server did not start: {line!r}\n{log_path.read_text()}")
    port = int(line.split()[3].rsplit(":", 1)[1])
    metrics = (
        line.split("metrics on http://", 1)[1].split("/", 1)[0] if "metrics on" in line else ""
    )
    return ServerProcess(
        process, port, log_path, int(metrics.rsplit(":", 1)[1]) if metrics else None
    )


async def start_traced_mlp64(work: Path) -> tuple[Any, Path]:
    """An in-process server (`server.app.start_server`, port 0, no metrics endpoint) of
    mlp64 with a drift block (`mlp64_with_drift`, under `work`), tracing every request to
    `work/spans.jsonl`: the running server (the caller stops it) and that file."""
    from loadtests.monitoring_overhead import mlp64_with_drift
    from monitoring.hub import MonitoringSettings
    from monitoring.tracing import TracingSettings
    from server.app import ServeSettings, start_server

    repository, spans_file = work / "repo", work / "spans.jsonl"
    mlp64_with_drift(repository, work / "inputs.json")
    monitoring = MonitoringSettings(
        metrics_port=None, tracing=TracingSettings(sampling_ratio=1.0, trace_file=spans_file)
    )
    server = await start_server(
        ServeSettings(model_repository=repository, port=0, monitoring=monitoring)
    )
    return server, spans_file
