"""Scale to zero in the process: models are released after the idle time and come back on the next request."""

from __future__ import annotations

import time

import httpx

from tests.server import serve, server_processes

IDLE_SECONDS = 3
EMBEDDER, CHAT = "all-minilm-l6-v2", "smollm2-135m-instruct"


def generation_rss(url: str) -> int:
    [worker] = [p for p in server_processes(url) if "generation" in p.cmdline()]
    return worker.memory_info().rss


def metric(metrics: str, name: str, model: str) -> float:
    return sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith(name) and f'model="{model}"' in line
    )


def wait_for_state(client: httpx.Client, state: str, timeout: float = 30) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while set((status := client.get("/models/status").json()).values()) != {state}:
        assert time.monotonic() < deadline, status
        time.sleep(0.25)
    return status


def test_idle_models_are_released_and_wake_on_the_next_request() -> None:
    env = {"FNSERVE_IDLE_RELEASE_SECONDS": str(IDLE_SECONDS)}
    body = {"model": CHAT, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    with serve(env=env) as url, httpx.Client(base_url=url, timeout=120) as client:
        # The idle clock starts when a worker is up, so a slow start-up may find models asleep already.
        assert client.post("/v1/chat/completions", json={**body, "max_tokens": 2}).status_code == 200
        loaded_rss = generation_rss(url)
        assert client.get("/models/status").json()[CHAT] == "loaded"
        wait_for_state(client, "sleeping")
        for _ in range(4):  # both embedding workers: each answers for itself
            assert client.get("/models/status").json()[EMBEDDER] == "sleeping"
        released_rss = generation_rss(url)
        assert loaded_rss - released_rss > 150 * 2**20, (loaded_rss, released_rss)  # bf16 weights: 269 MB

        answer = client.post("/v1/chat/completions", json={**body, "max_tokens": 16, "temperature": 0})
        assert answer.status_code == 200 and "Paris" in answer.json()["choices"][0]["message"]["content"]
        assert client.get("/models/status").json()[CHAT] == "loaded"
        vectors = client.post("/v1/embeddings", json={"model": EMBEDDER, "input": "awake again"})
        assert vectors.status_code == 200 and len(vectors.json()["data"][0]["embedding"]) == 384

        # At least: a slow machine may already have released them again.
        metrics = client.get("/metrics").text
        assert metric(metrics, "fnserve_model_loads_total", CHAT) >= 2  # at start, and on a wake-up
        assert metric(metrics, "fnserve_model_unloads_total", CHAT) >= 1
        assert metric(metrics, "fnserve_model_cold_start_seconds_count", CHAT) >= 1
        assert metric(metrics, "fnserve_model_unloads_total", EMBEDDER) >= 2  # both workers
