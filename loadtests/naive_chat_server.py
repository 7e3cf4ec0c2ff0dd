"""The baseline for chat: one process, `model.generate` for one request at a time, tokens streamed as
OpenAI-style SSE through transformers' TextIteratorStreamer. Same model, dtype and HTTP stack as fnserve.

    python -m loadtests.naive_chat_server --port 8002
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import bentoml
import orjson
import torch
from fastapi.sse import format_sse_event
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from loadtests.naive_common import READY, main
from models.catalog import CATALOG
from services.config import get_settings, pick_device


def build_app(dtype: str) -> Starlette:
    settings = get_settings()
    path = bentoml.models.get(CATALOG[settings.generation_model].tag).path
    device = pick_device(settings)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    one_at_a_time = asyncio.Lock()

    async def chat(request: Request) -> Response:
        body = orjson.loads(await request.body())
        ids = tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=False
        ).to(device)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

        async def events() -> AsyncIterator[bytes]:
            async with one_at_a_time:
                kwargs = {
                    "max_new_tokens": body.get("max_tokens", 64),
                    "do_sample": False,
                    "streamer": streamer,
                }
                worker = threading.Thread(target=model.generate, args=(ids,), kwargs=kwargs)
                worker.start()
                while (text := await asyncio.to_thread(next, streamer, None)) is not None:
                    if text:
                        chunk = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
                        yield format_sse_event(data_str=orjson.dumps(chunk).decode())
                await asyncio.to_thread(worker.join)
            yield format_sse_event(data_str="[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), READY])


if __name__ == "__main__":
    main(build_app, port=8002)
