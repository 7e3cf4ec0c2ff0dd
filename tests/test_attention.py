"""Attention on the key/value heads changes speed, not answers."""

from __future__ import annotations

import bentoml
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import sdpa_attention

from models.catalog import CATALOG
from services.functions.engine import SDPA_GQA_SWITCH


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_attention_on_kv_heads_gives_the_same_logits(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = bentoml.models.get(CATALOG["smollm2-135m-instruct"].tag).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    # Two prompts of different lengths: padding gives a mask, the case transformers copies the heads for.
    batch = tokenizer(["Write a short poem about the sea.", "Hi"], return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all()
    copies: list[int] = []
    library_repeat = sdpa_attention.repeat_kv

    def repeat_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
        copies.append(n_rep)
        return library_repeat(states, n_rep)

    monkeypatch.setattr(sdpa_attention, "repeat_kv", repeat_kv)
    logits, copied = {}, {}
    for flag in ("0", "1"):
        monkeypatch.setenv(SDPA_GQA_SWITCH, flag)
        copies.clear()
        with torch.no_grad():
            logits[flag] = model(**batch).logits
        copied[flag] = len(copies)
    assert copied["0"] > 0 and copied["1"] == 0  # the switch does change the path
    assert torch.equal(logits["0"], logits["1"])
