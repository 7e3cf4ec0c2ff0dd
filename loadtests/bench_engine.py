"""The generation engine alone, in this process: 16 greedy streams with SDPA on the key/value heads
(`services.functions.engine.attention_on_kv_heads`) against the copy to every query head, in alternating
rounds; the ratio is the median over rounds.

    .venv/bin/python loadtests/bench_engine.py [--dtype auto|float32|bfloat16] [--rounds 4]

No server and no HTTP: this isolates the engine's decode speed from the serving path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.bench_generation import MAX_TOKENS, TOPICS  # noqa: E402

if TYPE_CHECKING:
    from services.functions.engine import TransformersEngine

RESULTS = ROOT / "loadtests" / "results"
STREAMS = 16


async def wave(engine: TransformersEngine, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    """All prompts at once; (tokens/s, each prompt's tokens)."""
    from services.functions.engine import Sampling

    async def one(ids: list[int]) -> list[int]:
        out: list[int] = []
        async for step in engine.stream(ids, Sampling(MAX_TOKENS)):
            out += step.token_ids
        return out

    start = time.perf_counter()
    outputs = await asyncio.gather(*(one(ids) for ids in prompts))
    return sum(map(len, outputs)) / (time.perf_counter() - start), outputs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto: as the server picks"
    )
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    import bentoml
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.catalog import CATALOG
    from services.config import get_settings
    from services.functions.engine import SDPA_GQA_SWITCH, TransformersEngine
    from services.functions.generation import probe_decoding
    from services.functions.hardware import describe, fastest_dtype

    settings = get_settings()
    path = bentoml.models.get(CATALOG[settings.generation_model].tag).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    args.dtype, _, reason = fastest_dtype(args.dtype, "cpu", model, probe_decoding)
    print(f"dtype {args.dtype}: {reason}", flush=True)
    model = model.to(getattr(torch, args.dtype))
    engine = TransformersEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, settings.cache_blocks)
    prompts = [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": f"Write a short poem about {TOPICS[i % len(TOPICS)]}."}],
                add_generation_prompt=True,
                return_dict=False,
            )
        )
        for i in range(STREAMS)
    ]
    asyncio.run(wave(engine, prompts))  # warm-up
    speeds: dict[str, list[float]] = {"copied_heads": [], "kv_heads": []}
    outputs: dict[str, list[list[int]]] = {}
    for round_ in range(args.rounds):
        order = ["copied_heads", "kv_heads"][:: 1 if round_ % 2 else -1]
        for name in order:
            os.environ[SDPA_GQA_SWITCH] = "1" if name == "kv_heads" else "0"
            speed, outputs[name] = asyncio.run(wave(engine, prompts))
            speeds[name].append(speed)
            print(f"{name}: {speed:.1f} tokens/s", flush=True)
    engine.shutdown()
    # Per-round ratios: drift on this shared machine falls on both halves of a round alike.
    ratios = [kv / copied for kv, copied in zip(speeds["kv_heads"], speeds["copied_heads"], strict=True)]
    result = {
        "machine": describe(),
        "dtype": args.dtype,
        "streams": STREAMS,
        "max_tokens": MAX_TOKENS,
        "tokens_per_s": speeds,
        "kv_heads_over_copied_heads": statistics.median(ratios),
        "round_ratios": ratios,
        "same_tokens": outputs["kv_heads"] == outputs["copied_heads"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"engine-{args.dtype}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "tokens_per_s"}, indent=2))


if __name__ == "__main__":
    main()
