"""`batchwire serve --workers N`: N server processes on one port (SO_REUSEPORT).

Each worker is a full `batchwire serve` process with its own runtime, batchers and
engines, so one interpreter's GIL is not the ceiling; the kernel spreads incoming
connections across them. The parent only starts, watches and stops them.
"""

from __future__ import annotations

import logging
import selectors
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence

from server.app import ServeSettings

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 120.0


def reserve_port(host: str) -> socket.socket:
    """A bound SO_REUSEPORT socket on a free port; keep it open until the workers bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


def worker_command(
    settings: ServeSettings, port: int, log_level: str, extra: Sequence[str] = ()
) -> list[str]:
    """The command line of one worker process (`extra`: its monitoring flags)."""
    cmd = [
        sys.executable, "-m", "batchwire", "--log-level", log_level, "serve",
        "--model-repository", str(settings.model_repository), "--host", settings.host,
        "--port", str(port), "--max-message-bytes", str(settings.max_message_bytes),
        "--shutdown-grace-s", str(settings.shutdown_grace_s), "--reuse-port",
    ]  # fmt: skip
    if settings.intra_op_threads is not None:
        cmd += ["--intra-op-threads", str(settings.intra_op_threads)]
    return cmd + list(extra)


def _wait_ready(workers: Sequence[subprocess.Popen[str]]) -> list[str]:
    """Each worker's 'serving on' line (raises if one exits or stays silent)."""
    lines = []
    for worker in workers:
        assert worker.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(worker.stdout, selectors.EVENT_READ)
            ready = selector.select(timeout=WORKER_START_TIMEOUT_S)
        line = worker.stdout.readline() if ready else ""
        if "serving on" not in line:
            raise RuntimeError(f"worker {worker.pid} did not start (exit {worker.poll()})")
        lines.append(line)
    return lines


def serve_workers(
    settings: ServeSettings,
    workers: int,
    log_level: str,
    worker_args: Sequence[Sequence[str]] | None = None,
) -> int:
    """Run `workers` server processes on one port until SIGTERM/SIGINT; then stop them.

    Args:
        settings: the serve settings every worker gets.
        workers: how many processes.
        log_level: their logging level.
        worker_args: extra flags per worker (monitoring ports and files), one list each.

    Returns:
        0 when every worker drained and exited 0, else 1.
    """
    reserved = None
    port = settings.port
    if port == 0:
        reserved = reserve_port(settings.host)
        port = reserved.getsockname()[1]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    procs = [
        subprocess.Popen(
            worker_command(settings, port, log_level, worker_args[i] if worker_args else ()),
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(workers)
    ]
    try:
        lines = _wait_ready(procs)
        if reserved is not None:
            reserved.close()
        models = lines[0].split("models:", 1)[1] if "models:" in lines[0] else ""
        models = models.split(";", 1)[0].strip()  # each worker has its own metrics port
        print(
            f"batchwire serving on {settings.host}:{port} models: {models} workers: {workers}",
            flush=True,
        )
        while not stop.is_set():
            if any(p.poll() is not None for p in procs):
                logger.error("a worker exited unexpectedly; stopping the others")
                break
            stop.wait(1.0)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=settings.shutdown_grace_s + 30))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append(proc.wait())
        if reserved is not None:
            reserved.close()
    logger.info("workers exited with %s", codes)
    return 0 if stop.is_set() and all(code == 0 for code in codes) else 1
