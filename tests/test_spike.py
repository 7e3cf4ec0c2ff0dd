"""Admission by time and CPU sharing, on a real server: a request that cannot start within its deadline
is refused at once with a Retry-After, a flood of embeddings does not stop chat from answering, and
everything is served again afterwards. Loads are sized from what the server reports (its batch size,
its queue, its own estimate of the wait), never from this machine's speed."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator

import httpx
import pytest

from tests.server import LONG, ONE_WORKER, counter, serve

CHAT = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"
unique = itertools.count()


# A chat target no first token meets, on any machine: the chats here run one at a time, so each finds
# nothing waiting ahead and must be admitted all the same (only its own deadline can refuse it).
CHAT_TARGET = "0.001"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    """One entry worker, so that every request meets the same queue. Batches of 32 texts: sixteen of them
    fit the default queue (1,024 texts), where sixteen of a timed 128 would not."""
    env = {
        **ONE_WORKER,
        "FNSERVE_EMBEDDING_MAX_LATENCY_MS": "600000",
        "FNSERVE_EMBEDDING_MAX_BATCH_SIZE": "32",
        "FNSERVE_GENERATION_MAX_WAIT_SECONDS": CHAT_TARGET,
    }
    with serve(env=env) as base:
        yield base


def texts(count: int) -> list[str]:
    """Inputs the response cache has never seen."""
    return [f"sentence {next(unique)} about the weather at sea" for _ in range(count)]


def chat_body(**extra: object) -> dict[str, object]:
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    return {"model": CHAT, "messages": messages, "max_tokens": 16, "temperature": 0.7, **extra}


def batch_size(base: str) -> int:
    """Texts per forward pass, as the server chose."""
    status = httpx.get(f"{base}/models/status", timeout=LONG).json()[EMBEDDER]
    return int(status["choices"]["max_batch_size"]["value"])


def embedding_load(base: str) -> dict[str, float]:
    return httpx.get(f"{base}/models/status", timeout=LONG).json()[EMBEDDER]["load"]


def assert_refused_for_time(response: httpx.Response) -> None:
    """429 in OpenAI's shape, naming the deadline, with a Retry-After in whole seconds."""
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "queue_full" and "the request's deadline" in error["message"], error


async def until(condition: object, what: str) -> None:
    for _ in range(int(LONG / 0.05)):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never saw {what}")


def test_an_embedding_that_cannot_start_within_its_deadline_is_refused_at_once(url: str) -> None:
    size = batch_size(url)
    body = {"model": EMBEDDER, "input": texts(size)}
    assert httpx.post(f"{url}/v1/embeddings", json=body, timeout=LONG).status_code == 200  # a rate

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=LONG) as client:
            # Sixteen batches queued: the queue outlasts a round trip on any machine.
            queued = [
                asyncio.create_task(
                    client.post("/v1/embeddings", json={"model": EMBEDDER, "input": texts(size)})
                )
                for _ in range(16)
            ]
            await until(lambda: embedding_load(url)["expected_wait_seconds"] > 0, "a queue")
            expected = embedding_load(url)["expected_wait_seconds"]
            small = {"model": EMBEDDER, "input": texts(1)}
            refused = await client.post(
                "/v1/embeddings", json=small, headers={"x-fnserve-timeout": f"{expected / 4:.4f}"}
            )
            assert_refused_for_time(refused)
            assert not all(task.done() for task in queued)  # refused while the queue was still there
            answered = await asyncio.gather(*queued)
            assert [r.status_code for r in answered] == [200] * len(queued)  # nothing queued is lost
            assert all(len(r.json()["data"]) == size for r in answered)
            again = await client.post("/v1/embeddings", json=small)
            assert again.status_code == 200

    before = counter(url, "fnserve_rejections_total", reason="expected_wait")
    asyncio.run(scenario())
    assert counter(url, "fnserve_rejections_total", reason="expected_wait") == before + 1


def test_a_chat_that_cannot_get_its_first_token_within_its_deadline_is_refused_at_once(url: str) -> None:
    served = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=LONG)
    assert served.status_code == 200  # the engine has a measured time to first token now
    expected = httpx.get(f"{url}/engine/stats", timeout=LONG).json()["expected_first_token_seconds"]
    assert expected > 0
    for stream in (False, True):
        refused = httpx.post(
            f"{url}/v1/chat/completions",
            json=chat_body(stream=stream),
            # Half the estimate: still ahead when the request reaches the engine (past, it is a 504).
            headers={"x-fnserve-timeout": f"{expected / 2:.6f}"},
            timeout=LONG,
        )
        assert_refused_for_time(refused)
    assert httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=LONG).status_code == 200


def test_first_tokens_slower_than_the_target_do_not_shut_an_idle_chat_out(url: str) -> None:
    """Every first token here takes longer than the chat target; the estimate made of them refuses a
    request that would wait behind others, never one that starts at once. (It refused every chat after
    one slow first token, and none was admitted to bring the estimate down again.)"""
    for _ in range(3):
        answered = httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=LONG)
        assert answered.status_code == 200, answered.text
    stats = httpx.get(f"{url}/engine/stats", timeout=LONG).json()
    assert stats["expected_first_token_seconds"] > float(CHAT_TARGET) and stats["waiting"] == 0


def test_chat_keeps_answering_under_a_flood_of_embeddings_and_all_is_served_after(url: str) -> None:
    size = int(
        httpx.get(f"{url}/models/status", timeout=LONG).json()[EMBEDDER]["choices"]["max_batch_size"]["value"]
    )
    rested = counter(url, "fnserve_rested_seconds_total", function="embedding")

    async def scenario() -> None:
        stop = asyncio.Event()
        answered_after_chat: list[int] = []
        chat_done = asyncio.Event()

        async def flooder(client: httpx.AsyncClient) -> None:
            while not stop.is_set():
                response = await client.post("/v1/embeddings", json={"model": EMBEDDER, "input": texts(size)})
                assert response.status_code == 200, response.text
                if chat_done.is_set():
                    answered_after_chat.append(1)

        async with httpx.AsyncClient(base_url=url, timeout=LONG) as client:
            # Eight closed-loop callers of a full batch each: always more queued than one forward pass.
            flood = [asyncio.create_task(flooder(client)) for _ in range(8)]
            await until(lambda: embedding_load(url)["expected_wait_seconds"] > 0, "a queue")
            lines = []
            async with client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as chat:
                assert chat.status_code == 200
                lines = [line async for line in chat.aiter_lines() if line.startswith("data: {")]
            chat_done.set()
            chunks = [json.loads(line[6:]) for line in lines]
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks).strip()
            await until(lambda: len(answered_after_chat) >= 8, "the flood still running after the chat")
            stop.set()
            await asyncio.gather(*flood)

    asyncio.run(scenario())
    # The embedding worker rested for the engine while both had work.
    assert counter(url, "fnserve_rested_seconds_total", function="embedding") > rested
    after = httpx.post(f"{url}/v1/embeddings", json={"model": EMBEDDER, "input": texts(1)}, timeout=LONG)
    assert after.status_code == 200
    assert httpx.post(f"{url}/v1/chat/completions", json=chat_body(), timeout=LONG).status_code == 200
