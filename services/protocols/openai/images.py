"""`POST /v1/images/classifications`: image classification in the OpenAI routes' style and error shape
(OpenAI has no such route). An image comes as an upload (multipart, one or more `image` parts) or as
base64 in JSON; each answers its top-k labels."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, ValidationError

from services.admission import DEADLINE
from services.config import get_settings
from services.functions.api import Functions, current
from services.protocols.openai.protocol import (
    APIError,
    OpenAIModel,
    OrjsonResponse,
    Text,
    check_model,
    invalid,
    one_or_many,
)
from services.protocols.routing import CancelledOnDisconnect

MULTIPART = "multipart/form-data"


class ClassificationRequest(OpenAIModel):
    model: Text
    image: str | list[str] = Field(
        description="one base64-encoded image file, or a list (JPEG, PNG, WebP, ...)"
    )
    top_k: int = Field(default_factory=lambda: get_settings().image_top_k, ge=1, le=1000)

    @property
    def images(self) -> list[str]:
        return one_or_many(self.image)


class Label(BaseModel):
    class_id: int
    label: str
    score: float = Field(description="probability, softmax over the 1000 ImageNet classes")


class Classification(BaseModel):
    object: str = "classification"
    index: int
    labels: list[Label]


class ClassificationList(BaseModel):
    object: str = "list"
    model: str
    data: list[Classification]


def decoded(images: list[str]) -> list[bytes]:
    """Base64 as tools write it: wrapped in lines (GNU `base64`, Python's `encodebytes`), or a data URL
    (`data:image/png;base64,...`); strict otherwise."""
    out = []
    for i, text in enumerate(images):
        head, comma, body = text.partition(",") if text.startswith("data:") else ("", "", text)
        try:
            if comma and not head.endswith(";base64"):
                raise ValueError("a data URL without ;base64")
            out.append(base64.b64decode("".join(body.split()), validate=True))
        except (binascii.Error, ValueError):
            where = "image" if len(images) == 1 else f"image[{i}]"
            raise APIError(400, f"{where} is not valid base64", "image") from None
    return out


async def answer_classification(
    fns: Functions, request: ClassificationRequest, files: list[bytes] | None = None
) -> dict[str, Any]:
    """The response body for one request; `files` are uploaded images, else the request's base64."""
    fn = fns.image
    check_model(request.model, fn.model_id)
    images = files if files is not None else decoded(request.images)
    inputs = await fn.preprocess(images, field="image", deadline=DEADLINE.get())
    result = await fn.classify(inputs, DEADLINE.get())
    data = [
        {
            "object": "classification",
            "index": i,
            "labels": [{"class_id": c, "label": n, "score": p} for c, n, p in top],
        }
        for i, top in enumerate(fn.top(result.scores, request.top_k))
    ]
    return {"object": "list", "model": fn.model_id, "data": data}


async def from_multipart(request: Request) -> tuple[ClassificationRequest, list[bytes]]:
    form = await request.form()
    uploads = form.getlist("image")
    files = [await part.read() for part in uploads if not isinstance(part, str)]
    if not files or len(files) != len(uploads):
        raise APIError(400, "send each image as a file part named `image`", "image")
    fields: dict[str, Any] = {"model": form.get("model"), "image": ""}
    if form.get("top_k") is not None:
        fields["top_k"] = form.get("top_k")
    return ClassificationRequest.model_validate(fields), files


routes = APIRouter(route_class=CancelledOnDisconnect)
BODY = {
    "content": {
        "application/json": {"schema": ClassificationRequest.model_json_schema()},
        MULTIPART: {
            "schema": {
                "type": "object",
                "required": ["model", "image"],
                "properties": {
                    "model": {"type": "string"},
                    "image": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "top_k": {"type": "integer", "minimum": 1, "maximum": 1000},
                },
            }
        },
    },
    "required": True,
}


@routes.post(
    "/v1/images/classifications", response_model=ClassificationList, openapi_extra={"requestBody": BODY}
)
async def create_classification(request: Request) -> OrjsonResponse:
    """The top-k ImageNet labels of each image, best first. Repeated images are answered from the cache."""
    if (request.headers.get("content-type") or "").startswith(MULTIPART):
        try:
            parsed, files = await from_multipart(request)
        except ValidationError as exc:
            raise invalid(exc.errors()) from exc
        return OrjsonResponse(await answer_classification(current(), parsed, files))
    try:
        parsed = ClassificationRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        raise invalid(exc.errors()) from exc
    return OrjsonResponse(await answer_classification(current(), parsed))


async def answer_line(fns: Functions, request: ClassificationRequest) -> OrjsonResponse:
    """A batch line: base64 images in JSON, as the online route takes them."""
    return OrjsonResponse(await answer_classification(fns, request))
