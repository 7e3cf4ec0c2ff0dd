"""tritonclient requests for fnserve's OIP models: used by the OIP tests and by the shutdown test."""

from __future__ import annotations

import json
import queue
from typing import Any

import numpy as np
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from tests.server import LONG

CHAT = "smollm2-135m-instruct"


def text_input(name: str, texts: list[str], module: object = tg) -> object:
    tensor = module.InferInput(name, [len(texts)], "BYTES")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return tensor


def generation_inputs(
    prompt: str, max_tokens: int, stream: bool = True, **sampling: Any
) -> list[tg.InferInput]:
    """Greedy unless `sampling` says otherwise (vLLM's names, as in `sampling_parameters`)."""
    flag = tg.InferInput("stream", [1], "BOOL")
    flag.set_data_from_numpy(np.array([stream]))
    parameters = json.dumps({"temperature": 0, "max_tokens": max_tokens, **sampling})
    return [text_input("text_input", [prompt]), flag, text_input("sampling_parameters", [parameters])]


class Stream:
    """One ModelStreamInfer stream, its responses in arrival order."""

    def __init__(self, client: tg.InferenceServerClient, headers: dict[str, str]) -> None:
        self.client, self.answers = client, queue.Queue()
        client.start_stream(callback=lambda result, error: self.answers.put((result, error)), headers=headers)

    def send(self, request_id: str, inputs: list[tg.InferInput], model: str = CHAT) -> None:
        self.client.async_stream_infer(model, inputs, request_id=request_id)

    def next(self) -> tuple[tg.InferResult | None, InferenceServerException | None]:
        return self.answers.get(timeout=LONG)

    def collect(self, ids: set[str]) -> tuple[dict[str, str], list[str]]:
        """Joined text per request until each has its final response, and the ids in arrival order."""
        texts, order, finished = dict.fromkeys(ids, ""), [], set()
        while finished != ids:
            result, error = self.next()
            assert error is None, error
            request_id = result.get_response().id
            order.append(request_id)
            texts[request_id] += result.as_numpy("text_output")[0].decode()
            if result.as_numpy("finish_reason") is not None:
                finished.add(request_id)
        return texts, order
