"""Locust load test of the Open Inference Protocol's ModelInfer over gRPC.

    locust -f loadtests/locustfile.py --host 127.0.0.1:8001 --models digits:3,mlp64:1
    python -m loadtests.locust_gate ...      # headless run + SLO gate (see that module)

Each simulated user keeps one gRPC channel and sends ModelInfer back to back to a model
drawn by the `--models` weights (`name[:weight],...`). Request bodies are built once per
model (per Locust process) from its ModelMetadata: random numbers of the declared
datatype, the batch dim (-1) set to `--batch-size`, other variable dims to 1, and a
sentence for a BYTES (text) input. Every ModelInfer fires Locust's `request` event with
request type `grpc`, the model as the name, the response time in ms, the serialized
response size and, on failure, a `GrpcError` ("NOT_FOUND: ...") — so Locust's statistics,
CSV and HTML reports are per model. A model whose ModelMetadata fails (unknown model,
server down) counts that call as one failed request of the model and is retried the next
time the model is drawn. Works against either front door (`batchwire serve`,
`batchwire serve --ray`): both speak the same protocol.

Why no client interceptor (Locust's documented gRPC example uses one): the event is fired
in the one task that calls ModelInfer, where the model name and response are at hand.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any

# NOTE: Locust monkey-patches the standard library with gevent before importing this
# file; grpc's own I/O must be made gevent-aware too, before any channel exists.
import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
import numpy as np
from locust import User, constant, events, stats, task
from locust.env import Environment

from loadtests.locust_gate import PERCENTILES_ENV, build_request, parse_models
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc

grpc_gevent.init_gevent()

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0

# Extra percentile columns the SLO gate asks for (e.g. 0.995): Locust's CSV writer takes
# this list when it is created, before any Locust event fires, so it is extended here.
for _fraction in os.environ.get(PERCENTILES_ENV, "").split(","):
    if _fraction.strip() and float(_fraction) not in stats.PERCENTILES_TO_REPORT:
        stats.PERCENTILES_TO_REPORT.append(float(_fraction))
stats.PERCENTILES_TO_REPORT.sort()

#: Request bodies per (model, batch size), shared by every user of this process.
_REQUESTS: dict[tuple[str, int], pb.ModelInferRequest] = {}


class GrpcError(Exception):
    """A failed RPC as Locust reports it: `CODE: details` (stable, so failures group)."""

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> GrpcError:
        """The status code and details of a failed call (`grpc.Call` errors carry both)."""
        code = error.code() if isinstance(error, grpc.Call) else None
        details = error.details() if isinstance(error, grpc.Call) else str(error)
        return cls(f"{code.name if code else 'UNKNOWN'}: {details}")


def _arguments(parser: Any) -> None:
    parser.add_argument(
        "--models", default="digits", help="models and weights: name[:weight],... (default digits)"
    )
    parser.add_argument("--batch-size", type=int, default=1, help="samples per request")
    parser.add_argument(
        "--request-timeout-s", type=float, default=30.0, help="gRPC deadline per request"
    )


def _refresh_loop_time(environment: Environment, **_kwargs: Any) -> None:
    # NOTE: `init_gevent()` above starts gevent's hub at import, and its libev loop caches
    # "now" until it next runs; Locust then sets up for seconds without yielding (on a
    # busy host), so the `--run-time` timer, started from the stale time, would fire
    # seconds early (measured: a 4 s run stopped after 0.5 s). Refresh it first.
    gevent.get_hub().loop.update_now()


def _final_csv_rows(environment: Environment, **_kwargs: Any) -> None:
    # NOTE: Locust's CSV files are snapshots its writer greenlet takes every
    # CSV_STATS_INTERVAL_SEC and never retakes at exit, so the last second of a run (and
    # requests that finished during --stop-timeout) would be missing from them. When
    # `quitting` fires every user has stopped; waiting one interval lets the writer take
    # a final snapshot, which the SLO gate then reads.
    if getattr(environment.parsed_options, "csv_prefix", None):
        gevent.sleep(stats.CSV_STATS_INTERVAL_SEC * 1.5)


events.init_command_line_parser.add_listener(_arguments)
events.init.add_listener(_refresh_loop_time)
events.quitting.add_listener(_final_csv_rows)


class InferenceUser(User):
    """Sends ModelInfer back to back over one channel (the host is `HOST:PORT`)."""

    wait_time = constant(0)
    host = "127.0.0.1:8001"

    timeout_s: float
    batch_size: int
    channel: grpc.Channel
    stub: pb_grpc.GRPCInferenceServiceStub
    names: list[str]
    weights: list[float]

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.timeout_s = float(getattr(options, "request_timeout_s", 30.0))
        self.batch_size = int(getattr(options, "batch_size", 1))
        models = parse_models(getattr(options, "models", "digits"))
        self.names = [name for name, _ in models]
        self.weights = [weight for _, weight in models]
        self.channel = grpc.insecure_channel(self.host)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        # Connect before the first timed call, so no request's latency includes the handshake.
        try:
            grpc.channel_ready_future(self.channel).result(timeout=CONNECT_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            logger.warning("no connection to %s within %.0f s", self.host, CONNECT_TIMEOUT_S)

    def on_stop(self) -> None:
        self.channel.close()

    def _request_for(self, name: str) -> pb.ModelInferRequest:
        key = (name, self.batch_size)
        if key not in _REQUESTS:
            metadata = self.stub.ModelMetadata(
                pb.ModelMetadataRequest(name=name), timeout=self.timeout_s
            )
            _REQUESTS[key] = build_request(metadata, self.batch_size, np.random.default_rng())
        return _REQUESTS[key]

    @task
    def infer(self) -> None:
        """One ModelInfer to a model drawn by weight, reported as a Locust request."""
        name = random.choices(self.names, self.weights)[0]
        start_ns = time.monotonic_ns()
        try:
            request = self._request_for(name)
        except grpc.RpcError as error:  # the model cannot be called: a failed request
            self._report(name, start_ns, 0, GrpcError.from_rpc_error(error))
            return
        start_ns = time.monotonic_ns()  # the first draw fetched metadata: not timed
        try:
            response = self.stub.ModelInfer(request, timeout=self.timeout_s)
        except grpc.RpcError as error:
            self._report(name, start_ns, 0, GrpcError.from_rpc_error(error))
            return
        self._report(name, start_ns, response.ByteSize(), None)

    def _report(self, name: str, start_ns: int, length: int, exception: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.monotonic_ns() - start_ns) / 1e6,
            response_length=length,
            exception=exception,
            context={},
        )
