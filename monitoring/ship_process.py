"""The trace shipper's child process: encodes and exports spans beside the server.

Why a process: turning records into JSON lines or OTLP protobuf (and writing them) takes a
few µs of CPU a request, and a thread of the server's process does that holding the GIL,
the same lock the event loop needs for every request; the loop then waits for it, and the
two threads hand it back and forth. With the encoding in the server's thread, 100% tracing
to the file cost mlp64 13% of its throughput at concurrency 32 on a 2-core box; with it
here, 9% (8.7% over OTLP); a thread that hands the records to a process that throws them
away, 4% (BENCHMARKS.md, "Eleventh session": what is left is the records on the event
loop and this process's CPU on a box with no core to spare). So the server's shipper
thread only takes the records, feeds the SLO monitor and hands the sampled ones over, and
this process (`python -m monitoring.ship_process`, started by `RequestTracer`) encodes and
exports them, with its own `RequestTracer` (no thread: it ships each message as it
arrives) built from the same settings, resource and clock offset.

Protocol: pickled tuples on the child's stdin, answers on its stdout.

- `("start", settings, resource attributes, schema url, clock offset ns)`: first.
- `("codes", [(method, model, version, lane, status), ...])`: packed records' next codes.
- `("packed", rows, request ids)`: sampled packed records (`tracing._PACKED_DTYPE`).
- `("records", requests, batches)`: sampled request records and batch records.
- `("sync", token)`: answered with `("synced", token, spans exported since the last sync)`
  once everything sent before it is exported.

The child runs at the lowest priority (`SCHED_IDLE`): serving comes first. On CPUs that
serving saturates it falls behind, the pipe fills, the server's shipper thread waits on
it, and records beyond `TracingSettings.max_buffered` are dropped and counted
(`batchwire_trace_records_dropped`) as with a slow exporter.

The child ignores SIGINT and SIGTERM (a Ctrl-C or a stop reaches the whole process
group): it ships what it has and exits when its stdin closes, which the server does on
shutdown and the kernel does when the server dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, Final

logger = logging.getLogger(__name__)

#: `TracingSettings.shipper` values (here: the command line imports them without numpy).
SHIPPERS: Final = ("process", "thread")

#: Bytes the pipe to the child holds before the shipper thread's writes block (Linux's
#: default is 64 KiB: a second's records at 10,000 requests a second are ~800 KiB).
PIPE_BYTES: Final = 1 << 20
_F_SETPIPE_SZ: Final = 1031
_ROOT: Final = Path(__file__).resolve().parents[1]
#: How long `close` waits for the child to ship what it has and exit before killing it.
CLOSE_TIMEOUT_S: Final = 30.0


class ShipperProcessError(RuntimeError):
    """The child process is gone or answered out of turn."""


class ShipperProcess:
    """The server's handle on its trace shipper process (used by `RequestTracer`).

    Not thread-safe: the tracer calls it under its ship lock.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self._proc = proc
        self._to: IO[bytes] = proc.stdin
        self._from: IO[bytes] = proc.stdout
        self._token = 0

    @classmethod
    def start(
        cls, settings: Any, resource_attributes: dict[str, Any], schema_url: str, offset_ns: int
    ) -> ShipperProcess:
        """Start the child and send it its settings (it builds its exporter from them).

        Raises:
            OSError: the process cannot be started.
        """
        env = dict(os.environ)
        # The child imports `monitoring` from where this server imported it.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "monitoring.ship_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        assert proc.stdin is not None
        with contextlib.suppress(OSError):  # the default size works, with more wake-ups
            fcntl.fcntl(proc.stdin.fileno(), _F_SETPIPE_SZ, PIPE_BYTES)
        child = cls(proc)
        try:
            child.send(("start", settings, resource_attributes, schema_url, offset_ns))
        except ShipperProcessError:
            child.kill()
            raise
        return child

    @property
    def pid(self) -> int:
        return self._proc.pid

    def send(self, message: tuple[Any, ...]) -> None:
        """Queue one message for the child (it may block while the pipe is full).

        Raises:
            ShipperProcessError: the child is gone.
        """
        try:
            pickle.dump(message, self._to, protocol=pickle.HIGHEST_PROTOCOL)
        except (OSError, ValueError) as exc:  # BrokenPipeError; ValueError: closed
            raise ShipperProcessError(f"trace shipper process {self.pid}: {exc}") from exc

    def sync(self) -> int:
        """Wait until the child has exported everything sent so far: the spans it
        exported since the last sync.

        Raises:
            ShipperProcessError: the child is gone or answered out of turn.
        """
        self._token += 1
        self.send(("sync", self._token))
        try:
            self._to.flush()
            answer = pickle.load(self._from)
        except (OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            code = self._proc.poll()
            raise ShipperProcessError(
                f"trace shipper process {self.pid} is gone (exit code {code}): {exc!r}"
            ) from exc
        if not (isinstance(answer, tuple) and answer[:2] == ("synced", self._token)):
            raise ShipperProcessError(f"trace shipper process {self.pid} answered {answer!r}")
        return int(answer[2])

    def cpu_s(self) -> float:
        """The child's CPU time so far, user and system (0.0 where /proc is missing)."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close the child's stdin (it ships what it has and exits); kill it if it has not
        exited within `timeout_s`."""
        with contextlib.suppress(OSError):  # gone already
            self._to.close()
        try:
            self._proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("trace shipper process %d did not exit: killing it", self.pid)
            self.kill()
        self._from.close()

    def kill(self) -> None:
        """Stop the child now (it loses what it has not exported)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for stream in (self._to, self._from):
            with contextlib.suppress(OSError):
                stream.close()


def serve(source: IO[bytes], answers: IO[bytes]) -> int:
    """The child's loop: messages from `source` until it closes, answers to `answers`."""
    from opentelemetry.sdk.resources import Resource

    from monitoring.tracing import RequestTracer

    try:
        kind, settings, attributes, schema_url, offset_ns = pickle.load(source)
    except EOFError:
        return 0  # the server closed before sending anything
    assert kind == "start"
    tracer = RequestTracer(
        replace(settings, shipper="thread"),
        resource=Resource(attributes, schema_url),
        offset_ns=offset_ns,
        ship_thread=False,
    )
    reported = 0
    try:
        while True:
            try:
                message = pickle.load(source)
            except EOFError:
                return 0
            kind = message[0]
            if kind == "packed":
                tracer.export_packed(message[1], message[2])
            elif kind == "records":
                tracer.export_records(message[1], message[2])
            elif kind == "codes":
                tracer.add_codes(message[1])
            elif kind == "sync":
                exported = tracer.exported_spans
                pickle.dump(("synced", message[1], exported - reported), answers)
                answers.flush()
                reported = exported
            else:
                raise ValueError(f"unknown message {kind!r}")
    finally:
        tracer.shutdown()


def lowest_priority() -> str:
    """Run this process only on CPU time nothing else wants: `SCHED_IDLE` where Linux
    offers it, else nice 19. Returns which one."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return "SCHED_IDLE"
    except (AttributeError, OSError):
        os.nice(19)
        return "nice 19"


def main() -> int:
    lowest_priority()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s trace-shipper[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    answers = sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed must not reach the answer pipe
    return serve(sys.stdin.buffer, answers)


if __name__ == "__main__":
    raise SystemExit(main())
