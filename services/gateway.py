"""OpenAI-compatible routes, mounted on the service that owns the model they call.

Every error leaves as the OpenAI error shape, `{"error": {"message", "type", "param", "code"}}`, with a
4xx for anything the client can fix; nothing escapes as a bare 500 with a trace.
"""

from __future__ import annotations

import base64
import logging
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import bentoml
import orjson
from bentoml.exceptions import ServiceUnavailable
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from services.config import get_settings
from services.protocol import EmbeddingRequest, EmbeddingResponse, ErrorResponse, ModelCard, ModelList

if TYPE_CHECKING:
    from services.embedding import Embedder

logger = logging.getLogger("fnserve.gateway")
STARTED = int(time.time())
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 404, 503)}


class VectorsResponse(Response):
    """JSON written by orjson, which serialises numpy arrays natively: validating 384 floats per input
    through a response model costs more than the forward pass of a short input."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# FastAPI's own docs would show only these routes; BentoML's UI (/) and spec (/docs.json) show them all.
app = FastAPI(title="fnserve OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
routes = APIRouter()


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


@app.exception_handler(APIError)
async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code)


@app.exception_handler(RequestValidationError)
async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    # A JSON syntax error's location is a character offset, not a parameter.
    param = location[0] if location and first.get("type") != "json_invalid" else None
    message = f"{'.'.join(location)}: {first['msg']}" if location else first["msg"]
    if len(exc.errors()) > 1:
        message += f" (and {len(exc.errors()) - 1} more problems)"
    return error_response(400, message, param, first.get("type"))


@app.exception_handler(HTTPException)
async def on_http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), code=HTTPStatus(exc.status_code).phrase)


@app.exception_handler(ServiceUnavailable)
async def on_overload(_: Request, exc: ServiceUnavailable) -> JSONResponse:
    return error_response(503, str(exc), code="overloaded")


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
async def create_embeddings(request: EmbeddingRequest) -> VectorsResponse:
    """OpenAI embeddings. Inputs over the token window are truncated to it, or rejected with 400 when
    FNSERVE_EMBEDDING_OVERFLOW=reject."""
    fn = embedder()
    texts = await check_embedding_request(fn, request)
    results = await fn.embed(texts)
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
    return VectorsResponse(
        {
            "object": "list",
            "data": data,
            "model": fn.model_id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


@routes.get("/v1/models", response_model=ModelList)
async def list_models() -> ModelList:
    return ModelList(data=[ModelCard(id=embedder().model_id, created=STARTED)])


app.include_router(routes)


@app.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def unknown_route(request: Request) -> None:
    """Registered last, so only unmatched /v1 paths reach it: BentoML's mount hands a path to this app
    only when one of its routes matches, and would otherwise answer a plain-text 404."""
    where = request.url.path
    if any(getattr(route, "path", None) == where for route in routes.routes):
        raise APIError(405, f"{request.method} is not allowed on {where}", code="method_not_allowed")
    raise APIError(404, f"no route {where}", code="not_found")
