"""OpenAI-compatible routes, mounted on the service that owns the model they call.

Every error leaves as the OpenAI error shape, `{"error": {"message", "type", "param", "code"}}`, with a
4xx for anything the client can fix; nothing escapes as a bare 500 with a trace.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import anyio
import bentoml
import orjson
from bentoml.exceptions import ServiceUnavailable
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.types import Send

from models.catalog import CATALOG
from services import batch
from services.admission import DEADLINE_PASSED, error_response, rejected, remaining
from services.batching import BACKGROUND, QueueFull
from services.cache import cache_key, count_lookups
from services.config import get_settings
from services.protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    GenerationParams,
    ModelCard,
    ModelList,
    error_body,
)

if TYPE_CHECKING:
    from services.embedding import Embedder

logger = logging.getLogger("bentoml.fnserve.gateway")  # the server logs only the bentoml tree
STARTED = int(time.time())
CACHE_HEADER = "x-fnserve-cache"  # hit, partial or miss: how much of the answer came from the cache
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 429, 503, 504)
}


class OrjsonResponse(Response):
    """JSON written by orjson, which serialises numpy arrays natively: validating 384 floats per input
    through a response model costs more than the forward pass of a short input."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# FastAPI's own docs would show only these routes; BentoML's UI (/) and spec (/docs.json) show them all.
class ClosingEventSourceResponse(EventSourceResponse):
    """Closes its body iterator as soon as sending stops. Starlette leaves the iterator to the garbage
    collector when the client has gone (the send raises), which delays the cancellation of a generation
    by however long that takes."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[union-attr]


app = FastAPI(title="fnserve OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
routes = APIRouter()


@app.exception_handler(APIError)
async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
    if exc.status in (400, 404, 405, 413, 422):  # 429, 503 and 504 are counted where they are decided
        rejected("too_large" if exc.status == 413 else "invalid")
    return error_response(exc.status, exc.message, exc.param, exc.code)


def invalid(errors: Sequence[Any]) -> APIError:
    """A 400 that names the first problem pydantic found, and how many more there are."""
    first = errors[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    # A JSON syntax error's location is a character offset, not a parameter.
    param = location[0] if location and first.get("type") != "json_invalid" else None
    message = f"{'.'.join(location)}: {first['msg']}" if location else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problems)"
    return APIError(400, message, param, first.get("type"))


@app.exception_handler(RequestValidationError)
async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return await on_api_error(_, invalid(exc.errors()))


@app.exception_handler(HTTPException)
async def on_http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), code=HTTPStatus(exc.status_code).phrase)


@app.exception_handler(ServiceUnavailable)
async def on_overload(_: Request, exc: ServiceUnavailable) -> JSONResponse:
    rejected("overloaded")
    return error_response(503, str(exc), code="overloaded")


@app.exception_handler(QueueFull)
async def on_queue_full(_: Request, exc: QueueFull) -> JSONResponse:
    rejected("queue_full")
    return error_response(429, str(exc), code="queue_full")


@app.exception_handler(Exception)
async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    return error_response(500, "internal error; see the server log")


def embedder() -> Embedder:
    return bentoml.get_current_service()


async def check_embedding_request(fn: Embedder, request: EmbeddingRequest) -> list[str]:
    limits = get_settings()
    if request.model.lower() != fn.model_id:
        raise APIError(404, f"The model `{request.model}` does not exist", "model", "model_not_found")
    if request.dimensions is not None and request.dimensions != fn.dimensions:
        raise APIError(400, f"{fn.model_id} only returns {fn.dimensions} dimensions", "dimensions")
    texts = request.texts
    if not texts:
        raise APIError(400, "input must not be empty", "input")
    if len(texts) > limits.embedding_max_inputs:
        raise APIError(400, f"at most {limits.embedding_max_inputs} inputs per request", "input")
    for i, text in enumerate(texts):
        if not text:
            raise APIError(400, f"input[{i}] is an empty string", "input")
        if len(text) > limits.embedding_max_input_chars:
            raise APIError(400, f"input[{i}] is over {limits.embedding_max_input_chars} characters", "input")
    if limits.embedding_overflow == "reject":
        for i, count in enumerate(await fn.token_counts(texts)):
            if count > fn.max_tokens:
                raise APIError(
                    400, f"input[{i}] is {count} tokens, over the model's window of {fn.max_tokens}", "input"
                )
    return texts


@routes.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
async def create_embeddings(request: EmbeddingRequest) -> OrjsonResponse:
    """OpenAI embeddings. Inputs over the token window are truncated to it, or rejected with 400 when
    FNSERVE_EMBEDDING_OVERFLOW=reject. Vectors of inputs seen recently come from a cache (x-fnserve-cache)."""
    fn = embedder()
    texts = await check_embedding_request(fn, request)
    try:
        async with asyncio.timeout(remaining()):  # queued inputs of a request that times out are dropped
            results, hits = await fn.embed(texts)
    except TimeoutError:
        rejected("deadline")
        raise APIError(504, DEADLINE_PASSED, code="deadline_exceeded") from None
    as_base64 = request.encoding_format == "base64"
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(vector.tobytes()).decode() if as_base64 else vector,
        }
        for i, (vector, _) in enumerate(results)
    ]
    tokens = sum(count for _, count in results)
    return OrjsonResponse(
        {
            "object": "list",
            "data": data,
            "model": fn.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers={CACHE_HEADER: "hit" if hits == len(texts) else "partial" if hits else "miss"},
    )


async def generation_events(request: GenerationParams, **target: Any) -> AsyncIterator[dict[str, Any]]:
    """Parsed events from the generation service (newline-delimited JSON over a streamed call).

    Calls through the dependency's own HTTP session rather than the proxy method: the proxy's stream
    wrapper (BentoML 1.4.40) does not close the response when closed early, so the generation would run
    on until the garbage collector found it. Closing this iterator closes the call, which cancels the
    request in the engine."""
    session = await embedder().generator.to_async._session_manager.get_session()
    body = {
        **target,
        "max_tokens": request.token_budget,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stop": request.stops,
        "timeout": remaining(),
        "background": BACKGROUND.get(),
    }
    response = await session.post("/generate", json=body)
    try:
        if response.status != 200:
            detail = (await response.read()).decode(errors="replace")
            raise APIError(response.status if response.status < 500 else 502, detail)
        async for line in response.content:
            if line.strip():
                yield orjson.loads(line)
    finally:
        response.close()


async def complete(request: GenerationParams, chat: bool, **target: Any) -> Response:
    """One chat completion or completion, streamed as SSE or answered whole. Deterministic requests
    (temperature 0, or a seed) are answered from the response cache when they repeat."""
    model = get_settings().generation_model
    if request.model.lower() != model:
        raise APIError(404, f"The model `{request.model}` does not exist", "model", "model_not_found")
    if request.n != 1:
        raise APIError(400, "only n=1 is supported", "n")
    key, cached = await cached_answer(request, target)
    events = replay(cached) if cached else recorded(generation_events(request, **target), key)
    first = await anext(events)
    if first["type"] == "error":
        await events.aclose()
        raise APIError(first["status"], first["message"], first.get("param"), first.get("code"))
    chunks = ChunkWriter(chat, model, first["prompt_tokens"], request)
    headers = {CACHE_HEADER: "hit" if cached else "miss"} if key else None
    if request.stream:
        return ClosingEventSourceResponse(chunks.sse(events), headers=headers)
    text: list[str] = []
    try:
        async for item in events:
            if item["type"] == "error":
                raise APIError(item["status"], item["message"], code=item.get("code"))
            if item["type"] == "delta":
                text.append(item["text"])
            else:
                return OrjsonResponse(chunks.whole("".join(text), item), headers=headers)
    finally:  # also when the handler is cancelled: the engine must drop the request then
        with anyio.CancelScope(shield=True):
            await events.aclose()
    raise APIError(500, "the generation service ended the stream early")


async def cached_answer(request: GenerationParams, target: dict[str, Any]) -> tuple[str | None, bytes | None]:
    """The cache key of a deterministic request (None for others) and its cached answer, if any."""
    cache = embedder().chat_cache
    if cache is None or (request.temperature and request.seed is None):
        return None, None
    settings = get_settings()
    # The server's caps are in the key too: without max_tokens they set the answer's length.
    model = (CATALOG[settings.generation_model].tag, *await embedder().generation_scope())
    caps = (settings.generation_max_tokens,)
    asked = (target, request.token_budget, request.temperature, request.top_p, request.seed, request.stops)
    key = cache_key("generation", *model, *caps, *asked)
    (value,) = await cache.get_many([key])
    count_lookups("generation", value is not None, 1)
    return key, value


async def replay(answer: bytes) -> AsyncIterator[dict[str, Any]]:
    """A cached answer as the generation service's events, the same deltas as when it was generated."""
    saved = orjson.loads(answer)
    yield {"type": "start", "prompt_tokens": saved["prompt_tokens"]}
    for text in saved["deltas"]:
        yield {"type": "delta", "text": text}
    yield {"type": "done", **saved["done"]}


async def recorded(events: AsyncIterator[dict[str, Any]], key: str | None) -> AsyncIterator[dict[str, Any]]:
    """The events, passed on; a complete answer is stored under `key` (errors and cut streams are not)."""
    saved: dict[str, Any] = {"deltas": []}
    try:
        async for item in events:
            if item["type"] == "start":
                saved["prompt_tokens"] = item["prompt_tokens"]
            elif item["type"] == "delta":
                saved["deltas"].append(item["text"])
            elif item["type"] == "done" and key:
                await embedder().chat_cache.set_many({key: orjson.dumps({**saved, "done": item})})
            yield item
    finally:
        await events.aclose()


class ChunkWriter:
    """OpenAI response and stream-chunk bodies for one request."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, request: GenerationParams) -> None:
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.include_usage = bool(request.stream_options and request.stream_options.include_usage)

    def usage(self, completion_tokens: int) -> dict[str, int]:
        total = self.prompt_tokens + completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total,
        }

    def whole(self, text: str, done: dict[str, Any]) -> dict[str, Any]:
        reason = done["finish_reason"]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason}
        kind = "chat.completion" if self.chat else "text_completion"
        return self.body(kind, [choice], usage=self.usage(done["completion_tokens"]))

    def body(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return {**head, "choices": choices, **extra}

    def chunk(self, text: str | None, reason: str | None = None, role: bool = False) -> bytes:
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason}
        extra = {"usage": None} if self.include_usage else {}
        return self.sse_data(self.body(self.kind_chunk, [choice], **extra))

    @property
    def kind_chunk(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    @staticmethod
    def sse_data(body: Any) -> bytes:
        return format_sse_event(data_str=orjson.dumps(body).decode())

    async def sse(self, events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
        """`data: {chunk}` events, then `data: [DONE]`; a failure after the first byte is sent as an
        `event: error` with the OpenAI error body, never as a silently truncated 200."""
        try:
            if self.chat:
                yield self.chunk("", role=True)
            async for item in events:
                if item["type"] == "delta":
                    yield self.chunk(item["text"])
                elif item["type"] == "done":
                    yield self.chunk(None if self.chat else "", item["finish_reason"])
                    if self.include_usage:
                        yield self.sse_data(
                            self.body(self.kind_chunk, [], usage=self.usage(item["completion_tokens"]))
                        )
                    yield format_sse_event(data_str="[DONE]")
                    return
                else:
                    raise APIError(item["status"], item["message"], code=item.get("code"))
            raise APIError(500, "the generation service ended the stream early")
        except Exception as exc:
            if not isinstance(exc, APIError):
                logger.exception("stream failed")
                exc = APIError(500, str(exc))
            body = error_body(exc.status, exc.message, exc.param, exc.code)
            yield format_sse_event(event="error", data_str=orjson.dumps(body).decode())
        finally:
            await events.aclose()


@routes.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def create_chat_completion(request: ChatCompletionRequest) -> Response:
    """OpenAI chat completions; `stream: true` answers with Server-Sent Events."""
    return await complete(request, chat=True, messages=[m.model_dump() for m in request.messages])


@routes.post("/v1/completions", response_model=Completion, responses=ERRORS)
async def create_completion(request: CompletionRequest) -> Response:
    """OpenAI (legacy) completions over a raw prompt; `stream: true` answers with Server-Sent Events."""
    return await complete(request, chat=False, prompt=request.prompt)


@routes.get("/engine/stats")
async def engine_stats() -> dict[str, float]:
    """The generation engine's occupancy: running and waiting requests, free share of its KV cache."""
    return await embedder().generator.stats()


@routes.get("/models/status")
async def models_status() -> dict[str, Any]:
    """Each model's state (`loaded`, `sleeping` or `loading`), device, and the choices made for it at
    start-up with their reasons. The embedding model's state is the answering worker's: every worker
    process holds its own copy."""
    return {**embedder().status(), **await embedder().generator.status()}


@routes.get("/v1/models", response_model=ModelList)
async def list_models() -> ModelList:
    names = [embedder().model_id, get_settings().generation_model]
    return ModelList(data=[ModelCard(id=name, created=STARTED) for name in names])


async def run_line(endpoint: str, body: dict[str, Any]) -> tuple[bool, str]:
    """One batch line through its online route's handler: (True, the output line's `response`) or
    (False, the error line's `error` with the `response`), as JSON text. Server-side failures raise."""
    schema, handler = BATCH_HANDLERS[endpoint]
    try:
        try:
            request = schema.model_validate(body)
        except ValidationError as exc:
            raise invalid(exc.errors()) from exc
        if getattr(request, "stream", False):
            raise APIError(400, "stream is not supported in batch requests", "stream")
        response = await handler(request)
    except APIError as exc:
        if exc.status >= 500:
            raise  # the server's fault, not the line's: the runner tries it again
        status, detail = exc.status, error_body(exc.status, exc.message, exc.param, exc.code)
    else:  # the body is spliced in as it is: decoding and re-encoding its floats would cost more
        head = orjson.dumps({"status_code": 200, "request_id": uuid.uuid4().hex}).decode()
        return True, f'{head[:-1]},"body":{response.body.decode()}}}'
    error = {**detail["error"], "response": {"status_code": status, "body": detail}}
    error["code"] = error["code"] or HTTPStatus(status).phrase.lower().replace(" ", "_")
    return False, orjson.dumps(error).decode()


BATCH_HANDLERS: dict[str, tuple[type[BaseModel], Any]] = {
    "/v1/embeddings": (EmbeddingRequest, create_embeddings),
    "/v1/chat/completions": (ChatCompletionRequest, create_chat_completion),
    "/v1/completions": (CompletionRequest, create_completion),
}

app.include_router(routes)
app.include_router(batch.routes)


@app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def unknown_route(request: Request) -> None:
    """Registered last, so only unmatched /v1 paths reach it: BentoML's mount hands a path to this app
    only when one of its routes matches, and would otherwise answer a plain-text 404."""
    where = request.url.path
    if any(getattr(route, "path", None) == where for route in routes.routes):
        raise APIError(405, f"{request.method} is not allowed on {where}", code="method_not_allowed")
    raise APIError(404, f"no route {where}", code="not_found")
