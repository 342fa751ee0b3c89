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

Errors: a replica's `InferenceError` reaches the ingress (Ray re-raises it), which sets the
same gRPC status and message as the plain front door on Serve's gRPC context.
Not served here: ModelStreamInfer, the repository load/unload RPCs (models are deployments:
redeploy instead), grpc.health and reflection (Serve's proxy owns the server).
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
from ray.serve.config import HTTPOptions, gRPCOptions
from ray.serve.handle import DeploymentHandle

import batchwire
from batchwire.config import ModelConfig, load_model_config
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import InferRequest, InferResponse
from protos import grpc_service_pb2 as pb
from server.codec import decode_request, encode_response
from server.runtime import ModelRuntime
from server.servicer import EXTENSIONS, SERVER_NAME, model_config_pb, statistics_pb
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


# ------------------------------------------------------------------------------ replica
class ModelReplica:
    """One model's runtime (engines + dynamic batcher) inside a Serve replica."""

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
    ) -> InferResponse:
        """Run one request; `timeout_ns` re-anchors its deadline on this node's clock."""
        if timeout_ns is not None:
            request.deadline_ns = time.monotonic_ns() + timeout_ns
        return await self.runtime.infer(self.model, version, request)

    def ready(self, version: str) -> bool:
        """Whether the version is loaded here."""
        return self.runtime.is_ready(self.model, version)

    def metadata(self, version: str) -> bytes:
        """ModelMetadataResponse, serialized (protobuf stays out of the pickle path)."""
        model = self.runtime.get(self.model, version)
        batch = (-1,) if model.config.max_batch_size > 0 else ()
        out = pb.ModelMetadataResponse(
            name=self.model,
            versions=[str(v) for v in self.runtime.versions(self.model)],
            platform=model.config.platform,
        )
        for spec in model.inputs:
            out.inputs.add(name=spec.name, datatype=spec.datatype, shape=batch + spec.dims)
        for spec in model.outputs:
            out.outputs.add(name=spec.name, datatype=spec.datatype, shape=batch + spec.dims)
        return out.SerializeToString()

    def config(self, version: str) -> bytes:
        """ModelConfigResponse, serialized."""
        model = self.runtime.get(self.model, version)
        config = model_config_pb(model, self.runtime.versions(self.model))
        return pb.ModelConfigResponse(config=config).SerializeToString()

    def statistics(self, version: str) -> bytes:
        """This replica's ModelStatistics, serialized."""
        return statistics_pb(self.runtime.get(self.model, version)).SerializeToString()

    def whoami(self) -> str:
        """This replica's actor name (tests kill replicas by it)."""
        return str(ray.get_runtime_context().get_actor_name())

    async def __del__(self) -> None:  # Serve calls it on graceful replica shutdown
        await self.runtime.close(drain=True)


# ------------------------------------------------------------------------------ ingress
def _inference_error(exc: BaseException) -> InferenceError | None:
    """The InferenceError inside an exception a DeploymentHandle re-raised, if any."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, InferenceError):
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    return None


class Ingress:
    """The Open Inference Protocol methods Serve's gRPC proxy calls (named after the RPCs)."""

    def __init__(
        self, handles: Mapping[str, DeploymentHandle[Any]], configs: Mapping[str, Any]
    ) -> None:
        self.handles = dict(handles)
        self.configs = {name: ModelConfig.model_validate(c) for name, c in configs.items()}

    def _handle(self, name: str) -> DeploymentHandle[Any]:
        handle = self.handles.get(name)
        if handle is None:
            raise InferenceError(ErrorCode.NOT_FOUND, f"unknown model '{name}'")
        return handle

    async def _call(self, grpc_context: Any, work: Any) -> Any:
        try:
            return await work
        except Exception as exc:
            error = _inference_error(exc)
            if error is None:
                logger.exception("ray front door: unexpected error")
                grpc_context.set_code(grpc.StatusCode.INTERNAL)
                grpc_context.set_details(f"internal error: {exc}")
            else:
                grpc_context.set_code(grpc_status(error.code))
                grpc_context.set_details(error.message)
            raise

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
        ready = handle is not None and await handle.ready.remote(request.version)
        return pb.ModelReadyResponse(ready=bool(ready))

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, grpc_context: Any
    ) -> pb.ModelMetadataResponse:
        async def work() -> bytes:
            return await self._handle(request.name).metadata.remote(request.version)  # type: ignore[no-any-return]

        return pb.ModelMetadataResponse.FromString(await self._call(grpc_context, work()))

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, grpc_context: Any
    ) -> pb.ModelConfigResponse:
        async def work() -> bytes:
            return await self._handle(request.name).config.remote(request.version)  # type: ignore[no-any-return]

        return pb.ModelConfigResponse.FromString(await self._call(grpc_context, work()))

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, grpc_context: Any
    ) -> pb.ModelStatisticsResponse:
        async def work() -> pb.ModelStatisticsResponse:
            names = [request.name] if request.name else sorted(self.handles)
            out = pb.ModelStatisticsResponse()
            for name in names:
                data = await self._handle(name).statistics.remote(request.version)
                out.model_stats.append(pb.ModelStatistics.FromString(data))
            return out

        result: pb.ModelStatisticsResponse = await self._call(grpc_context, work())
        return result

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest
    ) -> pb.RepositoryIndexResponse:
        out = pb.RepositoryIndexResponse()
        for name in sorted(self.handles):
            out.models.add(name=name, state="READY")
        return out

    async def ModelInfer(
        self, request: pb.ModelInferRequest, grpc_context: Any
    ) -> pb.ModelInferResponse:
        async def work() -> InferResponse:
            handle = self._handle(request.model_name)
            decoded = decode_request(request, None)
            timeout_ns = None
            if decoded.deadline_ns is not None:  # the request's own `timeout` parameter
                timeout_ns = decoded.deadline_ns - time.monotonic_ns()
                decoded.deadline_ns = None
            return await handle.infer.remote(request.model_version, decoded, timeout_ns)  # type: ignore[no-any-return]

        response: InferResponse = await self._call(grpc_context, work())
        return encode_response(response)


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
    builder: `server.ray_serve:build_app`, args `model_repository`, `intra_op_threads`).

    Raises:
        ValueError: the repository holds no model.
    """
    repository = Path(str(args["model_repository"])).resolve()
    threads = args.get("intra_op_threads")
    configs = {p.parent.name: load_model_config(p.parent) for p in repository.glob("*/config.yaml")}
    if not configs:
        raise ValueError(f"no model in {repository}")
    handles = {}
    for name, config in sorted(configs.items()):
        deployment = serve.deployment(**deployment_options(config))(ModelReplica)
        handles[name] = deployment.bind(str(repository), name, threads)
    ingress = serve.deployment(
        name=INGRESS_NAME,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
        logging_config={"enable_access_log": False},
    )(Ingress)
    app: serve.Application = ingress.bind(
        handles, {n: c.model_dump(mode="json") for n, c in configs.items()}
    )
    return app


def serve_config(
    model_repository: str, *, port: int = DEFAULT_GRPC_PORT, intra_op_threads: int | None = None
) -> dict[str, Any]:
    """A Serve config file (for `serve deploy` / KubeRay) serving a repository."""
    args: dict[str, Any] = {"model_repository": model_repository}
    if intra_op_threads is not None:
        args["intra_op_threads"] = intra_op_threads
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
    temp_dir = os.environ.get("BATCHWIRE_RAY_TMPDIR") or tempfile.mkdtemp(prefix="bw-ray-")
    root = str(Path(__file__).resolve().parents[1])
    ray.init(
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


def write_serve_config(path: Path, model_repository: str, port: int, threads: int | None) -> None:
    """`batchwire ray-config`: write a Serve config YAML."""
    config = serve_config(model_repository, port=port, intra_op_threads=threads)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
