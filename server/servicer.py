"""The `inference.GRPCInferenceService` servicer: protobuf in, runtime call, protobuf out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Final, TypeVar

import grpc

import batchwire
from batchwire.errors import ErrorCode, InferenceError
from batchwire.types import RequestTiming
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import model_config_pb2 as mc
from server.codec import decode_request, encode_response
from server.inline import InlinePath
from server.runtime import ModelRuntime, ModelVersion
from server.status import grpc_status

if TYPE_CHECKING:  # the servicer runs without monitoring too (tests, --no-monitoring)
    from monitoring.hub import Monitoring
    from monitoring.tracing import RequestTracer

logger = logging.getLogger(__name__)

SERVICE: Final = "inference.GRPCInferenceService"
METHOD_INFER: Final = f"{SERVICE}/ModelInfer"
METHOD_STREAM: Final = f"{SERVICE}/ModelStreamInfer"

SERVER_NAME: Final = "batchwire"
#: Protocol extensions this server implements (reported by ServerMetadata).
EXTENSIONS: Final = (
    "model_configuration",
    "model_repository",
    "statistics",
    "schedule_policy",
    "parameters",
)

_monotonic_ns: Final = time.monotonic_ns
"""One global read on the inline path, not a global and an attribute."""

T = TypeVar("T")
Metadata = Sequence[tuple[str, str | bytes]]

CALL_METADATA: Final[ContextVar[Metadata | None]] = ContextVar(
    "batchwire_call_metadata", default=None
)
"""The current call's invocation metadata as `InferenceHandlers` found it (None: the
service was registered without them)."""


class _Registrations:
    """Stands in for a server to collect what the generated `add_..._to_server` adds."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers as the registered ones

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers.update({f"/{service}/{name}": h for name, h in handlers.items()})


class InferenceHandlers(grpc.GenericRpcHandler):  # type: ignore[misc]
    """The inference service's method handlers, looked up by method name, keeping each
    call's invocation metadata in `CALL_METADATA` for the servicer.

    grpc.aio builds a call's metadata tuple to look its handler up, in the call's own
    task; `context.invocation_metadata()` builds it again (~1.4 µs with perf_analyzer's
    one entry: a namedtuple and two decoded strings per entry), and tracing reads it on
    every request for `traceparent`. Registered through this handler instead of the
    generated `add_GRPCInferenceServiceServicer_to_server` (which also registers the
    methods with grpc's core, looked up before any generic handler), the lookup hands its
    tuple over. It costs a Python call per RPC, so `start_server` uses it only when
    tracing.
    """

    def __init__(self, servicer: pb_grpc.GRPCInferenceServiceServicer) -> None:
        found = _Registrations()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, found)
        self._handlers = found.handlers

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        handler = self._handlers.get(handler_call_details.method)
        if handler is not None:
            CALL_METADATA.set(handler_call_details.invocation_metadata)
        return handler


def call_metadata(context: grpc.aio.ServicerContext[object, object]) -> Metadata:
    """The call's invocation metadata: what `InferenceHandlers` kept, else the context's."""
    metadata = CALL_METADATA.get()
    return context.invocation_metadata() if metadata is None else metadata


def deadline_ns(context: grpc.aio.ServicerContext[object, object]) -> int | None:
    """The RPC's deadline on the monotonic clock, or None when the client set none."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return time.monotonic_ns() + int(remaining * 1e9)


async def _guard(
    context: grpc.aio.ServicerContext[object, object], call: Callable[[], Awaitable[T]]
) -> T:
    """Run a handler body, turning domain errors into the mapped gRPC status."""
    try:
        return await call()
    except InferenceError as exc:
        await context.abort(grpc_status(exc.code), exc.message)
    except (asyncio.CancelledError, grpc.aio.AbortError):
        raise
    except Exception as exc:
        logger.exception("unexpected error")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
    raise AssertionError("unreachable: abort raises")


def model_metadata_pb(model: ModelVersion, versions: list[int]) -> pb.ModelMetadataResponse:
    """Open Inference Protocol metadata of a loaded model version."""
    batch = (-1,) if model.config.max_batch_size > 0 else ()
    out = pb.ModelMetadataResponse(
        name=model.config.name, versions=[str(v) for v in versions], platform=model.config.platform
    )
    for spec in model.inputs:
        out.inputs.add(name=spec.name, datatype=spec.datatype, shape=batch + spec.dims)
    for spec in model.outputs:
        out.outputs.add(name=spec.name, datatype=spec.datatype, shape=batch + spec.dims)
    return out


def status_name(exc: BaseException) -> str:
    """The gRPC status name a request that raised `exc` ends with (for SLOs and spans)."""
    if isinstance(exc, InferenceError):
        return str(grpc_status(exc.code).name)
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "INTERNAL"


def model_config_pb(model: ModelVersion, versions: list[int]) -> mc.ModelConfig:
    """Triton's ModelConfig message for a loaded model."""
    config = model.config
    out = mc.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        max_batch_size=config.max_batch_size,
        default_model_filename=model.path.name,
    )
    out.version_policy.latest.num_versions = config.versions_served
    for spec in config.inputs:
        out.input.add(name=spec.name, data_type=_config_dtype(spec.datatype), dims=spec.dims)
    for spec in config.outputs:
        out.output.add(name=spec.name, data_type=_config_dtype(spec.datatype), dims=spec.dims)
    on_gpu = model.on_gpu
    out.instance_group.add(
        name=config.name,
        kind=mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU,
        count=len(model.batcher.engines),
    )
    if on_gpu and config.gpu is not None:
        out.platform = "tensorrt_plan" if config.gpu.engine == "tensorrt" else "pytorch_libtorch"
    if config.dynamic_batching is not None:
        batching = config.dynamic_batching
        db = out.dynamic_batching
        db.preferred_batch_size.extend(batching.preferred_batch_size)
        db.max_queue_delay_microseconds = batching.max_queue_delay_us
        db.default_queue_policy.max_queue_size = batching.max_queue_size
        db.default_queue_policy.default_timeout_microseconds = batching.default_timeout_us
        db.default_queue_policy.allow_timeout_override = True
    return out


def _config_dtype(datatype: str) -> int:
    # v2 label -> model_config DataType enum ("BYTES" is TYPE_STRING there).
    return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves the Open Inference Protocol from a `ModelRuntime`.

    Args:
        runtime: the models.
        monitoring: traces and SLO feed for inference requests (None = neither).
    """

    def __init__(self, runtime: ModelRuntime, monitoring: Monitoring | None = None) -> None:
        self._runtime = runtime
        self._monitoring = monitoring
        self.accepting = True
        # Each loaded version's inline fast path (or None), keyed by id() and checked by
        # identity: ModelVersion is unhashable, and a reload makes new ones.
        self._inline: dict[int, tuple[ModelVersion, InlinePath | None]] = {}

    def _inline_path(self, request: pb.ModelInferRequest) -> InlinePath | None:
        """The fast path for this request's model, or None (the general path serves it)."""
        try:
            model = self._runtime.get(request.model_name, request.model_version)
        except InferenceError:
            return None  # unknown model or version: the general path answers and counts it
        cached = self._inline.get(id(model))
        if cached is None or cached[0] is not model:
            if len(self._inline) > 64:  # versions unloaded since: forget them
                self._inline.clear()
            cached = self._inline[id(model)] = (model, InlinePath.of(model))
        return cached[1]

    def _inline_infer(
        self,
        path: InlinePath,
        request: pb.ModelInferRequest,
        context: grpc.aio.ServicerContext[object, object],
        method: str,
    ) -> pb.ModelInferResponse | None:
        """`path.infer`, traced or feeding the SLO monitor as `_observed_infer` does.

        Raises:
            InferenceError: as `InlinePath.infer`.
        """
        monitoring = self._monitoring
        if monitoring is None:
            return path.infer(request)
        tracer = monitoring.tracer
        start_ns = _monotonic_ns()
        try:
            answer = path.infer(request)
        except BaseException as exc:
            end_ns = _monotonic_ns()
            if tracer is None:
                monitoring.slo.record(
                    request.model_name, (end_ns - start_ns) / 1e9, status_name(exc)
                )
            else:
                self._record_lane(tracer, path, request, context, method, status_name(exc),
                                  start_ns, end_ns)  # fmt: skip
            raise
        end_ns = _monotonic_ns()
        if answer is None:
            return None  # stepped aside: the general path records this request
        if tracer is None:
            feed = path.slo_feed
            if feed is None:
                feed = path.slo_feed = monitoring.slo.ok_feeds[path.name]
            feed(end_ns - start_ns)
            return answer
        # NOTE: `_record_lane` inlined (a frame less): the spans of a CPU-lane request,
        # decode up to the lane call, encode after (the lane ran: its times are set).
        compute_start_ns, compute_end_ns = path.compute_start_ns, path.compute_end_ns
        metadata = CALL_METADATA.get()  # NOTE: `call_metadata` inlined too
        tracer.record_request(
            context.invocation_metadata() if metadata is None else metadata,
            method, path.name, path.version, "cpu", path.samples, request.id, "OK",
            start_ns, compute_start_ns, compute_start_ns, compute_end_ns, compute_end_ns,
            end_ns,
        )  # fmt: skip
        return answer

    @staticmethod
    def _record_lane(
        tracer: RequestTracer,
        path: InlinePath,
        request: pb.ModelInferRequest,
        context: grpc.aio.ServicerContext[object, object],
        method: str,
        status: str,
        start_ns: int,
        end_ns: int,
    ) -> None:
        """The spans of a CPU-lane request that failed: decode up to the lane call (0 =
        it failed before), encode after."""
        compute_start_ns, compute_end_ns = path.compute_start_ns, path.compute_end_ns
        tracer.record_request(
            call_metadata(context), method, path.name, path.version, "cpu", path.samples,
            request.id, status, start_ns, compute_start_ns or end_ns, compute_start_ns,
            compute_end_ns, compute_end_ns or end_ns, end_ns,
        )  # fmt: skip

    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.accepting and self._runtime.ready)

    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelReadyResponse:
        ready = self.accepting and self._runtime.is_ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=batchwire.__version__, extensions=EXTENSIONS
        )

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelMetadataResponse:
        async def body() -> pb.ModelMetadataResponse:
            model = self._runtime.get(request.name, request.version)
            return model_metadata_pb(model, self._runtime.versions(request.name))

        return await _guard(context, body)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelInferResponse:
        monitoring = self._monitoring
        try:
            path = self._inline_path(request)
            if path is not None:
                answer = self._inline_infer(path, request, context, METHOD_INFER)
                if answer is not None:
                    return answer
            if monitoring is not None:
                # NOTE: metadata (for `traceparent`) may cost a tuple build: only when tracing.
                metadata = call_metadata(context) if monitoring.tracer else None
                return await self._observed_infer(
                    request, deadline_ns(context), metadata, METHOD_INFER
                )
            # The unmonitored path (--no-monitoring): the runtime's own one-call infer.
            decoded = decode_request(request, deadline_ns(context))
            response = await self._runtime.infer(request.model_name, request.model_version, decoded)
            return encode_response(response)
        except InferenceError as exc:
            if context.done():
                # NOTE: the client is gone (deadline passed or cancelled); aborting a
                # finished call raises inside grpc, and nobody would read the status.
                return pb.ModelInferResponse()
            await context.abort(grpc_status(exc.code), exc.message)
        except Exception as exc:
            logger.exception("unexpected error in ModelInfer")
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {exc}")
        raise AssertionError("unreachable: abort raises")

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext[object, object],
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        # Requests on one stream run concurrently (so they can share a batch); each
        # response is sent when ready, carrying the request id, or an error_message.
        done: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        pending: set[asyncio.Task[None]] = set()

        monitoring = self._monitoring
        metadata = call_metadata(context) if monitoring and monitoring.tracer else None

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                if self._monitoring is not None:
                    encoded = await self._observed_infer(
                        request, deadline_ns(context), metadata, METHOD_STREAM
                    )
                else:
                    decoded = decode_request(request, deadline_ns(context))
                    response = await self._runtime.infer(
                        request.model_name, request.model_version, decoded
                    )
                    encoded = encode_response(response)
                await done.put(pb.ModelStreamInferResponse(infer_response=encoded))
            except InferenceError as exc:
                failed = pb.ModelStreamInferResponse(error_message=exc.message)
                failed.infer_response.id = request.id
                failed.infer_response.model_name = request.model_name
                await done.put(failed)

        async def reader() -> None:
            async for request in request_iterator:
                task = asyncio.create_task(one(request))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)
            await done.put(None)

        read_task = asyncio.create_task(reader())
        try:
            while (item := await done.get()) is not None:
                yield item
        finally:
            read_task.cancel()
            for task in list(pending):
                task.cancel()

    async def _observed_infer(
        self,
        request: pb.ModelInferRequest,
        deadline: int | None,
        metadata: Sequence[tuple[str, str | bytes]] | None,
        method: str,
    ) -> pb.ModelInferResponse:
        """Decode, run and encode one request, tracing it (or feeding the SLO monitor).

        Raises:
            InferenceError: as `ModelRuntime.infer` (and INVALID_INPUT from decoding).
        """
        monitoring = self._monitoring
        assert monitoring is not None
        tracer = monitoring.tracer
        start_ns = time.monotonic_ns()
        status = "OK"
        version = request.model_version
        lane = ""
        samples = decoded_ns = encode_ns = 0
        timing = RequestTiming() if tracer is not None else None
        handle = tracer.begin(metadata) if tracer is not None else None
        try:
            model = self._runtime.get(request.model_name, version)
            version = str(model.version)
            try:
                decoded = decode_request(request, deadline)
            except InferenceError as exc:
                model.stats.count_failure(exc)
                raise
            samples = self._runtime.check(model, decoded)
            decoded_ns = time.monotonic_ns()
            response = await self._runtime.run(
                model,
                decoded,
                samples,
                trace=handle.link if handle is not None else None,
                timing=timing,
            )
            lane = str(response.parameters.get("batchwire_lane", ""))
            encode_ns = time.monotonic_ns()
            return encode_response(response)
        except BaseException as exc:
            status = status_name(exc)
            raise
        finally:
            end_ns = time.monotonic_ns()
            if tracer is not None and handle is not None:
                tracer.end_request(
                    handle, method, request.model_name, version, lane, samples, request.id,
                    status, start_ns, decoded_ns, timing, encode_ns, end_ns,
                )  # fmt: skip
            elif status == "OK":
                monitoring.slo.ok_feeds[request.model_name](end_ns - start_ns)
            else:
                monitoring.slo.record(request.model_name, (end_ns - start_ns) / 1e9, status)

    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelConfigResponse:
        async def body() -> pb.ModelConfigResponse:
            model = self._runtime.get(request.name, request.version)
            config = model_config_pb(model, self._runtime.versions(request.name))
            return pb.ModelConfigResponse(config=config)

        return await _guard(context, body)

    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.ModelStatisticsResponse:
        async def body() -> pb.ModelStatisticsResponse:
            if request.name:
                models = [self._runtime.get(request.name, request.version)]
            else:
                models = list(self._runtime.loaded())
            return pb.ModelStatisticsResponse(model_stats=[statistics_pb(m) for m in models])

        return await _guard(context, body)

    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.RepositoryIndexResponse:
        out = pb.RepositoryIndexResponse()
        for entry in self._runtime.index():
            if request.ready and entry.state != "READY":
                continue
            out.models.add(
                name=entry.name, version=entry.version, state=entry.state, reason=entry.reason
            )
        return out

    async def RepositoryModelLoad(
        self,
        request: pb.RepositoryModelLoadRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> pb.RepositoryModelLoadResponse:
        async def body() -> pb.RepositoryModelLoadResponse:
            if request.parameters:
                raise InferenceError(
                    ErrorCode.UNSUPPORTED,
                    "load parameters (config override, file content) are not supported",
                )
            await self._runtime.load(request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await _guard(context, body)

    async def RepositoryModelUnload(
        self,
        request: pb.RepositoryModelUnloadRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> pb.RepositoryModelUnloadResponse:
        async def body() -> pb.RepositoryModelUnloadResponse:
            await self._runtime.unload(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await _guard(context, body)


def statistics_pb(model: ModelVersion) -> pb.ModelStatistics:
    """Triton-style cumulative statistics of one model version (both lanes).

    A CPU-lane request counts as one execution of its own size, so
    `inference_count / execution_count` stays the mean batch size the engine saw.
    """
    stats = model.stats
    batcher = model.batcher.stats
    lane = model.lane
    lane_requests = lane.requests_total if lane else 0
    out = pb.ModelStatistics(
        name=model.config.name,
        version=str(model.version),
        last_inference=stats.last_inference_ms,
        inference_count=batcher.samples_total + (lane.samples_total if lane else 0),
        execution_count=batcher.batches_total + lane_requests,
    )
    inf = out.inference_stats
    inf.success.count, inf.success.ns = stats.success.count, stats.success.ns
    inf.fail.count, inf.fail.ns = stats.fail.count, stats.fail.ns
    inf.queue.count, inf.queue.ns = (
        batcher.computed_requests + lane_requests,
        batcher.queue_ns_total,
    )
    # NOTE: Triton counts compute per request (perf_analyzer checks the three counts are
    # equal); concatenation and splitting are inside compute_infer here.
    computed = batcher.computed_requests + lane_requests
    inf.compute_input.count = inf.compute_output.count = computed
    inf.compute_infer.count = computed
    inf.compute_infer.ns = batcher.compute_request_ns_total + (lane.compute_ns_total if lane else 0)
    for size, count in sorted(batcher.batch_sizes.items()):
        executions = pb.StatisticDuration(count=count)
        out.batch_stats.add(
            batch_size=size,
            compute_input=executions,
            compute_infer=executions,
            compute_output=executions,
        )
    return out
