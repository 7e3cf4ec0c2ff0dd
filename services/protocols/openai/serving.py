"""OpenAI-compatible routes: a thin translation of OpenAI's shapes onto the functions' API.

Every error leaves as the OpenAI error shape, `{"error": {"message", "type", "param", "code"}}`, with a
4xx for anything the client can fix; nothing escapes as a bare 500 with a trace.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from http import HTTPStatus
from typing import Any

import anyio
import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import format_sse_event
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from services.admission import DEADLINE, rejected
from services.functions.api import Functions, current
from services.functions.chat import Answer, Delta, Done, Generation, GenerationRequest, vllm_sampling
from services.functions.types import Refused
from services.jobs.db import StoreUnavailable
from services.protocols.openai import batches, images
from services.protocols.openai.protocol import (
    APIError,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    GenerationParams,
    ModelCard,
    ModelList,
    OrjsonResponse,
    TokenizeRequest,
    TokenizeResponse,
    chat_logprobs,
    check_model,
    completion_logprobs,
    error_body,
    error_response,
    invalid,
    plain_messages,
)
from services.protocols.routing import CancelledOnDisconnect, wrong_method
from services.protocols.sse import ClosingEventSourceResponse

logger = logging.getLogger("bentoml.fnserve.gateway")  # the server logs only the bentoml tree
STARTED = int(time.time())
CACHE_HEADER = "x-fnserve-cache"  # hit, partial or miss: how much of the answer came from the cache
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 429, 503, 504)
}


# FastAPI's own docs would show only these routes; BentoML's UI (/) and spec (/docs.json) show them all.
app = FastAPI(title="fnserve OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
routes = APIRouter(route_class=CancelledOnDisconnect)


@app.exception_handler(APIError)
async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
    if exc.status in (400, 404, 405, 413, 422):  # 429, 503 and 504 are counted where they are decided
        rejected("too_large" if exc.status == 413 else "invalid")
    return error_response(exc.status, exc.message, exc.param, exc.code, retry_after=exc.retry_after)


@app.exception_handler(RequestValidationError)
async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return await on_api_error(_, invalid(exc.errors()))


@app.exception_handler(HTTPException)
async def on_http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), code=HTTPStatus(exc.status_code).phrase)


@app.exception_handler(StoreUnavailable)
async def on_store_unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
    """The batch database went away: nothing committed is lost, and the caller can try again."""
    rejected("store_unavailable")
    return error_response(503, str(exc), code="batch_store_unavailable", retry_after=5)


@app.exception_handler(Refused)
async def on_refused(request: Request, exc: Refused) -> JSONResponse:
    return await on_api_error(request, APIError.of(exc))


@app.exception_handler(Exception)
async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    return error_response(500, "internal error; see the server log")


def cache_header(hit: bool | None, partial: bool = False) -> dict[str, str] | None:
    """x-fnserve-cache: hit, partial or miss (how much of the answer came from the cache)."""
    return None if hit is None else {CACHE_HEADER: "hit" if hit else "partial" if partial else "miss"}


async def answer_embeddings(fns: Functions, request: EmbeddingRequest) -> OrjsonResponse:
    fn = fns.embedding
    check_model(request.model, fn.model_id)
    if request.dimensions is not None and request.dimensions != fn.dimensions:
        raise APIError(400, f"{fn.model_id} only returns {fn.dimensions} dimensions", "dimensions")
    texts = request.texts
    await fn.check(texts, field="input", truncate=request.truncate_prompt_tokens == -1)
    result = await fn.embed(texts, DEADLINE.get())  # queued inputs of a request that times out are dropped
    as_base64 = request.encoding_format == "base64"
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": base64.b64encode(vector.tobytes()).decode() if as_base64 else vector,
        }
        for i, vector in enumerate(result.vectors)
    ]
    tokens = sum(result.tokens)
    body = {
        "object": "list",
        "data": data,
        "model": fn.model_id,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    hits = result.hits  # None: no cache, no header
    headers = cache_header(None if hits is None else hits == len(texts), bool(hits))
    return OrjsonResponse(body, headers=headers)


def generation_request(request: GenerationParams, **target: Any) -> GenerationRequest:
    return GenerationRequest(
        max_tokens=request.token_budget,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=request.stop or [],
        skip_special_tokens=request.skip_special_tokens,
        logprobs=request.top_logprobs_count,
        speculate=request.speculation == "auto",
        **vllm_sampling(request),
        **target,
    )


async def start_choices(fns: Functions, asked: list[GenerationRequest], n: int) -> list[Generation]:
    """`n` independent generations of each request (a completion's prompts), request-major, admitted
    together so that they run side by side in the engine's batch; if any is refused, the others are
    closed and the refusal raised, and if the caller is cancelled meanwhile (its client went) those
    started are closed too: a cancelled gather drops what its children returned, and they were left
    for the garbage collector to close."""
    starting = [
        asyncio.ensure_future(fns.chat.start(one, DEADLINE.get(), sample))
        for one in asked
        for sample in range(n)
    ]
    try:
        await asyncio.wait(starting)
    except BaseException:
        for task in starting:
            task.cancel()
        await asyncio.wait(starting)
        await close_started(starting)
        raise
    if refused := [task.exception() for task in starting if not task.cancelled() and task.exception()]:
        await close_started(starting)
        raise refused[0]
    return [task.result() for task in starting]


async def close_started(starting: list[asyncio.Future[Generation]]) -> None:
    for task in starting:
        if not task.cancelled() and task.exception() is None:
            await task.result().aclose()


async def answer_completion(
    fns: Functions, request: GenerationParams, chat: bool, targets: list[dict[str, Any]]
) -> Response:
    """A chat completion (one target: the messages) or a completion (a target per prompt), with `n`
    choices each, streamed as SSE or answered whole."""
    check_model(request.model, fns.chat.model_id)
    asked = [generation_request(request, **target) for target in targets]
    generations = await start_choices(fns, asked, request.n)
    prompt_tokens = sum(generation.prompt_tokens for generation in generations[:: request.n])
    chunks = ChunkWriter(chat, fns.chat.model_id, prompt_tokens, request)
    cached = [generation.cached for generation in generations]
    headers = cache_header(None if cached[0] is None else all(cached), any(cached))
    if request.stream:
        return ClosingEventSourceResponse(chunks.sse(generations), headers=headers)
    readers = [asyncio.ensure_future(generation.text()) for generation in generations]
    try:
        answers = await asyncio.gather(*readers)
    finally:  # also when one choice fails or the handler is cancelled: the engine must drop them all
        await close_choices(generations, readers)
    return OrjsonResponse(chunks.whole(answers), headers=headers)


async def close_choices(generations: list[Generation], readers: list[asyncio.Future[Any]]) -> None:
    """Stops the tasks that read the choices, then closes the choices, which drops their requests in
    the engine: a generation a task is still reading cannot be closed ("already running"). Shielded,
    as it must finish when the handler is being cancelled."""
    with anyio.CancelScope(shield=True):
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for generation in generations:
            await generation.aclose()


async def answer_chat(fns: Functions, request: ChatCompletionRequest) -> Response:
    return await answer_completion(fns, request, True, [{"messages": plain_messages(request.messages)}])


async def answer_text_completion(fns: Functions, request: CompletionRequest) -> Response:
    return await answer_completion(fns, request, False, [{"prompt": prompt} for prompt in request.prompts])


@routes.post("/v1/embeddings", response_model=EmbeddingResponse, responses=ERRORS)
async def create_embeddings(request: EmbeddingRequest) -> OrjsonResponse:
    """OpenAI embeddings. Inputs over the token window are truncated to it, or rejected with 400 when
    FNSERVE_EMBEDDING_OVERFLOW=reject. Vectors of inputs seen recently come from a cache (x-fnserve-cache)."""
    return await answer_embeddings(current(), request)


class ChunkWriter:
    """OpenAI response and stream-chunk bodies for one request."""

    def __init__(self, chat: bool, model: str, prompt_tokens: int, request: GenerationParams) -> None:
        self.chat, self.model, self.prompt_tokens = chat, model, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        options = request.stream_options
        self.include_usage = bool(options and options.include_usage)
        self.usage_on_every_chunk = self.include_usage and bool(options and options.continuous_usage_stats)
        self.logprobs = request.top_logprobs_count is not None
        self.offsets: dict[int, int] = {}  # completions: each choice's characters sent so far

    def logprobs_of(self, index: int, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        """A choice's `logprobs` for these tokens, in the route's shape; None where not asked."""
        if not self.logprobs:
            return None
        if self.chat:
            return chat_logprobs(entries)
        shaped = completion_logprobs(entries, self.offsets.get(index, 0))
        self.offsets[index] = self.offsets.get(index, 0) + sum(len(e["token"]) for e in entries)
        return shaped

    def usage(self, completion_tokens: int) -> dict[str, int]:
        """The prompt counts once, however many choices share it (as OpenAI counts it)."""
        total = self.prompt_tokens + completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total,
        }

    def whole(self, answers: list[Answer]) -> dict[str, Any]:
        choices = []
        for index, answer in enumerate(answers):
            choice: dict[str, Any] = {"index": index, "finish_reason": answer.done.finish_reason}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": answer.text}
            else:
                choice["text"] = answer.text
            if self.logprobs:
                choice["logprobs"] = self.logprobs_of(index, answer.logprobs)
            choices.append(choice)
        kind = "chat.completion" if self.chat else "text_completion"
        tokens = sum(answer.done.completion_tokens for answer in answers)
        return self.body(kind, choices, usage=self.usage(tokens))

    def body(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return {**head, "choices": choices, **extra}

    def chunk(
        self,
        index: int,
        text: str | None,
        reason: str | None = None,
        role: bool = False,
        tokens: int = 0,
        logprobs: list[dict[str, Any]] | None = None,
    ) -> bytes:
        """One choice's chunk; `tokens` is every choice's completion tokens so far, `logprobs` the
        entries of this chunk's tokens."""
        if self.chat:
            delta: dict[str, str] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": reason}
        if logprobs is not None:
            choice["logprobs"] = self.logprobs_of(index, logprobs)
        extra: dict[str, Any] = {}
        if self.usage_on_every_chunk:
            extra["usage"] = self.usage(tokens)
        elif self.include_usage:
            extra["usage"] = None
        return self.sse_data(self.body(self.kind_chunk, [choice], **extra))

    @property
    def kind_chunk(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    @staticmethod
    def sse_data(body: Any) -> bytes:
        return format_sse_event(data_str=orjson.dumps(body).decode())

    async def sse(self, generations: list[Generation]) -> AsyncIterator[bytes]:
        """`data: {chunk}` events, then `data: [DONE]`; a failure after the first byte is sent as an
        `event: error` with the OpenAI error body, never as a silently truncated 200."""
        tokens = [0] * len(generations)
        started: set[int] = set()
        try:
            async with aclosing(interleaved(generations)) as items:
                async for index, item in items:
                    # A choice's role comes with its first token, not before: a tool timing the first chunk
                    # then measures the time to the first token.
                    if self.chat and index not in started:
                        started.add(index)
                        yield self.chunk(index, "", role=True, tokens=sum(tokens))
                    tokens[index] = item.completion_tokens
                    if isinstance(item, Delta):
                        yield self.chunk(index, item.text, tokens=sum(tokens), logprobs=item.logprobs)
                    else:
                        yield self.chunk(
                            index, None if self.chat else "", item.finish_reason, tokens=sum(tokens)
                        )
            if self.include_usage:
                yield self.sse_data(self.body(self.kind_chunk, [], usage=self.usage(sum(tokens))))
            yield format_sse_event(data_str="[DONE]")
        except Exception as exc:
            if isinstance(exc, Refused):
                exc = APIError.of(exc)
            elif not isinstance(exc, APIError):
                logger.exception("stream failed")
                exc = APIError(500, str(exc))
            body = error_body(exc.status, exc.message, exc.param, exc.code)
            yield format_sse_event(event="error", data_str=orjson.dumps(body).decode())
        finally:
            await close_choices(generations, [])


async def interleaved(generations: list[Generation]) -> AsyncIterator[tuple[int, Delta | Done]]:
    """Every choice's deltas and its Done as they come, tagged with the choice's index; the first
    failure of any raises."""
    if len(generations) == 1:  # no task and queue per token for the common case
        async for item in generations[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Delta | Done | BaseException]] = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for item in generation:
                await queue.put((index, item))
        except Exception as exc:
            await queue.put((index, exc))

    pumps = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        left = len(generations)
        while left:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            left -= isinstance(item, Done)
            yield index, item
    finally:
        await close_choices([], pumps)


@routes.post("/v1/chat/completions", response_model=ChatCompletion, responses=ERRORS)
async def create_chat_completion(request: ChatCompletionRequest) -> Response:
    """OpenAI chat completions; `stream: true` answers with Server-Sent Events. Deterministic requests
    (temperature 0, or a seed) are answered from the response cache when they repeat."""
    return await answer_chat(current(), request)


@routes.post("/v1/completions", response_model=Completion, responses=ERRORS)
async def create_completion(request: CompletionRequest) -> Response:
    """OpenAI (legacy) completions over a raw prompt; `stream: true` answers with Server-Sent Events."""
    return await answer_text_completion(current(), request)


@routes.get("/engine/stats")
async def engine_stats() -> dict[str, float]:
    """The generation engine's occupancy: running and waiting requests, free share of its KV cache."""
    return await current().chat.stats()


@routes.get("/models/status")
async def models_status() -> dict[str, Any]:
    """Each model's state (`loaded`, `sleeping` or `loading`), device, and the choices made for it at
    start-up with their reasons. The embedding model's state is the answering worker's: every worker
    process holds its own copy."""
    return await current().status()


@routes.get("/v1/models", response_model=ModelList)
async def list_models() -> ModelList:
    fns = current()
    windows = {
        fns.embedding.model_id: fns.embedding.max_tokens,
        fns.chat.model_id: await fns.chat.max_model_len(),
    }
    cards = [ModelCard(id=name, created=STARTED, max_model_len=windows.get(name)) for name in fns.model_ids]
    return ModelList(data=cards)


# vLLM's own routes, which benchmark tools and clients of vLLM call.


@routes.get("/health", response_class=Response, responses={503: {"model": ErrorResponse}})
async def health() -> Response:
    """200 once every function serves, as vLLM's /health; 503 before."""
    if await current().ready():
        return Response(status_code=200)
    return error_response(503, "the server is starting", code="model_loading")


@routes.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
    """The chat model's token ids for a prompt or a chat, as vLLM's /tokenize."""
    chat = current().chat
    check_model(request.model, chat.model_id)
    if (request.prompt is None) == (request.messages is None):
        raise APIError(400, "send exactly one of prompt and messages", "prompt")
    messages = None if request.messages is None else plain_messages(request.messages)
    tokens = await chat.tokenize(messages, request.prompt, request.add_special_tokens)
    strings = await chat.token_strings(tokens) if request.return_token_strs else None
    window = await chat.max_model_len()
    return TokenizeResponse(count=len(tokens), max_model_len=window, tokens=tokens, token_strs=strings)


@routes.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
    chat = current().chat
    check_model(request.model, chat.model_id)
    return DetokenizeResponse(prompt=await chat.detokenize(request.tokens))


ANSWERS: dict[str, tuple[type[BaseModel], Any]] = {
    "/v1/embeddings": (EmbeddingRequest, answer_embeddings),
    "/v1/chat/completions": (ChatCompletionRequest, answer_chat),
    "/v1/completions": (CompletionRequest, answer_text_completion),
    "/v1/images/classifications": (images.ClassificationRequest, images.answer_line),
}


async def run_line(endpoint: str, body: dict[str, Any]) -> tuple[bool, str]:
    """One batch line (an OpenAI request body) through the same translation as its online route:
    (True, the output line's `response`) or (False, the error line's `error` with the `response`), as
    JSON text. Server-side failures raise."""
    schema, answer = ANSWERS[endpoint]
    try:
        try:
            request = schema.model_validate(body)
        except ValidationError as exc:
            raise invalid(exc.errors()) from exc
        if getattr(request, "stream", False):
            raise APIError(400, "stream is not supported in batch requests", "stream")
        try:
            response = await answer(current(), request)
        except Refused as exc:
            raise APIError.of(exc) from exc
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


app.include_router(routes)
app.include_router(batches.routes)
app.include_router(images.routes)


@app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def unknown_route(request: Request) -> JSONResponse:
    """Registered last, so only unmatched /v1 paths reach it: BentoML's mount hands a path to this app
    only when one of its routes matches, and would otherwise answer a plain-text 404."""
    if wrong := wrong_method((*routes.routes, *batches.routes.routes, *images.routes.routes), request):
        message, methods = wrong
        return error_response(405, message, code="method_not_allowed", headers={"Allow": methods})
    raise APIError(404, f"no route {request.url.path}", code="not_found")
