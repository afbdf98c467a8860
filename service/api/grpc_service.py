"""KServe V2 over gRPC (`inference.GRPCInferenceService`), beside REST in every HTTP worker.

Thin, like the REST routes: each RPC parses its message, makes one call into the same
`ServiceState` (the dataplane: readiness, models, the batcher, deadlines, the drain), and
encodes the answer. So gRPC and REST share the batches, the errors, the metrics
(`escort_requests_total{protocol="grpc"}`, with `code` the HTTP status the same error gets over
REST), the API key (metadata `authorization: Bearer <key>`), readiness and the drain. A
service error becomes a gRPC status here, in `GRPC_STATUS`, and nowhere else.

Every worker binds ESCORT_GRPC_PORT with SO_REUSEPORT (gRPC's default on Linux), so the kernel
spreads gRPC connections over the workers as it does the REST ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from service.api.deps import check_api_key
from service.api.grpc_codec import encode_grpc_infer_response, parse_grpc_infer_request
from service.api.repository import check_load_parameters
from service.api.state import ServiceState
from service.api.v2 import EXTENSIONS, model_metadata, server_version
from service.errors import NotReadyError, ServiceError

log = logging.getLogger("escort.grpc")

# HTTP status of a ServiceError -> the gRPC status a client sees for it.
GRPC_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(error: ServiceError) -> grpc.StatusCode:
    return GRPC_STATUS.get(error.status_code, grpc.StatusCode.INTERNAL)


async def _abort(context: grpc.aio.ServicerContext, error: ServiceError) -> None:
    # Retry-After travels as trailing metadata, as the header does over REST.
    trailers = tuple((k.lower(), v) for k, v in error.headers.items() if k.lower() == "retry-after")
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(grpc_status(error), error.message)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The V2 RPCs over one app's ServiceState (`state_of()`: None before the lifespan ran)."""

    def __init__(self, state_of: Callable[[], ServiceState | None]) -> None:
        self._state_of = state_of

    def _state(self) -> ServiceState:
        state = self._state_of()
        if state is None:
            raise NotReadyError("the server is starting")
        return state

    async def _call(self, context, work: Callable[[ServiceState], Awaitable[Any]]):
        try:
            return await work(self._state())
        except ServiceError as error:
            await _abort(context, error)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception:
            log.exception("unexpected error in a gRPC call")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        state = self._state_of()
        return pb.ServerReadyResponse(ready=state is not None and state.not_ready_reason() is None)

    async def ModelReady(self, request, context):
        async def ready(state: ServiceState):
            try:
                state.describe(request.name, request.version)
            except NotReadyError:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=state.not_ready_reason() is None)

        return await self._call(context, ready)

    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name="escort-serve", version=server_version(), extensions=EXTENSIONS
        )

    async def ModelMetadata(self, request, context):
        async def describe(state: ServiceState):
            desc = state.describe(request.name, request.version)
            found = model_metadata(desc, [d.version for d in state.versions(desc.model_name)])
            return pb.ModelMetadataResponse(
                name=found["name"],
                versions=found["versions"],
                platform=found["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in found["inputs"]],
                outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in found["outputs"]],
            )

        return await self._call(context, describe)

    async def RepositoryIndex(self, request, context):
        async def index(state: ServiceState):
            _check_key(state, context)
            rows = state.repository_index(ready_only=request.ready)
            entries = [pb.RepositoryIndexResponse.ModelIndex(**row) for row in rows]
            return pb.RepositoryIndexResponse(models=entries)

        return await self._call(context, index)

    async def RepositoryModelLoad(self, request, context):
        async def load(state: ServiceState):
            _check_key(state, context)
            check_load_parameters(request.parameters.keys())
            await state.load_model(request.model_name)
            return pb.RepositoryModelLoadResponse()

        return await self._call(context, load)

    async def RepositoryModelUnload(self, request, context):
        async def unload(state: ServiceState):
            _check_key(state, context)
            await state.unload_model(request.model_name)
            return pb.RepositoryModelUnloadResponse()

        return await self._call(context, unload)

    async def ModelInfer(self, request, context):
        start = time.monotonic()
        outcome = {"code": 500, "backend": "none"}

        async def infer(state: ServiceState):
            try:
                return await self._infer(state, request, context, outcome)
            finally:
                _record(state, request.model_name, outcome, time.monotonic() - start)

        return await self._call(context, infer)

    async def _infer(self, state: ServiceState, request, context, outcome) -> pb.ModelInferResponse:
        try:
            _check_key(state, context)
            if state.draining:
                raise state.refuse_while_draining(request.model_name)
            async with state.tracked():  # a drain waits for these
                response = await self._answer(state, request, context, outcome)
        except ServiceError as error:
            outcome["code"] = error.status_code
            raise
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed
            outcome["code"] = 499
            raise
        outcome["code"] = 200
        return response

    async def _answer(self, state: ServiceState, request, context, outcome):
        started = time.perf_counter()
        desc = state.describe(request.model_name, request.model_version)
        parsed = parse_grpc_infer_request(request, desc.input_shape)
        backend = state.resolve_backend(desc, parsed.backend)
        outcome["backend"] = backend
        state.observe_stage(desc.name, backend, "parse", time.perf_counter() - started)
        remaining = context.time_remaining()  # the client's gRPC deadline, if it set one
        timeouts = [t for t in (parsed.timeout_s, remaining) if t is not None and t > 0]
        deadline = state.deadline(min(timeouts) if timeouts else None)
        if parsed.images is not None:
            probabilities = await state.classify_images(desc, backend, parsed.images, deadline)
        else:
            probabilities = await state.classify_tensor(desc, backend, parsed.tensor, deadline)  # type: ignore[arg-type]
        encoding = time.perf_counter()
        response = encode_grpc_infer_response(desc, parsed, probabilities, backend)
        state.observe_stage(desc.name, backend, "encode", time.perf_counter() - encoding)
        return response


def _check_key(state: ServiceState, context) -> None:
    metadata = dict(context.invocation_metadata() or ())
    check_api_key(state.settings.api_key, str(metadata.get("authorization", "")))


def _record(state: ServiceState, model: str, outcome: dict[str, Any], seconds: float) -> None:
    label = state.model_label(model)
    state.metrics.requests.labels(label, outcome["backend"], "grpc", str(outcome["code"])).inc()
    if label != "unknown":
        state.metrics.request_duration.labels(label, outcome["backend"]).observe(seconds)


async def start_grpc_server(
    state_of: Callable[[], ServiceState | None], host: str, port: int, max_message_bytes: int
) -> grpc.aio.Server:
    """The gRPC server on host:port (shared with the other workers through SO_REUSEPORT)."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state_of), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"cannot listen for gRPC on {address}: {exc}; set ESCORT_GRPC_PORT") from None
    await server.start()
    return server
