"""The Open Inference Protocol v2 over REST, at /v2 on the HTTP port: health, metadata, `infer` (JSON
and the binary tensor extension, tritonclient.http's default), and Triton's `generate` and
`generate_stream` (SSE) extension for the chat model. Errors leave in the protocol's shape,
`{"error": "<message>"}`, with a 4xx for anything the client can fix."""

from __future__ import annotations

import logging
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.sse import format_sse_event
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException

from services import __version__
from services.admission import DEADLINE, count_refusal
from services.config import get_settings
from services.functions.api import current
from services.functions.chat import Delta, GenerationRequest
from services.functions.types import Refused
from services.protocols.nulls import RequestModel
from services.protocols.oip.models import (
    VERSION,
    GenerationModel,
    Model,
    Repository,
    repository_of,
)
from services.protocols.oip.tensors import (
    Tensor,
    bad_tensor,
    bytes_tensor,
    from_raw,
    from_values,
    to_raw,
    to_values,
)
from services.protocols.routing import CancelledOnDisconnect, wrong_method
from services.protocols.sse import ClosingEventSourceResponse
from services.protocols.status import HTTP_STATUS

logger = logging.getLogger("bentoml.fnserve.oip")
PREFIX = "/v2"
HEADER_LENGTH = "Inference-Header-Content-Length"


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, Any] | None = None,
    retry_after: int | None = None,
) -> JSONResponse:
    """The protocol's error shape; refusals for load (429, 503) say when to try again."""
    retry = {"Retry-After": str(retry_after or 1)} if status in (429, 503) else {}
    return JSONResponse({"error": message}, status_code=status, headers={**retry, **(headers or {})})


app = FastAPI(title="fnserve Open Inference Protocol v2", docs_url=None, redoc_url=None, openapi_url=None)
routes = APIRouter(prefix=PREFIX, route_class=CancelledOnDisconnect)


@app.exception_handler(Refused)
async def on_refused(_: Request, exc: Refused) -> JSONResponse:
    count_refusal(exc)
    return error_response(HTTP_STATUS[exc.kind], exc.message, retry_after=exc.retry_after)


@app.exception_handler(HTTPException)
async def on_http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


@app.exception_handler(Exception)
async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error on %s", request.url.path)
    return error_response(500, "internal error; see the server log")


def repository() -> Repository:
    return repository_of(current())


class V2Model(RequestModel):
    """A v2 inference request, or part of one."""


class RequestedOutput(V2Model):
    name: str
    parameters: dict[str, Any] = {}


class InputTensor(V2Model):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = {}
    data: Any = None


class InferRequest(V2Model):
    id: str | None = None
    model_name: str | None = Field(None, description="KServe's REST client sends it: the path's model")
    model_version: str | None = None
    parameters: dict[str, Any] = {}
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] = []


def parse(model_cls: type[BaseModel], raw: bytes) -> Any:
    try:
        return model_cls.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = f"{where}: {first['msg']}" if where else first["msg"]
        raise Refused("invalid", f"malformed request: {message}") from None


def inflated(body: bytes, encoding: str, limit: int) -> bytes:
    """A body sent compressed, as tritonclient's `request_compression_algorithm` sends it (and Triton
    takes it): gzip, or deflate in zlib's format. At most `limit` bytes once inflated, the body bound
    the server holds uncompressed bodies to."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise Refused("invalid", f"Content-Encoding {encoding} is not taken here; send gzip, deflate or none")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise Refused("invalid", f"the body is not {encoding} data: {exc}") from None
    if len(data) > limit:
        raise Refused("invalid", f"the body is over {limit} bytes once inflated")
    if not inflater.eof or inflater.unused_data:
        raise Refused("invalid", f"the body is not one whole {encoding} stream")
    return data


async def infer_request(request: Request) -> tuple[InferRequest, dict[str, Tensor]]:
    """The request's JSON header and its tensors, from JSON `data` or the binary section that follows
    the header (its length in Inference-Header-Content-Length), inflated first if it came compressed."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    body = inflated(await request.body(), encoding, get_settings().max_body_bytes)
    length = request.headers.get(HEADER_LENGTH)
    binary = b""
    if length is not None:
        if not (length.isascii() and length.isdigit()) or int(length) > len(body):  # '²' is a digit
            raise Refused("invalid", f"{HEADER_LENGTH} must be the JSON header's size, at most the body's")
        body, binary = body[: int(length)], body[int(length) :]
    parsed: InferRequest = parse(InferRequest, body)
    inputs: dict[str, Tensor] = {}
    offset = 0
    for spec in parsed.inputs:
        if spec.name in inputs:
            raise bad_tensor(f"input '{spec.name}' is given twice")
        size = spec.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise bad_tensor(f"input '{spec.name}': binary_data_size {size!r} runs past the binary data")
            tensor = from_raw(spec.name, spec.datatype, spec.shape, binary[offset : offset + size])
            offset += size
        elif spec.data is None:
            raise bad_tensor(f"input '{spec.name}' has neither data nor binary_data_size")
        else:
            tensor = from_values(spec.name, spec.datatype, spec.shape, spec.data)
        inputs[spec.name] = tensor
    if offset != len(binary):
        raise Refused("invalid", f"{len(binary) - offset} bytes of binary data belong to no input")
    return parsed, inputs


def infer_response(parsed: InferRequest, model: Model, tensors: list[Tensor]) -> Response:
    """JSON `data`, or binary outputs where the request asks for them (per output, or all with
    `binary_data_output`)."""
    asked = {output.name: output for output in parsed.outputs}
    every_binary = bool(parsed.parameters.get("binary_data_output", False))
    outputs, blobs = [], []
    for tensor in tensors:
        if asked and tensor.name not in asked:
            continue
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        wanted = asked.get(tensor.name)
        if wanted.parameters.get("binary_data", every_binary) if wanted else every_binary:
            blob = to_raw(tensor)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = to_values(tensor)
        outputs.append(entry)
    head: dict[str, Any] = {"model_name": model.name, "model_version": VERSION, "outputs": outputs}
    if parsed.id is not None:
        head["id"] = parsed.id
    header = orjson.dumps(head)
    if not blobs:
        return Response(header, media_type="application/json")
    headers = {HEADER_LENGTH: str(len(header))}
    return Response(header + b"".join(blobs), media_type="application/octet-stream", headers=headers)


@routes.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@routes.get("/health/ready")
async def server_ready() -> Response:
    ok = await current().ready()
    return JSONResponse({"ready": ok}, status_code=200 if ok else 503)


@routes.get("")
async def server_metadata() -> dict[str, Any]:
    return {
        "name": "fnserve",
        "version": __version__,
        "extensions": ["binary_tensor_data", "generate"],
    }


@routes.get("/models/{name}")
@routes.get("/models/{name}/versions/{model_version}")
async def model_metadata(name: str, model_version: str = "") -> dict[str, Any]:
    return repository().get(name, model_version).metadata()


@routes.get("/models/{name}/ready")
@routes.get("/models/{name}/versions/{model_version}/ready")
async def model_ready(name: str, model_version: str = "") -> Response:
    repository().get(name, model_version)
    ok = await current().ready()
    return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)


@routes.post("/models/{name}/infer")
@routes.post("/models/{name}/versions/{model_version}/infer")
async def infer(name: str, request: Request, model_version: str = "") -> Response:
    """One inference. The embedding model takes BYTES `text` [n] and answers FP32 `embedding` [n, 384], the
    image model BYTES `image` [n] or FP32 `input` [n, 3, 224, 224] and answers its top-k labels;
    the chat model answers its whole text (for tokens as they come, use generate_stream or gRPC's
    ModelStreamInfer)."""
    model = repository().get(name, model_version)
    parsed, inputs = await infer_request(request)
    if parsed.model_name not in (None, name) or parsed.model_version not in (
        None,
        "",
        model_version,
        VERSION,
    ):
        named = f"{parsed.model_name} version {parsed.model_version}"
        raise Refused("invalid", f"the body names model {named}, the path {name}; they must agree")
    model.check_outputs([output.name for output in parsed.outputs])  # before the work, not after
    return infer_response(parsed, model, await model.infer(inputs, parsed.parameters, DEADLINE.get()))


async def generate_request(
    name: str, request: Request, model_version: str = ""
) -> tuple[GenerationModel, GenerationRequest, dict[str, Any]]:
    """Triton's generate extension: a JSON object of input values (`text_input`, and the vLLM backend's
    `sampling_parameters`, a JSON object or a string holding one) and `parameters`, other keys being
    parameters too; the model, the request and the head of each answer. Either route streams as its
    name says."""
    model = repository().get(name, model_version)
    if not isinstance(model, GenerationModel):
        raise Refused("invalid", f"model '{name}' does not generate text; use infer")
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise Refused("invalid", f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("text_input"), str):
        raise Refused("invalid", "the body must be a JSON object with a string `text_input`")
    if body.get("id") is not None and not isinstance(body["id"], str):  # echoed: Triton's is a string
        raise Refused("invalid", "`id` must be a string")
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise Refused("invalid", "`parameters` must be a JSON object")
    extra = {k: v for k, v in body.items() if k not in ("text_input", "parameters", "id")}
    inputs = {"text_input": bytes_tensor("text_input", body["text_input"])}
    if (sampling := extra.pop("sampling_parameters", None)) is not None:
        if isinstance(sampling, dict):
            try:
                sampling = orjson.dumps(sampling).decode()
            except orjson.JSONEncodeError:  # orjson reads 1,024 levels deep but writes 255
                raise Refused("invalid", "`sampling_parameters` is nested too deeply") from None
        if not isinstance(sampling, str):
            raise Refused("invalid", "`sampling_parameters` must be a JSON object, or a string holding one")
        inputs["sampling_parameters"] = bytes_tensor("sampling_parameters", sampling)
    asked, _ = model.request(inputs, {**extra, **parameters})
    head = {
        "model_name": model.name,
        "model_version": VERSION,
        **({"id": body["id"]} if body.get("id") is not None else {}),
    }
    return model, asked, head


def outputs_json(head: dict[str, Any], tensors: list[Tensor]) -> dict[str, Any]:
    values = {t.name: (to_values(t)[0] if t.shape == [1] else to_values(t)) for t in tensors}
    return {**head, **values}


@routes.post("/models/{name}/generate")
@routes.post("/models/{name}/versions/{model_version}/generate")
async def generate(name: str, request: Request, model_version: str = "") -> Response:
    model, asked, head = await generate_request(name, request, model_version)
    body = outputs_json(head, await model.whole(asked, DEADLINE.get()))
    return Response(orjson.dumps(body), media_type="application/json")


@routes.post("/models/{name}/generate_stream")
@routes.post("/models/{name}/versions/{model_version}/generate_stream")
async def generate_stream(name: str, request: Request, model_version: str = "") -> Response:
    """`data: {...}` per text delta, then one with the finish reason and token counts; an error after
    the first event is sent as `data: {"error": ...}`."""
    model, asked, head = await generate_request(name, request, model_version)
    generation = await model.fn.start(asked, DEADLINE.get())  # refusals before any event are 4xx

    async def events() -> AsyncIterator[bytes]:
        try:
            async for item in generation:
                if isinstance(item, Delta):
                    body = outputs_json(head, model.delta(item.text))
                else:
                    body = outputs_json(head, model.final("", generation.prompt_tokens, item))
                yield format_sse_event(data_str=orjson.dumps(body).decode())
        except Refused as exc:
            yield format_sse_event(data_str=orjson.dumps({"error": exc.message}).decode())
        except Exception:  # the generation service gone mid-answer: the stream still ends in its shape
            logger.exception("generate_stream failed")
            yield format_sse_event(
                data_str=orjson.dumps({"error": "internal error; see the server log"}).decode()
            )
        finally:
            await generation.aclose()

    return ClosingEventSourceResponse(events())


@routes.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def unknown_route(request: Request) -> JSONResponse:
    """Unmatched /v2 paths get the protocol's 404, not BentoML's plain-text one; a method a path does
    not take, its 405."""
    if wrong := wrong_method(routes.routes, request):
        message, methods = wrong
        return error_response(405, message, headers={"Allow": methods})
    raise Refused("not_found", f"no route {request.url.path}")


app.include_router(routes)
