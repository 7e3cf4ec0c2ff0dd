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


def greedy_steps(
    question: str,
    max_tokens: int,
    presence: float = 0.0,
    frequency: float = 0.0,
    repetition: float = 1.0,
    top: int = 0,
) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """Greedy decoding one full forward pass at a time, with the penalties as vLLM defines them
    (presence and frequency over the answer's tokens, repetition over the prompt's and the answer's):
    each token with its raw log-softmax and the `top` likeliest (token, logprob) before any penalty."""
    tokenizer, model = _model()
    prompt = list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False
        )
    )
    answer: list[int] = []
    steps = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([prompt + answer])).logits[0, -1].float()
            logprobs = logits.log_softmax(-1)
            counts = torch.bincount(torch.tensor(answer, dtype=torch.long), minlength=logits.numel())
            logits = logits - frequency * counts - presence * (counts > 0).float()
            seen = torch.tensor(sorted(set(prompt + answer)))
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / repetition, logits[seen] * repetition)
            token = int(logits.argmax())
            values, indices = logprobs.topk(top) if top else (torch.empty(0), torch.empty(0))
            steps.append(
                (token, float(logprobs[token]), list(zip(indices.tolist(), values.tolist(), strict=True)))
            )
            answer.append(token)
            if token == tokenizer.eos_token_id:
                break
    return steps
