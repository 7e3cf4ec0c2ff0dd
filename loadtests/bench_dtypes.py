"""fp32 against bf16 for the models from the store, on this machine: the figures behind the README's
"Per-machine choices" table, and what `auto` would serve here.

    make bench-dtypes   # about a minute; writes loadtests/results/dtypes-<cpu>-<family>.json

Two torch threads (the machines here have two cores), best of five after a warm-up.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.functions.hardware import describe, label  # noqa: E402

RESULTS = ROOT / "loadtests" / "results"


def best_of(run: Callable[[], object], times: int = 5) -> float:
    run()  # warm-up: first calls pick kernels and allocate
    seconds = []
    for _ in range(times):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def main() -> None:
    import bentoml
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from models.catalog import CATALOG
    from services.functions.embedding import TextEncoder

    torch.set_num_threads(2)
    embedder = bentoml.models.get(CATALOG["all-minilm-l6-v2"].tag).path
    chat = bentoml.models.get(CATALOG["smollm2-135m-instruct"].tag).path
    text_encoder = TextEncoder(AutoTokenizer.from_pretrained(embedder), 256)
    sentences = [f"a short sentence of about a dozen tokens, number {i}" for i in range(32)]
    figures: dict[str, dict[str, float]] = {}
    for dtype in ("float32", "bfloat16"):
        encoder = AutoModel.from_pretrained(embedder, dtype=getattr(torch, dtype)).eval()
        with torch.inference_mode():
            seconds = best_of(lambda e=encoder: text_encoder.encode(e, sentences))
        row = {"minilm_batch32_texts_per_s": 32 / seconds}
        decoder = AutoModelForCausalLM.from_pretrained(chat, dtype=getattr(torch, dtype)).eval()
        for tokens in (16, 128):
            ids = torch.arange(1000, 1000 + tokens).unsqueeze(0)
            with torch.inference_mode():
                row[f"smollm2_forward_{tokens}_ms"] = best_of(lambda d=decoder, ids=ids: d(ids)) * 1000
        figures[dtype] = row
        print(dtype, {key: round(value, 1) for key, value in row.items()}, flush=True)
    machine = describe()
    result = {"machine": machine, "label": label(machine), "threads": 2, "figures": figures}
    name = "".join(c if c.isalnum() else "-" for c in f"{machine['cpu']} {machine['family']}").lower()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"dtypes-{name}.json").write_text(json.dumps(result, indent=2))
    print(result["label"])


if __name__ == "__main__":
    main()
