"""Speculative decoding, `auto` against `off`, in one run: tokens/s and time to first token at 1, 4, 16
and 32 streams, on an input-grounded and an open-ended workload.

    make bench-speculation   # ~25 minutes; writes loadtests/results/speculation.{json,png}

One server with `make serve`'s defaults (response caches off, since prompts repeat). `off` is the
per-request opt-out (`speculation: "off"`), which the engine treats as it treats FNSERVE_SPECULATION=off
for that request, so both modes share the server, its warm-up and the machine's drift; at each level
they alternate in ABBA order (ABBABAAB at 16 and 32 streams). Each stream sends its next request as
soon as its last one ends, and the tokens are counted over a window of WINDOW seconds that opens once
every stream has its first token: a level's figure is that many streams decoding together, not a burst
that drains to one long answer.
Greedy requests, streamed; tokens are counted from each chunk's running usage (vLLM's
`continuous_usage_stats`), since a chunk carries every token a step accepted. Beside each figure: the
engine's tokens per forward pass for the drafted requests and its acceptance rate, from /engine/stats.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
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


TASKS = [
    "Rewrite the following paragraph in your own words, keeping every fact:\n\n{}",
    "Fix the spelling mistakes in this paragraph and write it out again:\n\n{}",
    "Copy out, word for word, the sentences of this paragraph that mention a number:\n\n{}",
]
# The three tasks in turn (each over the paragraphs in turn), so that any few streams hold all three.
GROUNDED = [
    TASKS[task].format(
        misspelled(PARAGRAPHS[(round_ + task) % 3]) if task == 1 else PARAGRAPHS[(round_ + task) % 3]
    )
    for round_ in range(3)
    for task in range(3)
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


WINDOW = 20.0  # seconds of each round that are counted
# Rounds alternate ABBA, twice over (BAAB) where many streams make a round's figure vary more.
ORDER = ("auto", "off", "off", "auto", "off", "auto", "auto", "off")


@dataclass
class Round:
    """What the streams of one round saw: every token as it came, each request's time to first token."""

    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    first: set[int] = field(default_factory=set)  # streams that have had a token
    all_started: asyncio.Event = field(default_factory=asyncio.Event)


async def one_chat(
    client: httpx.AsyncClient, prompt: str, mode: str, stream: int, seen: Round, streams: int
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "speculation": mode,
    }
    start = time.perf_counter()
    counted = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            usage = json.loads(line[6:]).get("usage") or {}
            if (tokens := usage.get("completion_tokens", 0)) > counted:
                if not counted:
                    seen.ttft.append(time.perf_counter() - start)
                    seen.first.add(stream)
                    if len(seen.first) == streams:
                        seen.all_started.set()
                seen.tokens += tokens - counted
                counted = tokens


async def load(url: str, prompts: list[str], mode: str, streams: int) -> dict[str, float]:
    """`streams` streams, stream i over prompts i, i + streams, ... in turn, each request sent as the
    last one ends; counted over WINDOW seconds once every stream has its first token, then cancelled."""
    seen = Round()

    async def stream(index: int, client: httpx.AsyncClient) -> None:
        for turn in itertools.count():
            await one_chat(
                client, prompts[(index + turn * streams) % len(prompts)], mode, index, seen, streams
            )

    async with httpx.AsyncClient(
        base_url=url, timeout=900, limits=httpx.Limits(max_connections=64)
    ) as client:
        tasks = [asyncio.create_task(stream(i, client)) for i in range(streams)]
        started = asyncio.create_task(seen.all_started.wait())
        done, _ = await asyncio.wait([started, *tasks], return_when=asyncio.FIRST_COMPLETED)
        failed(done - {started})
        opened = seen.tokens
        done, _ = await asyncio.wait(tasks, timeout=WINDOW, return_when=asyncio.FIRST_EXCEPTION)
        failed(done)
        tokens = seen.tokens - opened
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "tokens_per_s": tokens / WINDOW,
        "ttft_p50_ms": 1000 * statistics.median(seen.ttft),
        "requests": len(seen.ttft),
        "tokens": tokens,
        "round_tokens": seen.tokens,  # the window's and those before and after it
    }


def failed(streams: set[asyncio.Task[None]]) -> None:
    """A stream only ends by failing (a request that got an error): the run stops with its error."""
    for task in streams:
        task.result()
        raise RuntimeError("a stream ended without an error")


def idle(url: str) -> None:
    """Waits until the engine has finished with the cancelled requests of the last round."""
    with httpx.Client(base_url=url, timeout=60) as client:
        while (stats := engine_stats(client))["running"] or stats["waiting"]:
            time.sleep(0.2)


def engine_stats(client: httpx.Client) -> dict[str, float]:
    return client.get("/engine/stats").json()


def measure(url: str, prompts: list[str], mode: str, streams: int) -> dict[str, float]:
    """One round; with the engine's drafting over that round (none for `off`)."""
    with httpx.Client(base_url=url, timeout=60) as client:
        before = engine_stats(client)
        result = asyncio.run(load(url, prompts, mode, streams))
        idle(url)
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
        tokens_per_step=result["round_tokens"] / steps if steps else 0.0,
        share_of_steps_drafting=drafting_steps / steps if steps else 0.0,
    )
    return result


async def warm(url: str, prompts: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        await asyncio.gather(*(one_chat(client, p, "off", i, Round(), 0) for i, p in enumerate(prompts)))


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
        result["speculation_step_cost"] = status["speculation_step_cost"]
        # Warm-up: every prompt once, so that every round finds its prompt's blocks in the prefix cache
        # (the first round would otherwise pay the only cold prefills).
        for prompts in WORKLOADS.values():
            asyncio.run(warm(url, prompts))
        for workload, prompts in WORKLOADS.items():
            rows = result["workloads"].setdefault(workload, {})
            for streams in args.streams:
                rounds: dict[str, list[dict[str, float]]] = {"auto": [], "off": []}
                for mode in ORDER[: 8 if streams >= 16 else 4]:
                    rounds[mode].append(measure(url, prompts, mode, streams))
                cell: dict[str, Any] = {mode: mean_of(runs) for mode, runs in rounds.items()}
                cell["rounds_tokens_per_s"] = {m: [r["tokens_per_s"] for r in rs] for m, rs in rounds.items()}
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
        fitted = httpx.get(f"{url}/engine/stats", timeout=60).json()
        result["step_cost_fitted"] = {k: v for k, v in fitted.items() if k.startswith("speculation_cost")}
    (RESULTS / "speculation.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / "speculation.png")


def mean_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.mean(run[key] for run in runs) for key in runs[0]}


if __name__ == "__main__":
    main()
