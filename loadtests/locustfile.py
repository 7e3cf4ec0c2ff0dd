"""Locust scenario for the embeddings endpoint: users sending one short query or one document chunk.

    .venv/bin/locust -f loadtests/locustfile.py --host http://127.0.0.1:3000 --headless -u 64 -r 16 -t 60s

Locust measures itself on a 2-core machine (a few hundred requests/s); throughput figures come from
bench_embeddings.py with wrk. Use this for scenarios and soak runs.
"""

from __future__ import annotations

import itertools
import time

from locust import FastHttpUser, HttpUser, between, task

from loadtests.bench_embeddings import TEXTS

COUNTER = itertools.count()


class EmbeddingUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    def embed(self, text: str, name: str) -> None:
        body = {"model": "all-minilm-l6-v2", "input": text % next(COUNTER)}
        with self.client.post("/v1/embeddings", json=body, name=name, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
            elif len(response.json()["data"][0]["embedding"]) != 384:
                response.failure("wrong vector width")

    @task(4)
    def query(self) -> None:
        self.embed(TEXTS["short"], "embeddings: short query")

    @task(1)
    def document(self) -> None:
        self.embed(TEXTS["long"], "embeddings: document chunk")


class ChatUser(HttpUser):
    """Holds a streaming chat open until its last token, as a chat front end does."""

    wait_time = between(0.5, 2.0)
    max_tokens = 48

    @task
    def stream_chat(self) -> None:
        body = {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": f"Write a haiku about the number {next(COUNTER)}."}],
            "max_tokens": self.max_tokens,
            "stream": True,
        }
        start = time.perf_counter()
        with self.client.post(
            "/v1/chat/completions", json=body, name="chat: stream", stream=True, catch_response=True
        ) as response:
            events = [line for line in response.iter_lines() if line.startswith(b"data: ")]
            # Reported as the whole stream's time: locust's own figure stops at the response headers.
            response.request_meta["response_time"] = (time.perf_counter() - start) * 1000
            if response.status_code != 200 or not events or events[-1] != b"data: [DONE]":
                response.failure(f"{response.status_code}: stream did not end with [DONE]")
