"""Attention on the key/value heads changes speed, not answers."""

from __future__ import annotations

import bentoml
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import sdpa_attention

from models.catalog import CATALOG
from services.functions.engine import SDPA_GQA_SWITCH
from services.functions.hardware import machine


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


@pytest.mark.skipif(
    not machine().native_bf16,
    reason="this CPU emulates bf16, so `auto` never serves it here; on a Zen 3 one answer of 80 was wrong",
)
def test_bf16_prompts_joining_a_running_batch_get_their_own_answer() -> None:
    """The engine on CPU in bf16 (its eager attention, services/functions/engine.py): eight identical
    greedy chats arriving a few at a time, ten times over, all answer the question. Under SDPA one or two
    of them answered another text in about one trial in five."""
    import asyncio
    import random

    from services.functions.engine import Sampling, TransformersEngine

    path = bentoml.models.get(CATALOG["smollm2-135m-instruct"].tag).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    engine = TransformersEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, 64)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False))
    shuffle = random.Random(0)

    async def answer(delay: float) -> str:
        await asyncio.sleep(delay)
        tokens: list[int] = []
        async for step in engine.stream(ids, Sampling(8)):
            tokens.extend(step.token_ids)
        return tokenizer.decode(tokens, skip_special_tokens=True)

    async def trials() -> list[str]:
        texts: list[str] = []
        for _ in range(10):
            texts += await asyncio.gather(*(answer(shuffle.random() * 0.3) for _ in range(8)))
        return texts

    try:
        texts = asyncio.run(trials())
    finally:
        engine.shutdown()
    assert all(text.startswith("The capital of France is") for text in texts), set(texts)
