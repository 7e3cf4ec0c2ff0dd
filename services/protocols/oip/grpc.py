"""The Open Inference Protocol v2 over gRPC (KServe's GRPCInferenceService, with Triton's
ModelStreamInfer), served by every entry worker on FNSERVE_GRPC_PORT.

BentoML's new-style services cannot serve gRPC (`bentoml serve-grpc` refuses them), so each worker runs
a grpc.aio server on the worker's event loop, beside the HTTP app, calling the same functions: its texts join
the same forward passes. The messages are tritonclient's generated stubs (pinned in pyproject.toml), so
the wire is exactly what Triton's clients speak. The port is shared with SO_REUSEPORT: the kernel spreads
connections, not calls, over the workers.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from services import __version__
from services.admission import Admission, count_refusal, rejected
from services.functions.chat import Delta
from services.functions.types import Refused
from services.protocols.oip.models import VERSION, GenerationModel, Model, Repository
from services.protocols.oip.tensors import Tensor, bad_tensor, from_raw, from_values, to_raw

logger = logging.getLogger("bentoml.fnserve.grpc")
Code = grpc.StatusCode
CODES: dict[str, grpc.StatusCode] = {
    "invalid": Code.INVALID_ARGUMENT,
    "not_found": Code.NOT_FOUND,
    "queue_full": Code.RESOURCE_EXHAUSTED,
    "loading": Code.UNAVAILABLE,
    "overloaded": Code.UNAVAILABLE,
    "deadline": Code.DEADLINE_EXCEEDED,
    "failed": Code.INTERNAL,
}
# Which typed field of InferTensorContents carries each datatype (FP16 has none: raw only).
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


class Abort(Exception):
    """A refusal decided here, before any function was asked (a key, the concurrency bound)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def parameters(request: Any) -> dict[str, Any]:
    values = {}
    for key, value in request.parameters.items():
        if (choice := value.WhichOneof("parameter_choice")) is None:
            raise Refused("invalid", f"parameter '{key}' has no value")
        values[key] = getattr(value, choice)
    return values


def decode_inputs(request: pb.ModelInferRequest) -> dict[str, Tensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise bad_tensor(f"{len(request.inputs)} inputs but {len(raw)} raw_input_contents")
    inputs: dict[str, Tensor] = {}
    for i, spec in enumerate(request.inputs):
        shape = list(spec.shape)
        if spec.name in inputs:
            raise bad_tensor(f"input '{spec.name}' is given twice")
        if raw:
            tensor = from_raw(spec.name, spec.datatype, shape, raw[i])
        else:
            field = CONTENTS.get(spec.datatype)
            if field is None:
                raise bad_tensor(f"input '{spec.name}': {spec.datatype!r} must come in raw_input_contents")
            tensor = from_values(spec.name, spec.datatype, shape, list(getattr(spec.contents, field)))
        inputs[spec.name] = tensor
    return inputs


def response(
    request: pb.ModelInferRequest, model: Model, tensors: list[Tensor], final: bool | None = None
) -> pb.ModelInferResponse:
    """Raw contents, one per output in order (tritonclient's `as_numpy` reads those); only the outputs
    the request names, if it names any."""
    asked = [output.name for output in request.outputs]
    chosen = [t for t in tensors if not asked or t.name in asked]
    message = pb.ModelInferResponse(
        model_name=model.name,
        model_version=VERSION,
        id=request.id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in chosen
        ],
        raw_output_contents=[to_raw(t) for t in chosen],
    )
    if final is not None:
        message.parameters["triton_final_response"].bool_param = final
    return message


UNAUTHORIZED = "invalid or missing API key (authorization: Bearer <key>)"
SHUTTING_DOWN = "the server is shutting down; send this call to another replica"
# How long a stopping server refuses new calls itself before it closes its port. grpc cancels a call it
# had taken but not yet handed over when its server stops (the client sees CANCELLED, which neither
# clients nor balancers retry); callers that come in this time get UNAVAILABLE, which they do. The port
# closes once no call has come for QUIET_SECONDS, and at the latest after REFUSING_SECONDS: a server
# that nobody calls stops at once (every scale-down and restart), one under traffic keeps refusing.
QUIET_SECONDS = 0.5
REFUSING_SECONDS = 2.0


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Repository, admission: Admission, draining: asyncio.Event) -> None:
        self.repository, self.admission = repository, admission
        self._ready = repository.fns.ready
        self._draining = draining

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self._ready())

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        async with self.answering(context, admit=False):
            self.repository.get(request.name, request.version)
            return pb.ModelReadyResponse(ready=await self._ready())

    async def ServerMetadata(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        async with self.answering(context, admit=False):
            return pb.ServerMetadataResponse(name="fnserve", version=__version__, extensions=[])

    async def ModelMetadata(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        async with self.answering(context, admit=False):
            meta = self.repository.get(request.name, request.version).metadata()
            tensors = {
                key: [pb.ModelMetadataResponse.TensorMetadata(**spec) for spec in meta[key]]
                for key in ("inputs", "outputs")
            }
            return pb.ModelMetadataResponse(
                name=meta["name"], versions=meta["versions"], platform=meta["platform"], **tensors
            )

    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        """What Triton's tools read: tensors, no server-side batch dimension, and whether responses are
        decoupled (many per request, as streamed generation is)."""
        async with self.answering(context, admit=False):
            model = self.repository.get(request.name, request.version)

            def kind(datatype: str) -> int:
                return mc.DataType.Value("TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}")

            config = mc.ModelConfig(
                name=model.name,
                platform="pytorch",
                max_batch_size=0,
                input=[
                    mc.ModelInput(name=s.name, data_type=kind(s.datatype), dims=s.shape, optional=s.optional)
                    for s in model.inputs
                ],
                output=[
                    mc.ModelOutput(name=s.name, data_type=kind(s.datatype), dims=s.shape)
                    for s in model.outputs
                ],
                model_transaction_policy=mc.ModelTransactionPolicy(decoupled=model.decoupled),
            )
            return pb.ModelConfigResponse(config=config)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        async with self.answering(context) as deadline:
            model = self.repository.get(request.model_name, request.model_version)
            model.check_outputs([output.name for output in request.outputs])  # before the work
            return response(
                request, model, await model.infer(decode_inputs(request), parameters(request), deadline)
            )

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request runs as its own task and answers under its `id`, so requests interleave on one
        stream. A request's error ends that request, not the stream. When the stream ends or is
        cancelled, its requests still running are cancelled in the engine; when the server drains,
        they finish and the stream ends, though the client has not closed it."""
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()

        async def take() -> None:
            async for request in requests:
                task = asyncio.create_task(self._stream_one(request, context, answers.put_nowait))
                running.add(task)
                task.add_done_callback(running.discard)

        async def read() -> bool:
            """Takes requests until the client has sent everything (False) or the server drains
            (True), then waits for their answers; a failure reading the stream ends it at once."""
            try:
                taking, draining = asyncio.create_task(take()), asyncio.create_task(self._draining.wait())
                try:
                    done, _ = await asyncio.wait((taking, draining), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    taking.cancel()
                    draining.cancel()
                if taking in done:
                    await taking
                while running:
                    await asyncio.wait(list(running))
                return taking not in done
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
            if await reader:  # a failure reading the stream surfaces here
                # Requests the client sent after the drain began were not taken: UNAVAILABLE tells it
                # to send those again, elsewhere.
                await context.abort(
                    Code.UNAVAILABLE, f"{SHUTTING_DOWN}: requests without an answer were not taken"
                )
        finally:
            for task in (reader, *running):
                task.cancel()

    async def _stream_one(
        self,
        request: pb.ModelInferRequest,
        context: grpc.aio.ServicerContext,
        put: Callable[[pb.ModelStreamInferResponse], None],
    ) -> None:
        def send(tensors: list[Tensor], final: bool) -> None:
            put(pb.ModelStreamInferResponse(infer_response=response(request, model, tensors, final)))

        model: Model | None = None
        try:
            if not self.admission.enter():
                raise Abort(Code.RESOURCE_EXHAUSTED, self.admission.busy_message)
            try:
                deadline = self.admission.deadline(context.time_remaining())
                model = self.repository.get(request.model_name, request.model_version)
                model.check_outputs([output.name for output in request.outputs])  # before the work
                inputs, asked_for = decode_inputs(request), parameters(request)
                if not isinstance(model, GenerationModel):
                    send(await model.infer(inputs, asked_for, deadline), True)
                    return
                asked, stream = model.request(inputs, asked_for)
                if not stream:
                    send(await model.whole(asked, deadline), True)
                    return
                generation = await model.fn.start(asked, deadline)
                async with generation:
                    async for item in generation:
                        if isinstance(item, Delta):
                            send(model.delta(item.text), False)
                        else:
                            send(model.final("", generation.prompt_tokens, item), True)
            finally:
                self.admission.leave()
        except (Refused, Abort) as exc:
            failed = pb.ModelInferResponse(id=request.id, model_name=request.model_name)
            message = f"[{status_of(exc).name}] {exc}"
            put(pb.ModelStreamInferResponse(error_message=message, infer_response=failed))
        except Exception:
            logger.exception("stream request %r failed", request.id)
            failed = pb.ModelInferResponse(id=request.id, model_name=request.model_name)
            put(
                pb.ModelStreamInferResponse(
                    error_message="[INTERNAL] internal error; see the server log", infer_response=failed
                )
            )

    @asynccontextmanager
    async def answering(self, context: grpc.aio.ServicerContext, admit: bool = True) -> AsyncIterator[float]:
        """Takes a place among the requests in flight (when `admit`) and gives the request's deadline;
        a refusal ends the call with its status (never UNKNOWN). `RequireKey` has checked the key."""
        entered = False
        try:
            if admit:
                if not self.admission.enter():
                    raise Abort(Code.RESOURCE_EXHAUSTED, self.admission.busy_message)
                entered = True
            yield self.admission.deadline(context.time_remaining())
        except (Refused, Abort) as exc:
            if isinstance(exc, Refused) and exc.retry_after:
                # gRPC's own retry policy reads the pushback; retry-after is for people and tools.
                seconds = exc.retry_after
                context.set_trailing_metadata(
                    (("grpc-retry-pushback-ms", str(1000 * seconds)), ("retry-after", str(seconds)))
                )
            await context.abort(status_of(exc), str(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("gRPC call failed")
            await context.abort(Code.INTERNAL, "internal error; see the server log")
        finally:
            if entered:
                self.admission.leave()


def status_of(exc: Refused | Abort) -> grpc.StatusCode:
    """The status a refusal ends its call or request with; counted, if it is bad input."""
    if isinstance(exc, Abort):
        return exc.code
    count_refusal(exc)
    return CODES[exc.kind]


@dataclass
class Malformed:
    """A message that did not parse, handed on by `RejectMalformed` in place of a request."""

    message: str


# What an interceptor calls for the method's handler (the next interceptor's, or the servicer's).
Next = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


class RejectMalformed(grpc.aio.ServerInterceptor):
    """grpc ends a call whose message does not parse with UNKNOWN, as if the server had failed; the
    caller sent it, so it ends INVALID_ARGUMENT. This rewraps grpc's method handler, a namedtuple in
    grpcio 1.85 (pinned); test_oip's unparsable-bytes test fails if that changes."""

    async def intercept_service(
        self, continuation: Next, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer

        def lenient(raw: bytes) -> object:
            try:
                return parse(raw)
            except DecodeError as exc:
                return Malformed(f"the message is not a {details.method.rsplit('/', 1)[-1]} request: {exc}")

        async def refuse(message: object, context: grpc.aio.ServicerContext) -> None:
            if isinstance(message, Malformed):
                await context.abort(Code.INVALID_ARGUMENT, message.message)

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def checked(request: object, context: grpc.aio.ServicerContext) -> object:
                await refuse(request, context)
                return await unary(request, context)

            return handler._replace(request_deserializer=lenient, unary_unary=checked)
        if handler.stream_stream is not None:
            streaming = handler.stream_stream

            async def checked_stream(
                requests: AsyncIterator[object], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[object]:
                async def parsed() -> AsyncIterator[object]:
                    async for request in requests:
                        await refuse(request, context)
                        yield request

                async with aclosing(streaming(parsed(), context)) as answers:
                    async for answer in answers:
                        yield answer

            return handler._replace(request_deserializer=lenient, stream_stream=checked_stream)
        return handler


def refusing_all(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, reason: str | None = None
) -> grpc.RpcMethodHandler:
    """The method's handler, made to end every call with `code` without parsing its message, counted as
    a rejection for `reason` if one is given. Rewraps grpc's method handler as RejectMalformed does."""

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        if reason:  # counted here, not when wrapped: an outer interceptor may answer the call instead
            rejected(reason)
        await context.abort(code, message)

    kind = next(
        k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(handler, k)
    )
    return handler._replace(request_deserializer=lambda raw: raw, **{kind: refuse})


class RequireKey(grpc.aio.ServerInterceptor):
    """A call without a valid key ends UNAUTHENTICATED before its message is parsed, so a caller without
    one costs no more than the bytes it sent. The health probes need none, as over HTTP."""

    PROBES = frozenset(f"/inference.GRPCInferenceService/{name}" for name in ("ServerLive", "ServerReady"))

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def intercept_service(
        self, continuation: Next, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in self.PROBES:
            return handler
        if self.admission.authorized(dict(details.invocation_metadata or ()).get("authorization")):
            return handler
        return refusing_all(handler, Code.UNAUTHENTICATED, UNAUTHORIZED, "unauthorized")


class RefuseWhenDraining(grpc.aio.ServerInterceptor):
    """Once the server is stopping, every new call ends UNAVAILABLE, whatever its method: the callers
    send it to another replica."""

    def __init__(self, draining: asyncio.Event) -> None:
        self.draining = draining
        self.last_call = -math.inf  # the event loop's clock

    async def intercept_service(
        self, continuation: Next, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        self.last_call = asyncio.get_running_loop().time()
        handler = await continuation(details)
        if handler is None or not self.draining.is_set():
            return handler
        return refusing_all(handler, Code.UNAVAILABLE, SHUTTING_DOWN)


@dataclass
class Running:
    server: grpc.aio.Server
    refusing: RefuseWhenDraining

    async def stop(self, grace: float) -> None:
        """New calls are refused and open streams take no new requests; the port closes when calls
        stop coming (QUIET_SECONDS, REFUSING_SECONDS at most), and what is in flight has `grace` seconds
        to finish."""
        self.refusing.draining.set()
        clock = asyncio.get_running_loop().time
        signalled = clock()
        while True:
            await asyncio.sleep(0)  # calls the loop has already taken in reach the interceptor first
            if (wait := closing_in(signalled, self.refusing.last_call, clock())) <= 0:
                break
            await asyncio.sleep(wait)
        await self.server.stop(grace)


def closing_in(signalled: float, last_call: float, now: float) -> float:
    """Seconds until a stopping server may close its port: when no call has come for QUIET_SECONDS,
    or REFUSING_SECONDS after the signal, whichever is first."""
    return max(0.0, min(max(signalled, last_call) + QUIET_SECONDS, signalled + REFUSING_SECONDS) - now)


async def start(
    repository: Repository,
    admission: Admission,
    address: str,
    max_message_bytes: int,
) -> Running:
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 1),  # every worker binds the port
    ]
    draining = asyncio.Event()
    refusing = RefuseWhenDraining(draining)
    # Admission bounds the requests in flight, not the calls open: an open stream with no request
    # running holds no place. gRPC's own bound on calls, twice the requests as BentoML's backstop is over
    # HTTP, keeps idle streams from piling up without limit (past it: RESOURCE_EXHAUSTED).
    server = grpc.aio.server(
        options=options,
        interceptors=[refusing, RequireKey(admission), RejectMalformed()],
        maximum_concurrent_rpcs=2 * admission.max_concurrency,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceService(repository, admission, draining), server
    )
    server.add_insecure_port(address)
    await server.start()
    logger.info("OIP v2 gRPC on %s", address)
    return Running(server, refusing)
