"""The Ray Serve front door: Serve's gRPC ingress -> one deployment per model.

The only module that imports ray. Serve's gRPC proxy (our generated
`add_GRPCInferenceServiceServicer_to_server`, registered through `gRPCOptions`) hands each
Open Inference Protocol call to the `Ingress` deployment, whose methods are named after
the RPCs. The ingress decodes `ModelInfer` requests with the same codec as the plain front
door and routes them by model name, through a `DeploymentHandle`, to that model's
`ModelReplica` deployment. Each replica builds a `ModelRuntime` for its one model inside
`__init__` from plain settings (a path, a model name), so only settings and the request
dataclasses cross the pickle boundary, and batches with batchwire's own `DynamicBatcher`
(not `@serve.batch`), so both front doors batch alike. Replica resources, replica counts
and `autoscaling_config` come from each model's `config.yaml` (`ray:` block).

Errors: a replica returns its `InferenceError` as a value; the ingress sets the same gRPC
status and message as the plain front door on Serve's gRPC context. A replica that dies
with requests in flight fails them with UNAVAILABLE; a full replica queue
(`max_queued_requests`) answers RESOURCE_EXHAUSTED, like the plain server's full queue.
Not served here: ModelStreamInfer, the repository load/unload RPCs (models are deployments:
redeploy instead), grpc.health (Serve's proxy owns the gRPC server).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import ray
import yaml
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import HTTPOptions, gRPCOptions
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle

import batchwire
from batchwire.config import ModelConfig, load_model_config
from batchwire.errors import InferenceError
from batchwire.types import InferRequest, InferResponse
from protos import grpc_service_pb2 as pb
from server.codec import decode_request, encode_response
from server.runtime import ModelRuntime
from server.servicer import (
    EXTENSIONS,
    SERVER_NAME,
    model_config_pb,
    model_metadata_pb,
    statistics_pb,
)
from server.status import grpc_status

logger = logging.getLogger(__name__)

APP_NAME: Final = "batchwire"
SERVICER_FUNCTION: Final = "protos.grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"
DEFAULT_GRPC_PORT: Final = 9000
INGRESS_NAME: Final = "ingress"


@dataclass(frozen=True, slots=True)
class RayServeSettings:
    """How `batchwire serve --ray` runs."""

    model_repository: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_GRPC_PORT
    """Serve's gRPC proxy port (the Open Inference Protocol)."""
    http_port: int = 8000
    """Serve's HTTP proxy port (unused by batchwire, but Serve always opens one)."""
    intra_op_threads: int | None = None
    num_cpus: int | None = None
    """CPUs of the local Ray instance (None = the machine's)."""
    temp_dir: Path | None = None
    """Ray's session and log folder (None = `$BATCHWIRE_RAY_TMPDIR`, else a new one under
    the system temp dir; keep it short: Ray's socket paths live in it)."""


# ------------------------------------------------------------------------------ replica
class ModelReplica:
    """One model's runtime (engines + dynamic batcher) inside a Serve replica.

    Domain errors come back as values (an `InferenceError` instance), not raised: a
    raised exception makes Ray format and log a traceback and wrap it per request, which
    costs more than a small model's compute and floods the logs on bad client input.
    """

    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__
        self, repository: str, model: str, intra_op_threads: int | None
    ) -> None:
        self.model = model
        self.runtime = ModelRuntime(Path(repository), intra_op_threads=intra_op_threads)
        # NOTE: async __init__ runs on the replica's user-code event loop, the loop that
        # every later call runs on: the batcher binds to it here.
        await self.runtime.load(model)

    async def infer(
        self, version: str, request: InferRequest, timeout_ns: int | None
    ) -> InferResponse | InferenceError:
        """Run one request; `timeout_ns` re-anchors its deadline on this node's clock."""
        if timeout_ns is not None:
            request.deadline_ns = time.monotonic_ns() + timeout_ns
        try:
            return await self.runtime.infer(self.model, version, request)
        except InferenceError as exc:
            return exc

    def ready(self, version: str) -> bool:
        """Whether the version is loaded here."""
        return self.runtime.is_ready(self.model, version)

    def versions(self) -> list[int]:
        """The versions loaded here."""
        return self.runtime.versions(self.model)

    def metadata(self, version: str) -> bytes | InferenceError:
        """ModelMetadataResponse, serialized (protobuf stays out of the pickle path)."""
        try:
            model = self.runtime.get(self.model, version)
        except InferenceError as exc:
            return exc
        versions = self.runtime.versions(self.model)
        return model_metadata_pb(model, versions).SerializeToString()

    def config(self, version: str) -> bytes | InferenceError:
        """ModelConfigResponse, serialized."""
        try:
            model = self.runtime.get(self.model, version)
        except InferenceError as exc:
            return exc
        config = model_config_pb(model, self.runtime.versions(self.model))
        return pb.ModelConfigResponse(config=config).SerializeToString()

    def statistics(self, version: str) -> bytes | InferenceError:
        """This replica's ModelStatistics, serialized."""
        try:
            return statistics_pb(self.runtime.get(self.model, version)).SerializeToString()
        except InferenceError as exc:
            return exc

    def whoami(self) -> str:
        """This replica's actor name (tests kill replicas by it)."""
        return str(ray.get_runtime_context().get_actor_name())

    async def __del__(self) -> None:  # Serve calls it on graceful replica shutdown
        await self.runtime.close(drain=True)


# ------------------------------------------------------------------------------ ingress
#: Ray and Serve failures of a call to a model replica: the status the plain server would
#: answer with for the same situation, and what to tell the client.
_RAY_FAILURES: Final[tuple[tuple[type[BaseException], grpc.StatusCode, str], ...]] = (
    # The replica died (or is unreachable) with the request in flight: retryable.
    (RayActorError, grpc.StatusCode.UNAVAILABLE, "the replica serving it stopped; retry"),
    (ReplicaUnavailableError, grpc.StatusCode.UNAVAILABLE, "no replica available; retry"),
    (DeploymentUnavailableError, grpc.StatusCode.UNAVAILABLE, "the deployment failed"),
    # Every replica's queue (max_queued_requests) is full: the plain server's QUEUE_FULL.
    (BackPressureError, grpc.StatusCode.RESOURCE_EXHAUSTED, "the replicas' queues are full"),
    (RequestCancelledError, grpc.StatusCode.CANCELLED, "cancelled"),
)


def _set_status(grpc_context: Any, code: grpc.StatusCode, message: str) -> None:
    """Set the call's status; Serve's proxy sends it with the (empty) response.

    NOTE: setting the status and returning, instead of raising, keeps Serve from logging a
    traceback per rejected request in the ingress and the proxy.
    """
    grpc_context.set_code(code)
    grpc_context.set_details(message)


class Ingress:
    """The Open Inference Protocol methods Serve's gRPC proxy calls (named after the RPCs)."""

    def __init__(self, handles: Mapping[str, DeploymentHandle[Any]]) -> None:
        self.handles = dict(handles)

    async def _remote(self, grpc_context: Any, name: str, method: str, *args: Any) -> Any:
        """Call `method` on a replica of model `name`.

        Returns:
            The replica's result, or None after setting the gRPC status on `grpc_context`
            (unknown model, an `InferenceError` from the replica, a dead replica...).
        """
        handle = self.handles.get(name)
        if handle is None:
            # The runtime's own wording, so both front doors answer alike.
            _set_status(grpc_context, grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'")
            return None
        try:
            result = await getattr(handle, method).remote(*args)
        except Exception as exc:
            for kind, code, why in _RAY_FAILURES:
                if isinstance(exc, kind):
                    logger.warning("%s.%s failed: %r", name, method, exc)
                    message = f"model '{name}': {why} ({type(exc).__name__})"
                    _set_status(grpc_context, code, message)
                    return None
            logger.exception("ray front door: unexpected error calling %s.%s", name, method)
            _set_status(grpc_context, grpc.StatusCode.INTERNAL, f"internal error: {exc}")
            return None
        if isinstance(result, InferenceError):
            _set_status(grpc_context, grpc_status(result.code), result.message)
            return None
        return result

    async def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=batchwire.__version__, extensions=EXTENSIONS
        )

    async def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        handle = self.handles.get(request.name)
        ready = False
        if handle is not None:
            try:
                ready = bool(await handle.ready.remote(request.version))
            except Exception as exc:  # a replica that cannot answer is not ready
                logger.warning("%s.ready failed: %s", request.name, exc)
        return pb.ModelReadyResponse(ready=ready)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, grpc_context: Any
    ) -> pb.ModelMetadataResponse:
        data = await self._remote(grpc_context, request.name, "metadata", request.version)
        return (
            pb.ModelMetadataResponse()
            if data is None
            else pb.ModelMetadataResponse.FromString(data)
        )

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, grpc_context: Any
    ) -> pb.ModelConfigResponse:
        data = await self._remote(grpc_context, request.name, "config", request.version)
        return pb.ModelConfigResponse() if data is None else pb.ModelConfigResponse.FromString(data)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, grpc_context: Any
    ) -> pb.ModelStatisticsResponse:
        out = pb.ModelStatisticsResponse()
        for name in [request.name] if request.name else sorted(self.handles):
            data = await self._remote(grpc_context, name, "statistics", request.version)
            if data is None:
                return pb.ModelStatisticsResponse()
            out.model_stats.append(pb.ModelStatistics.FromString(data))
        return out

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest
    ) -> pb.RepositoryIndexResponse:
        out = pb.RepositoryIndexResponse()
        for name in sorted(self.handles):
            try:
                versions = await self.handles[name].versions.remote()
            except Exception as exc:  # as the plain server lists a model that failed to load
                if not request.ready:
                    out.models.add(name=name, state="UNAVAILABLE", reason=type(exc).__name__)
                continue
            for version in versions:
                out.models.add(name=name, version=str(version), state="READY")
        return out

    async def ModelInfer(
        self, request: pb.ModelInferRequest, grpc_context: Any
    ) -> pb.ModelInferResponse:
        if request.model_name not in self.handles:
            name = request.model_name
            _set_status(grpc_context, grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'")
            return pb.ModelInferResponse()
        try:
            decoded = decode_request(request, None)
        except InferenceError as exc:
            _set_status(grpc_context, grpc_status(exc.code), exc.message)
            return pb.ModelInferResponse()
        timeout_ns = None
        if decoded.deadline_ns is not None:  # the request's own `timeout` parameter
            # NOTE: monotonic clocks differ between nodes: ship the time left, not the
            # deadline. (Serve's proxy does not pass the gRPC deadline on.)
            timeout_ns = decoded.deadline_ns - time.monotonic_ns()
            decoded.deadline_ns = None
        response = await self._remote(
            grpc_context, request.model_name, "infer", request.model_version, decoded, timeout_ns
        )
        return pb.ModelInferResponse() if response is None else encode_response(response)


# ------------------------------------------------------------------------------ app
def deployment_options(config: ModelConfig) -> dict[str, Any]:
    """Serve deployment options of one model from its config.yaml `ray:` block."""
    ray_config = config.ray
    instances = config.instance_count if config.gpu is None else config.gpu.instances
    max_ongoing = ray_config.max_ongoing_requests or max(config.max_batch_size * (instances + 1), 8)
    options: dict[str, Any] = {
        "name": config.name,
        "ray_actor_options": {"num_cpus": ray_config.num_cpus, "num_gpus": ray_config.num_gpus},
        "max_ongoing_requests": max_ongoing,
        # A replica's queue beyond max_ongoing_requests: reject instead of piling up.
        "max_queued_requests": max_ongoing * 4,
        # One access-log line per request would cost more than a small model's compute.
        "logging_config": {"enable_access_log": False},
    }
    scaling = ray_config.autoscaling
    if scaling is None:
        options["num_replicas"] = ray_config.num_replicas
    else:
        options["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s,
        }
    return options


def build_app(args: Mapping[str, Any]) -> serve.Application:
    """The Serve application for a model repository (also a Serve config `import_path`
    builder: `server.ray_serve:build_app`).

    Args:
        args: `model_repository` (path as the replicas see it), optional
            `intra_op_threads` (overrides every model's) and `ingress_replicas` (default 1;
            every request crosses an ingress replica, so a cluster with several proxy
            nodes wants more than one).

    Raises:
        ValueError: the repository holds no model.
    """
    repository = Path(str(args["model_repository"])).resolve()
    threads = args.get("intra_op_threads")
    ingress_replicas = int(args.get("ingress_replicas") or 1)
    configs = {p.parent.name: load_model_config(p.parent) for p in repository.glob("*/config.yaml")}
    if not configs:
        raise ValueError(f"no model in {repository}")
    handles = {}
    for name, config in sorted(configs.items()):
        deployment = serve.deployment(**deployment_options(config))(ModelReplica)
        handles[name] = deployment.bind(str(repository), name, threads)
    ingress = serve.deployment(
        name=INGRESS_NAME,
        num_replicas=ingress_replicas,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
        logging_config={"enable_access_log": False},
    )(Ingress)
    app: serve.Application = ingress.bind(handles)
    return app


def serve_config(
    model_repository: str,
    *,
    port: int = DEFAULT_GRPC_PORT,
    intra_op_threads: int | None = None,
    ingress_replicas: int = 1,
) -> dict[str, Any]:
    """A Serve config file (for `serve deploy` / KubeRay) serving a repository."""
    args: dict[str, Any] = {"model_repository": model_repository}
    if intra_op_threads is not None:
        args["intra_op_threads"] = intra_op_threads
    if ingress_replicas != 1:
        args["ingress_replicas"] = ingress_replicas
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "grpc_options": {"port": port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "server.ray_serve:build_app",
                "args": args,
            }
        ],
    }


def start_local(settings: RayServeSettings) -> None:
    """Start a local Ray instance and Serve with its gRPC proxy, and deploy the app."""
    temp_dir = str(
        settings.temp_dir
        or os.environ.get("BATCHWIRE_RAY_TMPDIR")
        or tempfile.mkdtemp(prefix="bw-ray-")
    )
    root = str(Path(__file__).resolve().parents[1])
    ray.init(
        # "local": always a new instance, even when RAY_ADDRESS or a `ray start` exists.
        address="local",
        num_cpus=settings.num_cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level=logging.WARNING,
        # NOTE: replicas unpickle `protos.*_pb2` and `batchwire` classes by module name.
        runtime_env={"env_vars": {"PYTHONPATH": root}},
    )
    serve.start(
        http_options=HTTPOptions(host=settings.host, port=settings.http_port),
        grpc_options=gRPCOptions(port=settings.port, grpc_servicer_functions=[SERVICER_FUNCTION]),
    )
    app = build_app(
        {"model_repository": str(settings.model_repository),
         "intra_op_threads": settings.intra_op_threads}
    )  # fmt: skip
    serve.run(app, name=APP_NAME, route_prefix="/")


def replica_counts() -> dict[str, int]:
    """Running replicas per deployment of the batchwire app (in a Ray driver)."""
    status = serve.status().applications.get(APP_NAME)
    if status is None:
        return {}
    return {
        name: sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
        for name, d in status.deployments.items()
    }


def serve_ray(settings: RayServeSettings) -> int:
    """`batchwire serve --ray`: serve until SIGTERM/SIGINT, then shut Serve and Ray down."""
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    try:
        start_local(settings)
        # NOTE: after ray.init, which installs handlers of its own.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        models = ", ".join(sorted(n for n in replica_counts() if n != INGRESS_NAME))
        print(
            f"batchwire serving on {settings.host}:{settings.port} models: {models} (ray serve)",
            flush=True,
        )
        while not stop:
            time.sleep(0.2)
        logger.info("shutting down Serve and Ray")
    finally:
        serve.shutdown()
        ray.shutdown()
    sys.stdout.flush()
    return 0


def write_serve_config(
    path: Path, model_repository: str, port: int, threads: int | None, ingress_replicas: int = 1
) -> None:
    """`batchwire ray-config`: write a Serve config YAML."""
    config = serve_config(
        model_repository, port=port, intra_op_threads=threads, ingress_replicas=ingress_replicas
    )
    path.write_text(yaml.safe_dump(config, sort_keys=False))
