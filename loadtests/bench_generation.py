"""Streaming chat under concurrency: fnserve vs a naive server vs `transformers serve`, in one run.

    make bench-chat     # or: .venv/bin/python loadtests/bench_generation.py [--requests-per-stream 2]

For 1, 4, 16 and 32 concurrent streams, each stream sends greedy chat requests (max_tokens 64) back to
back; reported: aggregate output tokens/s, p50/p99 time to first token and inter-token latency. The
client is Python (httpx, asyncio): it has to parse SSE to time tokens, and a few hundred events/s
cost it little next to the servers' tens to hundreds of tokens/s here. `transformers serve` runs with
its continuous batching on and its KV cache sized as fnserve's. Writes loadtests/results/generation.json
and generation.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server import free_port, run_server, serve  # noqa: E402

RESULTS = ROOT / "loadtests" / "results"
STREAMS = [1, 4, 16, 32]
MAX_TOKENS = 64
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


def sweep(name: str, url: str, model: str, per_stream: int) -> list[dict[str, float]]:
    asyncio.run(load(url, model, 2, 1))  # warm-up
    points = []
    for streams in STREAMS:
        point = asyncio.run(load(url, model, streams, per_stream))
        print(
            f"{name} streams={streams}: {point['tokens_per_s']:.0f} tok/s, "
            f"TTFT p50 {point['ttft_p50_ms']:.0f} ms p99 {point['ttft_p99_ms']:.0f} ms, "
            f"ITL p50 {point['itl_p50_ms']:.0f} ms p99 {point['itl_p99_ms']:.0f} ms",
            flush=True,
        )
        points.append(point)
    return points


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
    result: dict[str, object] = {"max_tokens": MAX_TOKENS, "dtype": settings.generation_dtype}
    with serve() as url:
        result["fnserve"] = sweep("fnserve", url, model, args.requests_per_stream)
    port = free_port()
    naive = [sys.executable, str(ROOT / "loadtests" / "naive_chat_server.py"), "--port", str(port)]
    with run_server(naive, port) as url:
        result["naive"] = sweep("naive", url, model, args.requests_per_stream)
    if not args.skip_transformers_serve:
        path = bentoml.models.get(CATALOG[model].tag).path
        port = free_port()
        command = [
            str(Path(sys.executable).with_name("transformers")),
            "serve",
            path,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--continuous-batching",
            "--cb-num-blocks",
            str(settings.generation_cache_blocks),
            "--cb-block-size",
            "64",
            "--cb-max-batch-tokens",
            "512",
            "--dtype",
            settings.generation_dtype,
        ]
        try:
            with run_server(command, port, ready_path="/health") as url:
                result["transformers_serve"] = sweep(
                    "transformers_serve", url, path, args.requests_per_stream
                )
        except Exception as exc:  # reported, not fatal: the peer is optional
            print(f"transformers serve did not run: {exc}", flush=True)
            result["transformers_serve_error"] = str(exc)[-2000:]

    at16 = {
        name: next(p for p in result[name] if p["streams"] == 16)
        for name in ("fnserve", "naive", "transformers_serve")
        if result.get(name)
    }
    ratios = {
        "fnserve_over_naive_at_16": at16["fnserve"]["tokens_per_s"] / at16["naive"]["tokens_per_s"],
        "ttft_p50_ms_at_16": at16["fnserve"]["ttft_p50_ms"],
    }
    if "transformers_serve" in at16:
        ratios["fnserve_over_transformers_serve_at_16"] = (
            at16["fnserve"]["tokens_per_s"] / at16["transformers_serve"]["tokens_per_s"]
        )
    result["ratios"] = ratios
    (RESULTS / "generation.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / "generation.png")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
