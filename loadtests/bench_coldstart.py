"""Scale to zero: memory released while asleep, and cold start against a bare load of the same weights.

    make bench-coldstart     # or: .venv/bin/python loadtests/bench_coldstart.py

One server with a short idle time. For each model: the worker's RSS loaded and asleep, then the time
from sending a request to a sleeping model to its complete response, against `from_pretrained` of the
same weights from the model store (the second load in a fresh process: the first also pays for the
lazy imports inside `from_pretrained`, which a worker has already paid; both are recorded).
Bar: cold start <= 1.3x bare load. Also reported: the same request warm, and (cold - warm) / bare load,
the latency that sleeping adds. Writes loadtests/results/coldstart.json.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.functions.hardware import describe  # noqa: E402
from tests.server import CACHES_OFF, serve, served_dtypes, server_processes  # noqa: E402

RESULTS = ROOT / "loadtests" / "results"
IDLE_SECONDS = 3
REPEATS = 3
BAR = 1.3
EMBEDDER, CHAT = "all-minilm-l6-v2", "smollm2-135m-instruct"
BARE_LOAD = """
import sys, time, torch, transformers, bentoml
from models.catalog import CATALOG
from services.config import get_settings
settings = get_settings()
name, cls, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
path = bentoml.models.get(CATALOG[name].tag).path
def load():
    start = time.perf_counter()
    model = getattr(transformers, cls).from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    return time.perf_counter() - start
first = load()  # pays for the lazy imports inside from_pretrained, which a worker has paid already
print(first, load())
"""
REQUESTS = {
    EMBEDDER: ("/v1/embeddings", {"model": EMBEDDER, "input": "wake up"}),
    CHAT: (
        "/v1/chat/completions",
        {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0},
    ),
}


def bare_load(name: str, cls: str, dtype: str) -> tuple[float, float]:
    """(first load in a fresh process, second load): the second is the bare load the bar is against."""
    command = [sys.executable, "-c", BARE_LOAD, name, cls, dtype]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    first, second = done.stdout.strip().splitlines()[-1].split()
    return float(first), float(second)


def worker_rss_mb(url: str, service: str) -> float:
    workers = [p for p in server_processes(url) if "--service-name" in p.cmdline() and service in p.cmdline()]
    return sum(p.memory_info().rss for p in workers) / 2**20


def wait_asleep(client: httpx.Client) -> None:
    deadline = time.monotonic() + 60
    while {model["state"] for model in client.get("/models/status").json().values()} != {"sleeping"}:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1)  # every embedding worker (the status answers for one)


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"machine": describe(), "idle_seconds": IDLE_SECONDS}
    env = {"FNSERVE_IDLE_RELEASE_SECONDS": str(IDLE_SECONDS), **CACHES_OFF}
    cold: dict[str, list[float]] = {EMBEDDER: [], CHAT: []}
    with serve(env=env) as url, httpx.Client(base_url=url, timeout=120) as client:
        dtypes = result["served_dtypes"] = served_dtypes(url)
        for path, body in REQUESTS.values():
            client.post(path, json=body).raise_for_status()
        rss_loaded = {
            "embedding": worker_rss_mb(url, "embedding"),
            "generation": worker_rss_mb(url, "generation"),
        }
        wait_asleep(client)
        rss_asleep = {
            "embedding": worker_rss_mb(url, "embedding"),
            "generation": worker_rss_mb(url, "generation"),
        }
        for _ in range(REPEATS):
            for name, (path, body) in REQUESTS.items():
                wait_asleep(client)
                start = time.perf_counter()
                client.post(path, json=body).raise_for_status()
                cold[name].append(time.perf_counter() - start)
        warm: dict[str, list[float]] = {EMBEDDER: [], CHAT: []}
        for _ in range(REPEATS):
            for name, (path, body) in REQUESTS.items():
                start = time.perf_counter()
                client.post(path, json=body).raise_for_status()
                warm[name].append(time.perf_counter() - start)
    # The bare loads after the server, in the dtypes it chose (the same weights, the same cast).
    bare = {
        EMBEDDER: [bare_load(EMBEDDER, "AutoModel", dtypes[EMBEDDER]) for _ in range(REPEATS)],
        CHAT: [bare_load(CHAT, "AutoModelForCausalLM", dtypes[CHAT]) for _ in range(REPEATS)],
    }
    result["rss_mb"] = {"loaded": rss_loaded, "asleep": rss_asleep}
    result["models"] = {
        name: {
            "bare_load_s": statistics.median(second for _, second in bare[name]),
            "first_load_in_fresh_process_s": statistics.median(first for first, _ in bare[name]),
            "cold_start_s": statistics.median(cold[name]),
            "ratio": statistics.median(cold[name]) / statistics.median(second for _, second in bare[name]),
            "warm_request_s": statistics.median(warm[name]),
            "wake_overhead_ratio": (statistics.median(cold[name]) - statistics.median(warm[name]))
            / statistics.median(second for _, second in bare[name]),
            "bare_runs": bare[name],
            "cold_runs": cold[name],
            "warm_runs": warm[name],
        }
        for name in (EMBEDDER, CHAT)
    }
    (RESULTS / "coldstart.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    for name, figures in result["models"].items():
        verdict = "MET" if figures["ratio"] <= BAR else "MISSED"
        print(
            f"{name}: cold start / bare load {figures['ratio']:.2f} (bar {BAR}) {verdict}; cold start less a"
        )
        print(
            f"  warm request ({figures['warm_request_s'] * 1000:.0f} ms) / bare load "
            f"{figures['wake_overhead_ratio']:.2f}"
        )


if __name__ == "__main__":
    main()
