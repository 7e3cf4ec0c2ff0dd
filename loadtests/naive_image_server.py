"""The baseline for images: one uvicorn process, the classifier called once per request, one request at
a time. Same model, dtype, preprocessing, HTTP stack and request/response shape as fnserve's
/v1/images/classifications (base64 JSON), so the gap the benchmark shows is batching and nothing else.

    python loadtests/naive_image_server.py --port 8002 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from pathlib import Path

import bentoml
import orjson
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from models.catalog import CATALOG
from services.config import get_settings, pick_device
from services.functions.image import classify, load, preprocess


def build_app(dtype: str) -> Starlette:
    settings = get_settings()
    path = bentoml.models.get(CATALOG[settings.image_model].tag).path
    device = pick_device(settings.device)
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

    async def ready(_: Request) -> Response:
        return Response("ok")

    routes = [Route("/v1/images/classifications", classifications, methods=["POST"]), Route("/readyz", ready)]
    return Starlette(routes=routes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--dtype", default="float32", help="the dtype fnserve chose (its /models/status)")
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.dtype), host="127.0.0.1", port=args.port, log_level="warning", access_log=False
    )
