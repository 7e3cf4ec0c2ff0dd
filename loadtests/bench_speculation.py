"""Speculative decoding, `auto` against `off`, in one run: tokens/s and time to first token at 1, 4, 16
and 32 streams, on an input-grounded and an open-ended workload.

    make bench-speculation   # ~15 minutes; writes loadtests/results/speculation.{json,png}

One server with `make serve`'s defaults (response caches off, since prompts repeat). `off` is the
per-request opt-out (`speculation: "off"`), which the engine treats as it treats FNSERVE_SPECULATION=off
for that request, so both modes share the server, its warm-up and the machine's drift; at each level
they alternate in ABBA order. Greedy requests, streamed; tokens are counted from `usage`, since a chunk
carries every token a step accepted. Beside each figure: the engine's tokens per forward pass for the
drafted requests and its acceptance rate, from /engine/stats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.functions.hardware import describe  # noqa: E402
from tests.server import CACHES_OFF, serve, served_dtypes  # noqa: E402

RESULTS = ROOT / "loadtests" / "results"
MODEL = "smollm2-135m-instruct"
STREAMS = [1, 4, 16, 32]
MAX_TOKENS = 256
BARS = {("grounded", 1): 1.8, ("grounded", 4): 1.3}  # every other cell: 0.97

PARAGRAPHS = [
    "The lighthouse on the northern cape was built in 1871 from granite quarried on the island itself. "
    "For more than a century its keepers climbed one hundred and twelve steps every evening to light the "
    "lamp, and every morning they climbed them again to clean the lens. In 1962 the light was automated, "
    "and the last keeper, a man named Thomas Reed, moved to the village below, where he repaired fishing "
    "nets until he died. Today the tower is a museum, and visitors can still climb the steps to the lamp.",
    "Sourdough bread needs only flour, water and salt, but it takes patience. The starter, a mixture of "
    "flour and water that has collected wild yeast, must be fed every day. The dough is mixed, left to "
    "rest, folded several times over a few hours, and then shaped into a loaf. Most bakers let the loaf "
    "rise slowly in a cold room overnight. In the morning it is baked in a very hot oven, often inside a "
    "heavy pot, which keeps the steam around the bread and gives it a thick, crackling crust.",
    "The city council met on Tuesday to discuss the new bicycle lanes on Market Street. Supporters said "
    "the lanes had made the street safer and that shops had seen more customers since they opened. Some "
    "shop owners disagreed, saying that the loss of parking spaces had driven drivers away. After two "
    "hours of debate, the council voted to keep the lanes for another year and to study the effect on "
    "local business. The mayor said the decision would be reviewed next spring.",
]
SPELLING = {"the": "teh", "which": "wich", "every": "evry", "their": "thier", "until": "untill"}


def misspelled(text: str) -> str:
    return " ".join(SPELLING.get(word, word) for word in text.split(" "))


GROUNDED = [
    *(f"Rewrite the following paragraph in your own words, keeping every fact:\n\n{p}" for p in PARAGRAPHS),
    *(
        f"Fix the spelling mistakes in this paragraph and write it out again:\n\n{misspelled(p)}"
        for p in PARAGRAPHS
    ),
    *(
        f"Copy out, word for word, the sentences of this paragraph that mention a number:\n\n{p}"
        for p in PARAGRAPHS
    ),
]
OPEN = [
    "Write a story about a dragon who is afraid of the dark.",
    "Explain how a refrigerator keeps food cold.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your summer holiday.",
    "Explain why the sky is blue to a ten-year-old.",
    "Write a poem about the first snow of winter.",
]
WORKLOADS = {"grounded": GROUNDED, "open": OPEN}


async def one_chat(client: httpx.AsyncClient, prompt: str, mode: str, stats: dict[str, list[float]]) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "speculation": mode,
    }
    start = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                stats["tokens"].append(chunk["usage"]["completion_tokens"])
    stats["ttft"].append(first or 0.0)


def engine_stats(client: httpx.Client) -> dict[str, float]:
    return client.get("/engine/stats").json()


async def load(url: str, prompts: list[str], mode: str, streams: int) -> dict[str, float]:
    """`streams` concurrent requests over the prompts in turn; one stream runs one request per task
    (every third prompt) one after another."""
    stats: dict[str, list[float]] = {"ttft": [], "tokens": []}
    async with httpx.AsyncClient(
        base_url=url, timeout=900, limits=httpx.Limits(max_connections=64)
    ) as client:
        started = time.perf_counter()
        if streams == 1:
            for prompt in prompts[::3]:
                await one_chat(client, prompt, mode, stats)
        else:
            await asyncio.gather(
                *(one_chat(client, prompts[i % len(prompts)], mode, stats) for i in range(streams))
            )
        elapsed = time.perf_counter() - started
    return {
        "tokens_per_s": sum(stats["tokens"]) / elapsed,
        "ttft_p50_ms": 1000 * statistics.median(stats["ttft"]),
        "requests": len(stats["tokens"]),
        "tokens": sum(stats["tokens"]),
    }


def measure(url: str, prompts: list[str], mode: str, streams: int) -> dict[str, float]:
    """One round; with the engine's drafting over that round (none for `off`)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        before = engine_stats(client)
        result = asyncio.run(load(url, prompts, mode, streams))
        after = engine_stats(client)

    def grew(name: str) -> float:
        return after[name] - before[name]

    drafts, drafted, accepted = (
        grew(f"speculation_{n}") for n in ("drafts", "draft_tokens", "accepted_tokens")
    )
    steps = grew("speculation_steps")
    drafting_steps = after["speculation_share_of_steps"] * after["speculation_steps"] - (
        before["speculation_share_of_steps"] * before["speculation_steps"]
    )
    result.update(
        drafts=drafts,
        acceptance_rate=accepted / drafted if drafted else 0.0,
        tokens_per_drafted_pass=(accepted + drafts) / drafts if drafts else 1.0,
        tokens_per_step=result["tokens"] / steps if steps else 0.0,
        share_of_steps_drafting=drafting_steps / steps if steps else 0.0,
    )
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, workload in zip(axes, WORKLOADS, strict=True):
        rows = result["workloads"][workload]
        for mode in ("auto", "off"):
            ax.plot(STREAMS, [rows[str(s)][mode]["tokens_per_s"] for s in STREAMS], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(STREAMS, [str(s) for s in STREAMS])
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{workload} prompts")
        ax.legend()
    fig.suptitle(f"speculation auto vs off ({result['machine']['cpu']}, {result['served_dtypes'][MODEL]})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, nargs="*", default=STREAMS)
    args = parser.parse_args()
    result: dict[str, Any] = {"machine": describe(), "max_tokens": MAX_TOKENS, "workloads": {}, "bars": {}}
    result["command"] = "make bench-speculation"
    # A closed-loop benchmark measures throughput: admission by expected wait would refuse its queue.
    with serve(env={**CACHES_OFF, "FNSERVE_GENERATION_MAX_WAIT_SECONDS": "3600"}) as url:
        result["served_dtypes"] = served_dtypes(url)
        status = httpx.get(f"{url}/models/status", timeout=60).json()[MODEL]["choices"]
        result["speculation_step_tokens"] = status["speculation_step_tokens"]
        # Warm-up: every prompt once, so that every round finds its prompt's blocks in the prefix cache
        # (the first round would otherwise pay the only cold prefills).
        for prompts in WORKLOADS.values():
            measure(url, prompts, "off", len(prompts))
        for workload, prompts in WORKLOADS.items():
            rows = result["workloads"].setdefault(workload, {})
            for streams in args.streams:
                rounds: dict[str, list[dict[str, float]]] = {"auto": [], "off": []}
                for mode in ("auto", "off", "off", "auto"):
                    rounds[mode].append(measure(url, prompts, mode, streams))
                cell = {mode: mean_of(runs) for mode, runs in rounds.items()}
                cell["ratio"] = cell["auto"]["tokens_per_s"] / cell["off"]["tokens_per_s"]
                bar = BARS.get((workload, streams), 0.97)
                result["bars"][f"{workload}@{streams}"] = {
                    "ratio": cell["ratio"],
                    "bar": bar,
                    "met": cell["ratio"] >= bar,
                }
                rows[str(streams)] = cell
                print(workload, streams, json.dumps(cell), flush=True)
                (RESULTS / "speculation.json").write_text(json.dumps(result, indent=2) + "\n")  # so far
    (RESULTS / "speculation.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "speculation.png")


def mean_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.mean(run[key] for run in runs) for key in runs[0]}


if __name__ == "__main__":
    main()
