"""The chat model run directly through transformers: what the served answers must equal."""

from __future__ import annotations

from functools import cache

import bentoml
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.catalog import CATALOG


@cache
def _model() -> tuple[AutoTokenizer, AutoModelForCausalLM]:
    path = bentoml.models.get(CATALOG["smollm2-135m-instruct"].tag).path
    return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32
    ).eval()


def reference(question: str, max_tokens: int) -> str:
    """The same model run directly through transformers, greedy, fp32."""
    tokenizer, model = _model()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=False,
    )
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
