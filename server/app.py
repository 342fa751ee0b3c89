"""The embedded front door: one `grpc.aio` process serving a model repository."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from server.runtime import ModelRuntime
from server.servicer import InferenceHandlers, InferenceServicer

if TYPE_CHECKING:
    from monitoring.hub import Monitoring, MonitoringSettings

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


@dataclass(slots=True)
class ServeSettings:
    """How `batchwire serve` runs (CLI flags map one to one)."""

    model_repository: Path
    host: str = "127.0.0.1"
    port: int = 8001
    intra_op_threads: int | None = None
    max_message_bytes: int = 64 * 1024 * 1024
    shutdown_grace_s: float = 30.0
    reuse_port: bool = False
    """Bind with SO_REUSEPORT (set for the workers of `--workers N`, which share a port)."""
    monitoring: MonitoringSettings | None = None
    """Metrics endpoint, SLO and drift monitors, tracing; None = none of them."""


class RunningServer:
    """A started server: its bound port, runtime and servicer, and how to stop it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        runtime: ModelRuntime,
        servicer: InferenceServicer,
        health_servicer: health.aio.HealthServicer,
        port: int,
        monitoring: Monitoring | None = None,
    ) -> None:
        self.server = server
        self.runtime = runtime
        self.servicer = servicer
        self.health = health_servicer
        self.port = port
        self.monitoring = monitoring

    @property
    def metrics_port(self) -> int | None:
        """Port of the metrics HTTP endpoint, if one is open."""
        http = self.monitoring.http if self.monitoring is not None else None
        return http.port if http is not None else None

    async def stop(self, grace_s: float = 30.0) -> None:
        """Graceful stop: refuse new RPCs, finish in-flight and queued ones, then close.

        NOTE: grpc's `stop(grace)` waits for in-flight RPCs, which are the ones holding
        queued requests; the batchers keep running meanwhile and drain after it.
        """
        self.servicer.accepting = False
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await self.runtime.close(drain=True)
        if self.monitoring is not None:
            await self.monitoring.close()


async def start_server(settings: ServeSettings) -> RunningServer:
    """Load the repository, bind, and start serving; returns once the port is open."""
    monitoring = None
    if settings.monitoring is not None:
        from monitoring.hub import Monitoring

        monitoring = Monitoring(settings.monitoring)
    runtime = ModelRuntime(
        settings.model_repository,
        intra_op_threads=settings.intra_op_threads,
        observer_factory=monitoring.observer_factory if monitoring else None,
        on_load=monitoring.on_load if monitoring else None,
        on_unload=monitoring.on_unload if monitoring else None,
    )
    await runtime.start()
    if monitoring is not None:
        try:
            await monitoring.start(runtime)
        except BaseException:
            await runtime.close(drain=False)
            await monitoring.close()
            raise
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # NOTE: off unless asked: otherwise a second server on the same port would
        # silently share its traffic instead of failing to bind.
        ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
    ]
    server = grpc.aio.server(options=options)
    servicer = InferenceServicer(runtime, monitoring)
    if monitoring is not None and monitoring.tracer is not None:
        server.add_generic_rpc_handlers((InferenceHandlers(servicer),))  # metadata once
    else:
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    await server.start()
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if runtime.ready
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    await health_servicer.set("", status)
    await health_servicer.set(SERVICE_NAME, status)
    return RunningServer(server, runtime, servicer, health_servicer, port, monitoring)


async def serve(settings: ServeSettings) -> int:
    """Serve until SIGTERM/SIGINT, then drain and return 0."""
    running = await start_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    models = ", ".join(f"{m.config.name}/{m.version}" for m in running.runtime.loaded())
    # NOTE: everything allocated so far (modules, models, engines) lives as long as the
    # server: move it out of the cycle collector's view, so that the full collections that
    # request-time garbage triggers scan only request-time objects, not the whole heap.
    gc.collect()
    gc.freeze()
    # The one line on stdout: scripts and tests wait for it (the port matters with --port 0).
    metrics = running.metrics_port
    where = (
        f"; metrics on http://{settings.monitoring.metrics_host}:{metrics}/metrics"
        if (metrics is not None and settings.monitoring is not None)
        else ""
    )
    print(
        f"batchwire serving on {settings.host}:{running.port} models: {models}{where}", flush=True
    )
    try:
        await stop.wait()
        logger.info("shutting down: draining in-flight and queued requests")
    finally:
        await running.stop(settings.shutdown_grace_s)
    logger.info("stopped")
    sys.stdout.flush()
    return 0
