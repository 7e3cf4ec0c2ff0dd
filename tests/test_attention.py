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
from tests.reference import greedy_steps


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


# Questions whose greedy answers in fp32 lead the runner-up token by at least MARGIN logits at every step
# up to the answer's keyword, many bf16 steps (1/8 at these logits). "What is the capital of France?" leads
# by 0.08, less than one, so its bf16 answer changes with the batch's shape ("L'Étoile, ..." in a plain
# batch of 8, eager or SDPA).
QUESTIONS = {
    "What is the capital of Japan?": "Tokyo",
    "What is the capital of Russia?": "Moscow",
    "What is the capital of Germany?": "Berlin",
    "What is the chemical symbol for water?": "H2O",
}
MARGIN = 0.5


@pytest.mark.skipif(
    not machine().native_bf16,
    reason="this CPU emulates bf16, so `auto` never serves it here",
)
def test_bf16_prompts_joining_a_running_batch_get_their_own_answer() -> None:
    """The engine on CPU in bf16: eight greedy chats, two of each question, arriving a few at a time ten
    times over, each answers its own question, so no request reads another's cache or logits."""
    import asyncio
    import random

    from services.functions.engine import Sampling, TransformersEngine

    path = bentoml.models.get(CATALOG["smollm2-135m-instruct"].tag).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = {
        question: list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False
            )
        )
        for question in QUESTIONS
    }
    for question, keyword in QUESTIONS.items():  # the premise: no near-tie up to the keyword's last token
        tokens: list[int] = []
        leads: list[float] = []
        for token, _, top in greedy_steps(question, 12, top=2):
            tokens.append(token)
            leads.append(top[0][1] - top[1][1])  # log-softmax differences are logit differences
            if keyword in tokenizer.decode(tokens):
                break
        assert keyword in tokenizer.decode(tokens) and min(leads) >= MARGIN, (question, leads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    engine = TransformersEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, 64)
    shuffle = random.Random(0)

    async def answer(question: str, delay: float) -> tuple[str, str]:
        await asyncio.sleep(delay)
        tokens: list[int] = []
        async for step in engine.stream(prompts[question], Sampling(12)):
            tokens.extend(step.token_ids)
        return question, tokenizer.decode(tokens, skip_special_tokens=True)

    async def trials() -> list[tuple[str, str]]:
        answers: list[tuple[str, str]] = []
        for _ in range(10):
            chats = [question for question in QUESTIONS for _ in range(2)]
            answers += await asyncio.gather(*(answer(question, shuffle.random() * 0.3) for question in chats))
        return answers

    try:
        answers = asyncio.run(trials())
    finally:
        engine.shutdown()
    wrong = [(question, text) for question, text in answers if QUESTIONS[question] not in text]
    assert not wrong, wrong
