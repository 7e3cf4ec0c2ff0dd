"""The baseline people start with: one uvicorn process, the model called once per request, one request at
a time. Same model, dtype, HTTP stack (uvicorn + httptools + uvloop) and request/response shape as fnserve,
so the gap the benchmark shows is batching and nothing else.

    python -m loadtests.naive_server --port 8001
"""

from __future__ import annotations

import asyncio

import bentoml
import orjson
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from transformers import AutoModel, AutoTokenizer

from loadtests.naive_common import READY, main
from models.catalog import CATALOG
from services.config import get_settings, pick_device
from services.functions.embedding import TextEncoder


def build_app(dtype: str) -> Starlette:
    settings = get_settings()
    path = bentoml.models.get(CATALOG[settings.embedding_model].tag).path
    encoder = TextEncoder(AutoTokenizer.from_pretrained(path), settings.embedding_max_tokens)
    device = pick_device(settings)
    model = AutoModel.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    lock = asyncio.Lock()

    def embed(text: str) -> list[float]:
        return encoder.encode(model, [text], device)[0][0].tolist()

    async def embeddings(request: Request) -> Response:
        body = orjson.loads(await request.body())
        async with lock:
            vector = await asyncio.to_thread(embed, body["input"])
        data = [{"object": "embedding", "index": 0, "embedding": vector}]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    return Starlette(routes=[Route("/v1/embeddings", embeddings, methods=["POST"]), READY])


if __name__ == "__main__":
    main(build_app, port=8001)
