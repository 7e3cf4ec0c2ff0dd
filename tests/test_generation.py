"""The generation function served on its own (`Generator`), and through the entry service's native
`/chat`, against a real `bentoml serve`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.server import LONG, counter, histogram, http_client, serve


@pytest.fixture(scope="module")
def gen(server: str) -> Iterator[httpx.Client]:
    """The session's server: its chat function is in fp32 already, and what this module adds to
    tests/test_chat.py (BentoML's native `/chat`, the latency metrics, the cache freed on a disconnect)
    needs no settings of its own."""
    with http_client(server) as c:
        yield c


def chat(client: httpx.Client, question: str, max_tokens: int = 24) -> str:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
    response = client.post("/chat", json=body)
    assert response.status_code == 200, response.text
    return response.text


def test_the_auto_dtype_answers_concurrent_streams() -> None:
    """The dtype `auto` serves (bf16 where the CPU computes it natively, fp32 where it emulates it)
    cannot be compared token for token in bf16 (its greedy output can depend on the batch), but every
    concurrent stream must complete and the answers must still be right."""
    with (
        serve("services.functions.generation:Generator") as url,
        http_client(url) as client,
        ThreadPoolExecutor(max_workers=8) as pool,
    ):
        answers = list(pool.map(lambda _: chat(client, "What is the capital of Japan?"), range(8)))
    assert all("Tokyo" in answer for answer in answers), "\n".join(map(repr, answers))  # all of them


def generation_counts(client: httpx.Client) -> tuple[float, float, float]:
    metrics = client.get("/metrics").text
    tokens = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("fnserve_generation_completion_tokens_total")
    )
    ttft = (
        histogram(metrics, "fnserve_generation_time_to_first_token_seconds")[0]
        if "first_token" in metrics
        else 0
    )
    itl = histogram(metrics, "fnserve_generation_inter_token_seconds")[0] if "inter_token" in metrics else 0
    return ttft, itl, tokens


def test_latency_and_token_metrics(gen: httpx.Client) -> None:
    before = generation_counts(gen)
    assert chat(gen, "Tell me a long story about a fox.", 8)
    after = generation_counts(gen)
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 7, 8]  # one request, 8 tokens


def stats(client: httpx.Client) -> dict[str, float]:
    return client.get("/engine/stats").json()


def test_disconnect_cancels_the_request_and_frees_its_cache(gen: httpx.Client) -> None:
    idle = stats(gen)
    story = [{"role": "user", "content": "Write a very long story about a dragon."}]
    body = {"messages": story, "max_tokens": 500}
    before = counter(str(gen.base_url), "fnserve_generation_completion_tokens_total")
    with (
        http_client(str(gen.base_url)) as own,
        own.stream("POST", "/chat", json=body) as response,
    ):
        chunks = response.iter_text()
        for _ in range(80):  # past the prompt's block: the request now holds cache of its own
            next(chunks)
        busy = stats(gen)
        assert busy["running"] == 1 and busy["free_cache"] < idle["free_cache"]
    deadline = time.monotonic() + LONG
    while (now := stats(gen))["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert now["waiting"] == 0
    # Cancelled: far from the 500 tokens it asked for, of which about 80 had been read.
    assert counter(str(gen.base_url), "fnserve_generation_completion_tokens_total") - before < 450
    # Its partly filled block is freed; complete blocks stay cached for prefix sharing (and evictable).
    assert now["free_cache"] > busy["free_cache"]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [], "max_tokens": 8},
        {"messages": [{"role": "wizard", "content": "hi"}]},
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100_000},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": "hi"},
    ],
    ids=["empty-messages", "unknown-role", "max-tokens-over-cap", "wrong-type", "not-a-list"],
)
def test_bad_requests_get_400_and_the_engine_keeps_serving(
    gen: httpx.Client, body: dict[str, object]
) -> None:
    response = gen.post("/chat", json=body)
    assert response.status_code == 400, response.text
    assert "error" in response.json()
    assert chat(gen, "Say hi.", 4)
