"""Start, wait for, check and stop the servers of the side-by-side benchmark.

Five servers serve the same `mlp64` on 127.0.0.1, each from its own environment:

| name | what | environment |
|---|---|---|
| `batchwire` | `python -m batchwire serve --port 0`, a fresh repository | `.venv` |
| `mlserver` | `mlserver_peer.py`: MLServer 1.7.1, adaptive batching | `peers/.venv-mlserver` |
| `pytriton` | `pytriton_peer.py`: Triton's dynamic batcher | `peers/.venv-pytriton` |
| `bare` | `bare_grpc.py`: grpc.aio, no batching, a numpy matmul | `.venv` |
| `bare-ort` | the same, running batchwire's mlp64 ONNX file with ONNX Runtime | `.venv` |

`server_spec` builds a server's command line and environment (pure, unit tested);
`start_server` runs it in a session of its own with its output in a log file, learns its
address, polls ServerReady and ModelReady over gRPC (bounded) and checks one inference
against relu(x @ W); `stop_server` sends SIGTERM, then SIGKILL to its process group after a
bound. This module runs in batchwire's `.venv` (it uses batchwire's stubs to poll).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import grpc
import numpy as np

from loadtests.peers import model

logger = logging.getLogger(__name__)

ROOT: Final = Path(__file__).resolve().parents[2]
PEERS_DIR: Final = Path(__file__).resolve().parent
SERVERS: Final = ("batchwire", "mlserver", "pytriton", "bare", "bare-ort")
#: The virtual environment of each peer that does not run in batchwire's own.
PEER_VENVS: Final = {
    "mlserver": PEERS_DIR / ".venv-mlserver",
    "pytriton": PEERS_DIR / ".venv-pytriton",
}
#: The line batchwire and the bare servicer print on stdout when they serve.
_SERVING_LINE: Final = re.compile(r"serving on (\S+:\d+)")
READY_TIMEOUT_S: Final = 120.0
STOP_TIMEOUT_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """How to run one server.

    Attributes:
        name: One of `SERVERS`.
        argv: The command line, run from the repository root.
        env: Variables to set on top of the parent's environment.
        address: `127.0.0.1:PORT` when the port is chosen up front; None when the server
            picks it (`--port 0`) and prints it in a `serving on HOST:PORT` line.
    """

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    address: str | None = None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on `host` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def peer_python(name: str) -> Path:
    """The interpreter of a peer's virtual environment (`setup.sh` creates it)."""
    return PEER_VENVS[name] / "bin" / "python"


def python_libdir(python: Path | str) -> str:
    """LIBDIR of an interpreter: where its libpython lives (PyTriton's backend loads it)."""
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return out.stdout.strip()


def with_library_path(libdir: str, environ: Mapping[str, str]) -> dict[str, str]:
    """`{"LD_LIBRARY_PATH": ...}` with `libdir` first and any existing value kept after it."""
    current = environ.get("LD_LIBRARY_PATH", "")
    return {"LD_LIBRARY_PATH": f"{libdir}:{current}" if current else libdir}


def server_spec(
    name: str,
    *,
    model_repository: Path | None = None,
    port: Callable[[], int] = free_port,
    libdir: Callable[[Path], str] = python_libdir,
    environ: Mapping[str, str] = os.environ,
    python: str = sys.executable,
) -> ServerSpec:
    """The command line and environment of one server.

    Args:
        name: One of `SERVERS`.
        model_repository: batchwire's repository holding mlp64 (needed for `batchwire` and
            `bare-ort`).
        port: Picks a free port (injected so tests need no sockets).
        libdir: LIBDIR of an interpreter (injected so tests run no peer Python).
        environ: The parent's environment (for LD_LIBRARY_PATH).
        python: batchwire's interpreter.

    Raises:
        ValueError: An unknown name, or `batchwire` without a repository.
    """
    if name == "batchwire":
        if model_repository is None:
            raise ValueError("batchwire needs a model repository holding mlp64")
        argv = [python, "-m", "batchwire", "--log-level", "WARNING", "serve",
                "--model-repository", str(model_repository),
                "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"]  # fmt: skip
        return ServerSpec(name, argv)
    if name in ("bare", "bare-ort"):
        argv = [python, "-m", "loadtests.peers.bare_grpc", "--host", "127.0.0.1", "--port", "0"]
        if name == "bare-ort":
            if model_repository is None:
                raise ValueError("bare-ort needs batchwire's model repository holding mlp64")
            argv += ["--onnx", str(model_repository / model.NAME / "1" / "model.onnx")]
        return ServerSpec(name, argv)
    if name in PEER_VENVS:
        grpc_port, http_port, metrics_port = port(), port(), port()
        interpreter = peer_python(name)
        argv = [str(interpreter), "-m", f"loadtests.peers.{name}_peer",
                "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                "--metrics-port", str(metrics_port)]  # fmt: skip
        env = with_library_path(libdir(interpreter), environ) if name == "pytriton" else {}
        return ServerSpec(name, argv, env, f"127.0.0.1:{grpc_port}")
    raise ValueError(f"unknown server {name!r}; expected one of {', '.join(SERVERS)}")


@dataclass(slots=True)
class RunningServer:
    """A started server: its process (leader of its own session), address and log."""

    spec: ServerSpec
    process: subprocess.Popen[bytes]
    address: str
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def start_server(
    spec: ServerSpec, log_dir: Path, *, ready_timeout_s: float = READY_TIMEOUT_S
) -> RunningServer:
    """Start a server and return once it serves mlp64 correctly.

    Raises:
        RuntimeError: It exited, or was not ready within `ready_timeout_s`, or answered wrong;
            the server is stopped first and the error carries its log's tail.
    """
    if spec.name in PEER_VENVS and not peer_python(spec.name).exists():
        raise RuntimeError(f"{spec.name}: no {PEER_VENVS[spec.name]}; run loadtests/peers/setup.sh")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.name}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", **spec.env)
    with log_path.open("wb") as log:
        # NOTE: a session of its own, so a peer's children (tritonserver, the Python backend
        # stub) can be killed with it by process group if it hangs on SIGTERM.
        process = subprocess.Popen(
            spec.argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    server = RunningServer(spec, process, spec.address or "", log_path)
    deadline = time.monotonic() + ready_timeout_s
    try:
        if not server.address:
            server.address = _wait_for_address(server, deadline)
        _wait_ready(server, deadline)
        check_mlp64(server.address)
    except BaseException as exc:
        stop_server(server)
        raise RuntimeError(
            f"{spec.name} did not start: {exc}\n--- log ---\n{server.log_tail()}"
        ) from exc
    logger.info("%s serving on %s (pid %d)", spec.name, server.address, process.pid)
    return server


def _wait_for_address(server: RunningServer, deadline: float) -> str:
    while time.monotonic() < deadline:
        found = _SERVING_LINE.search(server.log_path.read_text(errors="replace"))
        if found:
            return found.group(1)
        if server.process.poll() is not None:
            raise RuntimeError(f"exited with {server.process.returncode}")
        time.sleep(0.1)
    raise RuntimeError("no 'serving on' line in time")


def _wait_ready(server: RunningServer, deadline: float) -> None:
    """Poll ServerReady and ModelReady(mlp64) until both say ready (each call bounded)."""
    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(f"exited with {server.process.returncode}")
            with contextlib.suppress(grpc.RpcError):
                if (
                    stub.ServerReady(pb.ServerReadyRequest(), timeout=1.0).ready
                    and stub.ModelReady(pb.ModelReadyRequest(name=model.NAME), timeout=1.0).ready
                ):
                    return
            time.sleep(0.2)
    raise RuntimeError("not ready in time")


def check_mlp64(address: str, *, rows: int = 3, timeout_s: float = 10.0) -> None:
    """One ModelInfer of `rows` seeded samples; raises unless OUTPUT == relu(x @ W).

    The reference weights come from batchwire's trainer, so this also checks that each peer
    serves the very model batchwire serves.
    """
    from protos import grpc_service_pb2 as pb
    from protos import grpc_service_pb2_grpc as pb_grpc
    from trainer.mlp64 import mlp64_weights

    x = np.random.default_rng(1).standard_normal((rows, model.WIDTH)).astype(np.float32)
    request = pb.ModelInferRequest(model_name=model.NAME, id="bench-check")
    request.inputs.add(name=model.INPUT_NAME, datatype="FP32", shape=x.shape)
    request.outputs.add(name=model.OUTPUT_NAME)
    request.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(request, timeout=timeout_s)
    index = [o.name for o in response.outputs].index(model.OUTPUT_NAME)
    if response.raw_output_contents:
        y = np.frombuffer(response.raw_output_contents[index], dtype="<f4")
    else:
        y = np.asarray(response.outputs[index].contents.fp32_contents, dtype=np.float32)
    expected = np.maximum(x @ mlp64_weights(0), 0.0)
    if y.size != expected.size or not np.allclose(y.reshape(expected.shape), expected, atol=1e-5):
        raise RuntimeError(f"{address}: OUTPUT differs from relu(x @ W)")


def stop_server(server: RunningServer, *, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM the server; SIGKILL its whole process group if it outlives `timeout_s`.

    Returns:
        Its exit code (negative: killed by that signal).
    """
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s ignored SIGTERM for %.0f s; killing it", server.spec.name, timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout_s)
    # NOTE: children that outlived their leader (the group keeps its id while any is alive).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    return process.returncode
