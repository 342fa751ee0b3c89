"""Open-loop (Poisson) and closed-loop ModelInfer load generator with intended-time latency.

    python -m loadtests.openloop --address 127.0.0.1:PORT --model digits \\
        [--mode open] --rates 250 500 1000 2000 [--duration-s 10] [--max-requests N]
        [--timeout-s 5] [--batch-size 1] [--seed 0] [--channels 1]
        [--out loadtests/results/openloop_digits.json]
    python -m loadtests.openloop --address 127.0.0.1:PORT --model digits \\
        --mode closed --concurrency 1 8 32 [--duration-s 10]

Open loop: requests arrive as a Poisson process at `--rate` req/s whatever the server does,
and each latency is measured from the request's *intended* (scheduled) send instant, so
queueing in the client or the server is never hidden (no coordinated omission). When the
generator itself falls behind its schedule, the send lag (actual minus intended send time)
is reported: a large lag means the client, not the server, was the bottleneck.

Closed loop: `--concurrency` workers each send back-to-back; latency is from the actual send.

The request is built once from the server's ModelMetadata (seeded random data, `-1` dims
replaced by `--batch-size` for the batch dim and 1 elsewhere), serialized once and sent as
raw bytes; responses are not parsed, only their gRPC status is read. Every run is bounded
by `--duration-s` and `--max-requests`, each request carries a `--timeout-s` deadline
(DEADLINE_EXCEEDED counts as an error), and only loopback addresses are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import gc
import ipaddress
import itertools
import json
import logging
import math
import platform
import selectors
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol

import grpc
import numpy as np

from batchwire.datatypes import numpy_dtype
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

ROOT: Final = Path(__file__).resolve().parents[1]
MODEL_INFER_METHOD: Final = "/inference.GRPCInferenceService/ModelInfer"
#: Percentiles reported for every run (the last one is printed as p99.9).
PERCENTILES: Final[tuple[float, ...]] = (50.0, 90.0, 99.0, 99.9)
#: A p99 send lag above this means the generator could not keep its schedule.
LAG_WARN_MS: Final = 5.0
#: Sends issued back to back, when behind schedule, before yielding to the event loop
#: (the gRPC calls only go out, and completions only arrive, while the loop runs).
SEND_BURST: Final = 32
#: Time allowed, beyond the per-request deadline, for the last responses after a run.
DRAIN_GRACE_S: Final = 5.0
#: Status recorded for a request still unanswered after the drain deadline.
UNFINISHED: Final = "UNFINISHED"
#: Upper bound of the random values filled into numeric inputs (digits pixels are 0..16).
FILL_HIGH: Final = 16
CHANNEL_OPTIONS: Final[list[tuple[str, int]]] = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # NOTE: without a local pool, channels with equal args share one TCP connection.
    ("grpc.use_local_subchannel_pool", 1),
]

Clock = Callable[[], int]
Sleep = Callable[[float], Awaitable[None]]


# --------------------------------------------------------------------------- addresses


def check_loopback(address: str) -> str:
    """Return `address` (`host:port`) when its host is a loopback address.

    Accepted hosts: `localhost`, 127.0.0.0/8, `::1` (written `[::1]:PORT`), and their
    IPv4-mapped IPv6 forms. Names other than `localhost` are not resolved.

    Raises:
        ValueError: the address is malformed or its host is not loopback: load tests only
            target this machine.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"address {address!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower() == "localhost":
        return address
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip is None or not ip.is_loopback:
        raise ValueError(
            f"refusing non-loopback address {address!r}: load tests may only target this "
            "machine (127.0.0.0/8, localhost or [::1])"
        )
    return address


# --------------------------------------------------------------------------- request


def _fill(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> bytes:
    """Seeded random contents of one input, as raw little-endian bytes."""
    if datatype == "BYTES":
        from server.codec import serialize_bytes

        values = rng.integers(0, FILL_HIGH, size=shape)
        return serialize_bytes(np.array([str(v).encode() for v in values.ravel()], dtype=object))
    dtype = numpy_dtype(datatype)
    if dtype.kind == "b":
        array = rng.integers(0, 2, size=shape).astype(dtype)
    elif dtype.kind == "f":
        array = rng.uniform(0.0, FILL_HIGH, size=shape).astype(dtype)
    else:
        array = rng.integers(0, FILL_HIGH + 1, size=shape).astype(dtype)
    return array.astype(dtype.newbyteorder("<"), copy=False).tobytes()


def build_request(
    address_or_stub: str | Any, model: str, batch_size: int = 1, seed: int = 0
) -> pb.ModelInferRequest:
    """Build one ModelInferRequest for `model` from its ModelMetadata.

    For each input: its datatype and shape, a leading `-1` replaced by `batch_size` and any
    other `-1` by 1, filled with seeded random data (uniform 0..16 for floats, integers
    0..16, random booleans, short numeric strings for BYTES) in `raw_input_contents`.

    Args:
        address_or_stub: a loopback `host:port`, a synchronous `GRPCInferenceServiceStub`,
            or a `ModelMetadataResponse` already fetched.
        model: the model name.
        batch_size: samples per request (the batch dimension).
        seed: seed of the random contents.

    Returns:
        The request; serialize it once and reuse it.

    Raises:
        ValueError: non-loopback address or `batch_size` < 1.
        grpc.RpcError: ModelMetadata failed (e.g. NOT_FOUND for an unknown model).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(address_or_stub, pb.ModelMetadataResponse):
        metadata = address_or_stub
    elif isinstance(address_or_stub, str):
        with grpc.insecure_channel(check_loopback(address_or_stub)) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=30.0)
    else:
        metadata = address_or_stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=30.0)
    rng = np.random.default_rng(seed)
    request = pb.ModelInferRequest(model_name=model)
    for tensor in metadata.inputs:
        shape = tuple(
            (batch_size if i == 0 else 1) if d < 0 else int(d) for i, d in enumerate(tensor.shape)
        )
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        request.raw_input_contents.append(_fill(tensor.datatype, shape, rng))
    return request


# --------------------------------------------------------------------------- schedule


def poisson_arrivals_ns(
    rate_rps: float,
    duration_s: float,
    rng: np.random.Generator,
    max_requests: int | None = None,
    chunk: int = 4096,
) -> Iterator[int]:
    """Intended send offsets (ns from the start) of a Poisson process of rate `rate_rps`.

    Inter-arrival gaps are exponential with mean `1 / rate_rps`; offsets increase and all lie
    in `[0, duration_s)`. At most `max_requests` offsets are produced.

    Raises:
        ValueError: `rate_rps` or `duration_s` is not positive.
    """
    if not rate_rps > 0 or not duration_s > 0:
        raise ValueError(f"rate_rps and duration_s must be > 0, got {rate_rps}, {duration_s}")
    limit_ns = duration_s * 1e9
    remaining = math.inf if max_requests is None else max_requests
    t_ns = 0.0
    while remaining > 0:
        offsets = t_ns + np.cumsum(rng.exponential(1e9 / rate_rps, size=chunk))
        t_ns = float(offsets[-1])
        for offset in offsets:
            if offset >= limit_ns or remaining <= 0:
                return
            remaining -= 1
            yield int(offset)


# --------------------------------------------------------------------------- transport


class Transport(Protocol):
    """The narrow seam the loops drive: start one request, hear its status when it ends."""

    def start(self, on_done: Callable[[str], None]) -> None:
        """Start one request now; `on_done(status)` is called on the event loop when it ends.

        `status` is the gRPC status name: `OK`, `DEADLINE_EXCEEDED`, `UNAVAILABLE`, ...
        """
        ...


class GrpcTransport:
    """ModelInfer over grpc.aio with one pre-serialized request, round-robin over channels.

    Requests go out as raw bytes and responses come back as raw bytes: no per-call
    serialization and no response parsing, only the status is read.
    """

    def __init__(self, address: str, payload: bytes, timeout_s: float, channels: int = 1):
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self._payload = payload
        self._timeout_s = timeout_s
        self._channels = [
            grpc.aio.insecure_channel(check_loopback(address), options=CHANNEL_OPTIONS)
            for _ in range(channels)
        ]
        # NOTE: no (de)serializers: the payload is already bytes, the response stays bytes.
        callables = [ch.unary_unary(MODEL_INFER_METHOD) for ch in self._channels]
        self._next = itertools.cycle(callables).__next__
        # NOTE: the event loop holds tasks only weakly; this set keeps in-flight ones alive.
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, on_done: Callable[[str], None]) -> None:
        call = self._next()(self._payload, timeout=self._timeout_s)
        # NOTE: one small task per request rather than `call.add_done_callback`: grpc keeps
        # done callbacks in a reference cycle with the call (~16 objects per request), and
        # collecting that garbage stalls the generator for 100+ ms at a few thousand req/s.
        task = asyncio.ensure_future(self._finish(call, on_done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _finish(call: Any, on_done: Callable[[str], None]) -> None:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            on_done(str(exc.code().name))
        else:
            on_done("OK")

    async def warm_up(self, requests: int, timeout_s: float = 30.0) -> None:
        """Wait for every channel to connect, then send `requests` calls one at a time.

        Raises:
            RuntimeError: a warm-up call failed (its status and details are in the message).
        """
        for channel in self._channels:
            await asyncio.wait_for(channel.channel_ready(), timeout=timeout_s)
        for _ in range(requests):
            try:
                await self._next()(self._payload, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise RuntimeError(
                    f"warm-up ModelInfer failed: {exc.code().name}: {exc.details()}"
                ) from exc

    async def close(self) -> None:
        """Close every channel (cancelling any call still in flight)."""
        for channel in self._channels:
            await channel.close()
        for task in list(self._tasks):
            task.cancel()


# --------------------------------------------------------------------------- recording


@dataclass(slots=True)
class RunResult:
    """Raw per-request timings of one run; times are ns from the run's start.

    `end_ns` is -1 for a request that never finished (its code is `UNFINISHED`).
    """

    mode: str
    offered_rps: float | None
    concurrency: int | None
    duration_s: float
    intended_ns: np.ndarray
    sent_ns: np.ndarray
    end_ns: np.ndarray
    codes: list[str]
    elapsed_ns: int
    cpu_ns: int


class _Recorder:
    """Hot-path bookkeeping: issue requests, stamp their sends and completions."""

    __slots__ = (
        "_all_done",
        "_closed",
        "_finished",
        "_issuing",
        "_transport",
        "clock",
        "codes",
        "end",
        "intended",
        "sent",
        "t0",
    )

    def __init__(self, transport: Transport, clock: Clock) -> None:
        self._transport = transport
        self.clock = clock
        self.t0 = clock()
        self.intended: list[int] = []
        self.sent: list[int] = []
        self.end: list[int] = []
        self.codes: list[str] = []
        self._all_done = asyncio.Event()
        self._finished = 0
        self._issuing = True
        self._closed = False

    @property
    def issued(self) -> int:
        return len(self.intended)

    def issue(self, intended_ns: int, waiter: asyncio.Future[None] | None = None) -> None:
        """Start one request now that was meant to start at `intended_ns` (absolute)."""
        i = len(self.intended)
        self.intended.append(intended_ns)
        self.end.append(-1)
        self.codes.append(UNFINISHED)
        self.sent.append(self.clock())
        self._transport.start(partial(self._done, i, waiter))

    def _done(self, i: int, waiter: asyncio.Future[None] | None, code: str) -> None:
        if self._closed:
            return
        self.end[i] = self.clock()
        self.codes[i] = code
        self._finished += 1
        if not self._issuing and self._finished == len(self.intended):
            self._all_done.set()
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """Ignore completions from now on (the result is final)."""
        self._closed = True

    async def drain(self, timeout_s: float) -> None:
        """Wait (bounded) for the outstanding requests; those left stay `UNFINISHED`."""
        self._issuing = False
        if self._finished < len(self.intended):
            try:
                await asyncio.wait_for(self._all_done.wait(), timeout=timeout_s)
            except asyncio.TimeoutError:
                logger.warning(
                    "%d requests unanswered %.1f s after the run; counted as %s",
                    len(self.intended) - self._finished,
                    timeout_s,
                    UNFINISHED,
                )
        self._closed = True

    def result(
        self,
        mode: str,
        offered_rps: float | None,
        concurrency: int | None,
        duration_s: float,
        cpu_ns: int,
    ) -> RunResult:
        """The timings recorded so far, relative to the start of the run."""
        end = np.asarray(self.end, dtype=np.int64)
        finished = end >= 0
        end = np.where(finished, end - self.t0, -1)
        last_ns = int(end.max()) if finished.any() else self.clock() - self.t0
        return RunResult(
            mode=mode,
            offered_rps=offered_rps,
            concurrency=concurrency,
            duration_s=duration_s,
            intended_ns=np.asarray(self.intended, dtype=np.int64) - self.t0,
            sent_ns=np.asarray(self.sent, dtype=np.int64) - self.t0,
            end_ns=end,
            codes=list(self.codes),
            elapsed_ns=max(last_ns, 1),
            cpu_ns=cpu_ns,
        )


# --------------------------------------------------------------------------- loops


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers fire within ~0.1 ms instead of in 1 ms steps.

    NOTE: epoll takes its timeout in whole milliseconds (Python rounds up), so on the default
    loop each send goes out up to 1 ms late (0.5 ms on average), and intended-time latency
    rightly counts that. select() takes microseconds, and with the handful of descriptors a
    gRPC client polls its linear scan costs nothing. Use it to run `run_open_loop`.
    """
    if sys.platform == "win32":
        return asyncio.new_event_loop()
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


async def open_loop(
    transport: Transport,
    arrivals_ns: Iterable[int],
    *,
    drain_timeout_s: float,
    clock: Clock = time.perf_counter_ns,
    sleep: Sleep = asyncio.sleep,
) -> _Recorder:
    """Send one request at each intended offset of `arrivals_ns`, whatever the responses do.

    The loop sleeps until the next intended instant, then sends every request that is due;
    when it is behind schedule it sends late (the lag is recorded, and counted in latency)
    and yields to the event loop every `SEND_BURST` sends so calls and completions proceed.
    Returns after every request finished or `drain_timeout_s` passed after the last send.
    """
    recorder = _Recorder(transport, clock)
    try:
        t0 = recorder.t0
        burst = 0
        for offset in arrivals_ns:
            intended = t0 + offset
            delay_ns = intended - clock()
            if delay_ns > 0:
                await sleep(delay_ns / 1e9)
                burst = 0
            elif burst >= SEND_BURST:
                await sleep(0)
                burst = 0
            recorder.issue(intended)
            burst += 1
    except BaseException:
        recorder.close()
        raise
    await recorder.drain(drain_timeout_s)
    return recorder


async def closed_loop(
    transport: Transport,
    concurrency: int,
    duration_s: float,
    *,
    max_requests: int,
    drain_timeout_s: float,
    clock: Clock = time.perf_counter_ns,
) -> _Recorder:
    """`concurrency` workers each send a request as soon as their previous one finished.

    Workers stop starting requests after `duration_s` or once `max_requests` were started.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    recorder = _Recorder(transport, clock)
    stop_ns = recorder.t0 + int(duration_s * 1e9)
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        while recorder.issued < max_requests:
            now = clock()
            if now >= stop_ns:
                return
            waiter: asyncio.Future[None] = loop.create_future()
            recorder.issue(now, waiter)
            await waiter

    try:
        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(concurrency))),
            timeout=duration_s + drain_timeout_s,
        )
    except asyncio.TimeoutError:
        logger.warning("closed loop: workers still waiting after %.1f s", duration_s)
    except BaseException:
        recorder.close()
        raise
    await recorder.drain(drain_timeout_s)
    return recorder


@contextlib.contextmanager
def _gc_paused(pause: bool) -> Iterator[None]:
    """Keep the cyclic garbage collector off for the duration of a run (when `pause`).

    NOTE: a full collection walks every live object, and an overloaded server leaves
    thousands of requests in flight (~40 objects each): measured, gen-2 collections stalled
    the generator 120-230 ms at 3,000 req/s, which shows up as send lag. The request path
    creates no reference cycles (measured: 0 cyclic objects per request, OK or error), so
    memory stays bounded by the in-flight requests; one collection runs after the run.
    """
    if not pause or not gc.isenabled():
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


async def run_open_loop(
    address: str,
    request: pb.ModelInferRequest | bytes,
    rate: float,
    duration_s: float,
    *,
    max_requests: int = 1_000_000,
    timeout_s: float = 5.0,
    seed: int = 0,
    channels: int = 1,
    warmup_requests: int = 10,
    pause_gc: bool = True,
) -> RunResult:
    """Offer Poisson load at `rate` req/s for `duration_s` against a loopback server.

    Run it on `new_event_loop()` for sub-millisecond send timing: on the default (epoll)
    loop each send can be up to 1 ms late, which is counted as send lag and as latency.

    Args:
        address: loopback `host:port`.
        request: the ModelInferRequest (serialized once here) or its serialized bytes.
        rate: offered load, requests per second.
        duration_s: length of the arrival schedule.
        max_requests: cap on requests sent.
        timeout_s: gRPC deadline of each request.
        seed: seed of the arrival schedule.
        channels: gRPC channels (TCP connections) used round-robin.
        warmup_requests: sequential requests sent (and not recorded) before the run.
        pause_gc: keep Python's cyclic garbage collector off during the run (see
            `_gc_paused`): its pauses would otherwise delay sends under overload.

    Returns:
        Per-request timings; latency is measured from each request's intended send time.

    Raises:
        ValueError: non-loopback address or bad parameters.
        RuntimeError: the warm-up requests failed.
    """
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    arrivals = poisson_arrivals_ns(rate, duration_s, np.random.default_rng(seed), max_requests)
    transport = GrpcTransport(address, payload, timeout_s, channels)
    try:
        await transport.warm_up(warmup_requests)
        with _gc_paused(pause_gc):
            cpu0 = time.process_time_ns()
            recorder = await open_loop(
                transport, arrivals, drain_timeout_s=timeout_s + DRAIN_GRACE_S
            )
            cpu_ns = time.process_time_ns() - cpu0
    finally:
        await transport.close()
    return recorder.result("open", float(rate), None, duration_s, cpu_ns)


async def run_closed_loop(
    address: str,
    request: pb.ModelInferRequest | bytes,
    concurrency: int,
    duration_s: float,
    *,
    max_requests: int = 1_000_000,
    timeout_s: float = 5.0,
    channels: int = 1,
    warmup_requests: int = 10,
    pause_gc: bool = True,
) -> RunResult:
    """Run `concurrency` back-to-back workers for `duration_s` against a loopback server.

    Arguments as for `run_open_loop`; latency is measured from each actual send.
    """
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    transport = GrpcTransport(address, payload, timeout_s, channels)
    try:
        await transport.warm_up(warmup_requests)
        with _gc_paused(pause_gc):
            cpu0 = time.process_time_ns()
            recorder = await closed_loop(
                transport,
                concurrency,
                duration_s,
                max_requests=max_requests,
                drain_timeout_s=timeout_s + DRAIN_GRACE_S,
            )
            cpu_ns = time.process_time_ns() - cpu0
    finally:
        await transport.close()
    return recorder.result("closed", None, concurrency, duration_s, cpu_ns)


# --------------------------------------------------------------------------- reporting


def _percentiles_ms(values_ns: np.ndarray) -> dict[str, float | None]:
    names = [f"p{q:g}" for q in PERCENTILES]
    if values_ns.size == 0:
        return dict.fromkeys([*names, "max", "mean"], None)
    # NOTE: "higher" reports an observed value, never an interpolation below it.
    points = np.percentile(values_ns, PERCENTILES, method="higher") / 1e6
    out: dict[str, float | None] = {
        name: round(float(v), 4) for name, v in zip(names, points, strict=True)
    }
    out["max"] = round(float(values_ns.max()) / 1e6, 4)
    out["mean"] = round(float(values_ns.mean()) / 1e6, 4)
    return out


def summarize(result: RunResult) -> dict[str, Any]:
    """Numbers of one run, JSON-ready.

    Keys: `mode`, `offered_rps` (open loop), `concurrency` (closed loop), `duration_s`,
    `requests` (sent), `ok`, `errors` (status name -> count, `UNFINISHED` for requests
    never answered), `elapsed_s` (start to last response), `sent_rps`, `achieved_rps`
    (OK responses per second of `elapsed_s`), `latency_ms` (OK responses, from the intended
    send time: p50/p90/p99/p99.9/max/mean), `service_latency_ms` (OK responses, from the
    actual send), `send_lag_ms` (actual minus intended send), `generator_lagged` (p99 send
    lag above `LAG_WARN_MS`: the client was a bottleneck), `client_cpu_s`, `client_cpu_pct`.
    """
    codes = np.asarray(result.codes, dtype=object)
    ok = codes == "OK"
    errors = collections.Counter(c for c in result.codes if c != "OK")
    elapsed_s = result.elapsed_ns / 1e9
    latency = (result.end_ns - result.intended_ns)[ok]
    service = (result.end_ns - result.sent_ns)[ok]
    lag = result.sent_ns - result.intended_ns
    lag_ms = _percentiles_ms(lag)
    span_ns = int(result.sent_ns.max()) if result.sent_ns.size else 0
    sent_rps = result.sent_ns.size / (span_ns / 1e9) if span_ns > 0 else 0.0
    return {
        "mode": result.mode,
        "offered_rps": result.offered_rps,
        "concurrency": result.concurrency,
        "duration_s": result.duration_s,
        "requests": int(codes.size),
        "ok": int(ok.sum()),
        "errors": dict(sorted(errors.items())),
        "elapsed_s": round(elapsed_s, 4),
        "sent_rps": round(sent_rps, 2),
        "achieved_rps": round(int(ok.sum()) / elapsed_s, 2),
        "latency_ms": _percentiles_ms(latency),
        "service_latency_ms": _percentiles_ms(service),
        "send_lag_ms": lag_ms,
        "generator_lagged": bool((lag_ms["p99"] or 0.0) > LAG_WARN_MS),
        "client_cpu_s": round(result.cpu_ns / 1e9, 3),
        "client_cpu_pct": round(100.0 * result.cpu_ns / result.elapsed_ns, 1),
    }


def plot(
    results: Sequence[RunResult | dict[str, Any]], path: Path | str, title: str | None = None
) -> Path:
    """Write a PNG: p50/p99 latency and achieved throughput against the offered load.

    Open-loop runs are plotted against their offered rate; closed-loop runs against their
    achieved throughput (there is no offered rate), labelled by concurrency.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r if isinstance(r, dict) else summarize(r) for r in results]
    open_rows = [r for r in rows if r["offered_rps"] is not None]
    closed_rows = [r for r in rows if r["offered_rps"] is None]
    fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(11, 4.2))
    for subset, marker, label in ((open_rows, "o", "open"), (closed_rows, "s", "closed")):
        if not subset:
            continue
        x = [
            r["offered_rps"] if r["offered_rps"] is not None else r["achieved_rps"] for r in subset
        ]
        for key, style in (("p50", "-"), ("p99", "--")):
            y = [
                r["latency_ms"][key] if r["latency_ms"][key] is not None else math.nan
                for r in subset
            ]
            ax_lat.plot(x, y, style, marker=marker, label=f"{key} ({label} loop)")
        ax_tp.plot(
            x,
            [r["achieved_rps"] for r in subset],
            "-",
            marker=marker,
            label=f"achieved ({label} loop)",
        )
        if label == "closed":
            for xi, r in zip(x, subset, strict=True):
                ax_lat.annotate(f"c={r['concurrency']}", (xi, r["latency_ms"]["p50"] or 0.0))
    if open_rows:
        top = max(r["offered_rps"] for r in open_rows)
        ax_tp.plot([0, top], [0, top], ":", color="grey", label="offered = achieved")
    ax_lat.set_yscale("log")
    ax_lat.set_xlabel("offered load (req/s)")
    ax_lat.set_ylabel("latency from intended send (ms)")
    ax_lat.set_title("latency vs offered load")
    ax_tp.set_xlabel("offered load (req/s)")
    ax_tp.set_ylabel("achieved throughput (OK req/s)")
    ax_tp.set_title("throughput")
    for ax in (ax_lat, ax_tp):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A fixed-width table of run summaries."""
    header = (
        f"{'offered':>8} {'conc':>5} {'achieved':>9} {'ok':>7} {'errors':>7} "
        f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8} "
        f"{'lag max':>8} {'cpu %':>6}"
    )
    lines = [header]

    def num(value: float | None, width: int, digits: int = 2) -> str:
        return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    for r in rows:
        lat = r["latency_ms"]
        lines.append(
            f"{num(r['offered_rps'], 8, 0)} {r['concurrency'] or '-':>5} "
            f"{num(r['achieved_rps'], 9, 1)} {r['ok']:>7} {sum(r['errors'].values()):>7} "
            f"{num(lat['p50'], 8)} {num(lat['p90'], 8)} {num(lat['p99'], 8)} "
            f"{num(lat['p99.9'], 9)} {num(lat['max'], 8)} "
            f"{num(r['send_lag_ms']['max'], 8)} {num(r['client_cpu_pct'], 6, 1)}"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m loadtests.openloop`."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.openloop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--address", required=True, help="loopback HOST:PORT of the server")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--mode", choices=("open", "closed"), default="open")
    parser.add_argument("--rate", type=float, help="offered load, req/s (open loop)")
    parser.add_argument("--rates", type=float, nargs="+", help="sweep of offered loads, req/s")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", help="workers (closed loop; several = a sweep)"
    )
    parser.add_argument("--duration-s", type=float, default=10.0, help="length of each run")
    parser.add_argument(
        "--max-requests", type=int, default=1_000_000, help="cap on requests per run"
    )
    parser.add_argument("--timeout-s", type=float, default=5.0, help="gRPC deadline per request")
    parser.add_argument("--batch-size", type=int, default=1, help="samples per request")
    parser.add_argument("--seed", type=int, default=0, help="seed of data and arrivals")
    parser.add_argument("--channels", type=int, default=1, help="gRPC channels, round-robin")
    parser.add_argument("--warmup-requests", type=int, default=10, help="unrecorded, sequential")
    parser.add_argument(
        "--out", type=Path, help="JSON path (default loadtests/results/openloop_<model>.json)"
    )
    parser.add_argument("--log-level", default="WARNING")
    return parser


async def _sweep(args: argparse.Namespace, request: pb.ModelInferRequest) -> list[RunResult]:
    payload = request.SerializeToString()
    results: list[RunResult] = []
    if args.mode == "open":
        for i, rate in enumerate(args.rates):
            result = await run_open_loop(
                args.address,
                payload,
                rate,
                args.duration_s,
                max_requests=args.max_requests,
                timeout_s=args.timeout_s,
                seed=args.seed + i,
                channels=args.channels,
                warmup_requests=args.warmup_requests,
            )
            results.append(result)
            print(format_table([summarize(result)]).splitlines()[-1], flush=True)
    else:
        for concurrency in args.concurrency:
            result = await run_closed_loop(
                args.address,
                payload,
                concurrency,
                args.duration_s,
                max_requests=args.max_requests,
                timeout_s=args.timeout_s,
                channels=args.channels,
                warmup_requests=args.warmup_requests,
            )
            results.append(result)
            print(format_table([summarize(result)]).splitlines()[-1], flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print a table, write the JSON and the PNG beside it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        check_loopback(args.address)
    except ValueError as exc:
        parser.error(str(exc))
    if args.mode == "open":
        args.rates = (args.rates or []) + ([args.rate] if args.rate is not None else [])
        if not args.rates or any(r <= 0 for r in args.rates):
            parser.error("--mode open needs --rate or --rates, all > 0")
    elif not args.concurrency or any(c < 1 for c in args.concurrency):
        parser.error("--mode closed needs --concurrency N [N ...], all >= 1")
    if args.duration_s <= 0 or args.max_requests < 1 or args.timeout_s <= 0:
        parser.error("--duration-s, --max-requests and --timeout-s must be positive")
    out: Path = args.out or ROOT / "loadtests" / "results" / f"openloop_{args.model}.json"

    try:
        request = build_request(args.address, args.model, args.batch_size, args.seed)
    except grpc.RpcError as exc:
        print(
            f"error: ModelMetadata for {args.model!r} failed: {exc.code().name}: {exc.details()}",
            file=sys.stderr,
        )
        return 1
    print(
        f"{args.mode} loop against {args.address} model {args.model} batch {args.batch_size}, "
        f"{args.duration_s:g} s per run, deadline {args.timeout_s:g} s",
        flush=True,
    )
    print(format_table([]), flush=True)
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            results = runner.run(_sweep(args, request))
    else:  # pragma: no cover - Python 3.10 has no asyncio.Runner
        loop = new_event_loop()
        try:
            results = loop.run_until_complete(_sweep(args, request))
        finally:
            loop.close()
    rows = [summarize(r) for r in results]
    for row in rows:
        at = f"{row['offered_rps']:g} req/s" if row["mode"] == "open" else f"c={row['concurrency']}"
        if row["errors"]:
            detail = ", ".join(f"{code} {n}" for code, n in row["errors"].items())
            print(f"errors at {at}: {detail}", flush=True)
        if row["generator_lagged"]:
            lag = row["send_lag_ms"]
            print(
                f"warning: at {at} the generator fell behind its schedule (send lag p99 "
                f"{lag['p99']:.2f} ms, max {lag['max']:.2f} ms); latencies include that "
                "client-side delay, so the client was (part of) the bottleneck",
                flush=True,
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    report = {
        "tool": "loadtests.openloop",
        "address": args.address,
        "model": args.model,
        "mode": args.mode,
        "batch_size": args.batch_size,
        "timeout_s": args.timeout_s,
        "duration_s": args.duration_s,
        "max_requests": args.max_requests,
        "channels": args.channels,
        "seed": args.seed,
        "latency_note": "latency_ms counts OK responses from their intended send time",
        "host": {
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "machine": platform.machine(),
        },
        "runs": rows,
        "plot": png.name,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, png, title=f"{args.model} batch {args.batch_size}, {args.mode} loop, {args.address}")
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
