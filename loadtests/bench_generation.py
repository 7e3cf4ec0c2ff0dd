"""Streaming chat under concurrency: fnserve vs a naive server vs `transformers serve`, in one run.

    make bench-chat     # or: .venv/bin/python loadtests/bench_generation.py [--requests-per-stream 2]

For 1, 4, 16 and 32 concurrent streams, each stream sends greedy chat requests (max_tokens 64) back to
back; reported: aggregate output tokens/s, p50/p99 time to first token and inter-token latency. The
client is Python (httpx, asyncio): it has to parse SSE to time tokens, and a few hundred events/s
cost it little next to the servers' tens to hundreds of tokens/s here. `transformers serve` runs with
its continuous batching on and its KV cache sized as fnserve's. The three servers run side by side and
are measured in turn at each concurrency, so that drift on this shared machine falls on all alike. The
bar against `transformers serve` is the median of fnserve / `transformers serve` over that 16-stream pair
and four more rounds at 16 streams, alternating which goes first. Response caches are off (the prompts
repeat). Writes loadtests/results/generation.json and generation.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.functions.hardware import describe  # noqa: E402
from tests.server import CACHES_OFF, free_port, run_server, serve, server_processes  # noqa: E402

RESULTS = ROOT / "loadtests" / "results"
STREAMS = [1, 4, 16, 32]
MAX_TOKENS = 64
HEAD_TO_HEAD_ROUNDS = 4  # extra rounds at 16 streams, fnserve and transformers serve in turn
TOPICS = ["the sea", "a fox", "mountains", "a city at night", "rain", "an old clock", "bread", "a river"]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else (values or [0.0])[0]


async def one_chat(client: httpx.AsyncClient, model: str, prompt: str, stats: dict[str, list[float]]) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
    }
    start = last = time.perf_counter()
    first = True
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if not choices[0].get("delta", {}).get("content"):
                continue
            now = time.perf_counter()
            stats["ttft" if first else "itl"].append(now - (start if first else last))
            stats["tokens"].append(1)
            first, last = False, now


async def load(url: str, model: str, streams: int, per_stream: int) -> dict[str, float]:
    stats: dict[str, list[float]] = {"ttft": [], "itl": [], "tokens": []}
    async with httpx.AsyncClient(
        base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)
    ) as client:

        async def stream(i: int) -> None:
            for k in range(per_stream):
                await one_chat(
                    client, model, f"Write a short poem about {TOPICS[(i + k) % len(TOPICS)]}.", stats
                )

        start = time.perf_counter()
        await asyncio.gather(*(stream(i) for i in range(streams)))
        elapsed = time.perf_counter() - start
    # One SSE content event per token for all three servers (text deltas of one token each).
    return {
        "streams": streams,
        "tokens_per_s": len(stats["tokens"]) / elapsed,
        "ttft_p50_ms": percentile(stats["ttft"], 50) * 1000,
        "ttft_p99_ms": percentile(stats["ttft"], 99) * 1000,
        "itl_p50_ms": percentile(stats["itl"], 50) * 1000,
        "itl_p99_ms": percentile(stats["itl"], 99) * 1000,
    }


def measure(name: str, url: str, model: str, streams: int, per_stream: int) -> dict[str, float]:
    point = asyncio.run(load(url, model, streams, per_stream))
    print(
        f"{name} streams={streams}: {point['tokens_per_s']:.0f} tok/s, "
        f"TTFT p50 {point['ttft_p50_ms']:.0f} ms p99 {point['ttft_p99_ms']:.0f} ms, "
        f"ITL p50 {point['itl_p50_ms']:.0f} ms p99 {point['itl_p99_ms']:.0f} ms",
        flush=True,
    )
    return point


def idle_cores(urls: list[str], seconds: float = 5) -> float:
    """CPU that idle servers take from the one being measured: they all run side by side."""
    processes = [p for url in urls for p in server_processes(url)]
    before = sum(sum(p.cpu_times()[:2]) for p in processes)
    time.sleep(seconds)
    return (sum(sum(p.cpu_times()[:2]) for p in processes) - before) / seconds


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_ttft, ax_itl) = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = {"fnserve": "tab:blue", "naive": "tab:orange", "transformers_serve": "tab:green"}
    for name, color in colors.items():
        points = result.get(name)
        if not points:
            continue
        xs = [p["streams"] for p in points]
        ax_tp.plot(xs, [p["tokens_per_s"] for p in points], "o-", color=color, label=name)
        for ax, key in ((ax_ttft, "ttft"), (ax_itl, "itl")):
            ax.plot(xs, [p[f"{key}_p50_ms"] for p in points], "o-", color=color, label=f"{name} p50")
            ax.plot(xs, [p[f"{key}_p99_ms"] for p in points], "x:", color=color, label=f"{name} p99")
    for ax, title, unit in (
        (ax_tp, "output tokens/s", "tokens/s"),
        (ax_ttft, "time to first token", "ms"),
        (ax_itl, "inter-token latency", "ms"),
    ):
        ax.set_title(title)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(unit)
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    ax_ttft.set_yscale("log")
    ax_itl.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def transformers_serve(path: str, port: int, blocks: str, dtype: str) -> list[str]:
    """Its continuous batching on, with fnserve's KV-cache size, batch-token budget and dtype."""
    return [
        str(Path(sys.executable).with_name("transformers")),
        "serve",
        path,
        *("--port", str(port), "--host", "127.0.0.1", "--continuous-batching"),
        *("--cb-num-blocks", blocks, "--cb-block-size", "64"),
        *("--cb-max-batch-tokens", "512", "--dtype", dtype),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--skip-transformers-serve", action="store_true")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)

    import bentoml

    from models.catalog import CATALOG
    from services.config import get_settings

    settings = get_settings()
    model = settings.generation_model
    result: dict[str, object] = {"machine": describe(), "max_tokens": MAX_TOKENS}
    servers: dict[str, tuple[str, str]] = {}  # name: (url, model name to ask for)
    with ExitStack() as running:
        servers["fnserve"] = (running.enter_context(serve(env=CACHES_OFF)), model)
        # The peers get what fnserve chose for this machine: the same dtype and KV-cache size.
        choices = httpx.get(f"{servers['fnserve'][0]}/models/status").json()[model]["choices"]
        dtype = result["dtype"] = choices["dtype"]["value"]
        port = free_port()
        naive = [sys.executable, "-m", "loadtests.naive_chat_server", "--port", str(port)]
        naive += ["--dtype", dtype]
        servers["naive"] = (running.enter_context(run_server(naive, port)), model)
        if not args.skip_transformers_serve:
            path = bentoml.models.get(CATALOG[model].tag).path
            port = free_port()
            command = transformers_serve(path, port, choices["cache_blocks"]["value"], dtype)
            try:
                url = running.enter_context(run_server(command, port, ready_path="/health"))
                servers["transformers_serve"] = (url, path)
            except Exception as exc:  # reported, not fatal: the peer is optional
                print(f"transformers serve did not run: {exc}", flush=True)
                result["transformers_serve_error"] = str(exc)[-2000:]
        for url, name in servers.values():
            asyncio.run(load(url, name, 2, 1))  # warm-up
        peers = [url for name, (url, _) in servers.items() if name != "naive"]  # the naive one: not bentoml
        result["idle_cpu_cores"] = idle_cores(peers)
        # Interleaved, so that the machine's drift over a run (this one is shared) falls on all alike.
        for name in servers:
            result[name] = []
        for streams in STREAMS:
            for name, (url, asked) in servers.items():
                result[name].append(measure(name, url, asked, streams, args.requests_per_stream))
        head_to_head = []
        if "transformers_serve" in servers:
            for round_ in range(HEAD_TO_HEAD_ROUNDS):  # alternating which goes first
                pair = ["fnserve", "transformers_serve"][:: 1 if round_ % 2 else -1]
                tokens = {
                    name: measure(name, *servers[name], 16, args.requests_per_stream)["tokens_per_s"]
                    for name in pair
                }
                head_to_head.append(tokens)
        result["head_to_head_at_16"] = head_to_head

    at16 = {
        name: next(p for p in result[name] if p["streams"] == 16)
        for name in ("fnserve", "naive", "transformers_serve")
        if result.get(name)
    }
    ratios = {
        "fnserve_over_naive_at_16": at16["fnserve"]["tokens_per_s"] / at16["naive"]["tokens_per_s"],
        "ttft_p50_ms_at_16": at16["fnserve"]["ttft_p50_ms"],
    }
    if head_to_head:
        pairs = [(r["fnserve"], r["transformers_serve"]) for r in head_to_head]
        pairs.append((at16["fnserve"]["tokens_per_s"], at16["transformers_serve"]["tokens_per_s"]))
        ratios["fnserve_over_transformers_serve_at_16"] = statistics.median(f / t for f, t in pairs)
    result["ratios"] = ratios
    (RESULTS / "generation.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "generation.png")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
