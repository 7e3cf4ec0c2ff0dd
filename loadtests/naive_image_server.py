"""The baseline for images: one uvicorn process, the classifier called once per request, one request at
a time. Same model, dtype, preprocessing, HTTP stack and request/response shape as fnserve's
/v1/images/classifications (base64 JSON), so the gap the benchmark shows is batching and nothing else.

    python -m loadtests.naive_image_server --port 8002 --dtype bfloat16
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import bentoml
import orjson
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from loadtests.naive_common import READY, main
from models.catalog import CATALOG
from services.config import get_settings, pick_device
from services.functions.image import classify, load, preprocess


def build_app(dtype: str) -> Starlette:
    settings = get_settings()
    path = bentoml.models.get(CATALOG[settings.image_model].tag).path
    device = pick_device(settings)
    model = load(path, device).to(getattr(torch, dtype))
    names = json.loads((Path(path) / "labels.json").read_text())
    lock = asyncio.Lock()

    def top(data: bytes, k: int) -> list[dict[str, object]]:
        scores = classify(model, preprocess(data, 2**30, 2**30, "image")[None], device)[0]
        return [
            {"class_id": int(i), "label": names[i], "score": float(scores[i])}
            for i in (-scores).argsort()[:k]
        ]

    async def classifications(request: Request) -> Response:
        body = orjson.loads(await request.body())
        async with lock:
            found = await asyncio.to_thread(top, base64.b64decode(body["image"]), body.get("top_k", 5))
        data = [{"object": "classification", "index": 0, "labels": found}]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    routes = [Route("/v1/images/classifications", classifications, methods=["POST"]), READY]
    return Starlette(routes=routes)


if __name__ == "__main__":
    main(build_app, port=8002)
