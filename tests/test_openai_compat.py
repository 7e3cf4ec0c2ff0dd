"""What the tools people point at OpenAI-compatible servers send, on the main server (fp32, real model):
content parts, n choices, logprobs against the model's own log-softmax, penalties and min_tokens against
a reference decoding loop, vLLM's extensions (ignore_eos, top_k, usage on every chunk), the fields
accepted and ignored, vLLM's /health, /tokenize and /detokenize, and /v1/models' max_model_len."""

from __future__ import annotations

import json
from itertools import accumulate
from typing import Any

import bentoml
import httpx
import pytest
from transformers import AutoTokenizer

from tests.reference import greedy_steps
from tests.test_chat import MODEL, QUESTION, ask, chat_body, sse_events

EMBEDDER = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The chat model's tokenizer from the model store, as the server loads it."""
    return AutoTokenizer.from_pretrained(bentoml.models.get(MODEL).path)


def text_of(answer: dict[str, Any], index: int = 0) -> str:
    return answer["choices"][index]["message"]["content"]


def test_health_answers_200_without_a_key(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200


def test_text_parts_are_the_text_they_hold(client: httpx.Client) -> None:
    plain = text_of(ask(client, max_tokens=12))
    parts = [{"type": "text", "text": QUESTION}]
    assert text_of(ask(client, max_tokens=12, messages=[{"role": "user", "content": parts}])) == plain
    # Two parts are joined with a newline, as vLLM joins them; `developer` is `system`.
    two = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    joined = [{"role": "user", "content": "What is the capital\nof France?"}]
    assert text_of(ask(client, max_tokens=12, messages=[{"role": "user", "content": two}])) == text_of(
        ask(client, max_tokens=12, messages=joined)
    )
    system = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": QUESTION}]
    developer = [{**system[0], "role": "developer"}, system[1]]
    assert text_of(ask(client, max_tokens=12, messages=developer)) == text_of(
        ask(client, max_tokens=12, messages=system)
    )


@pytest.mark.parametrize(
    ("part", "named"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "'image_url'"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "'input_audio'"),
        ({"text": "no type"}, "not a content part"),
        ({"type": "text", "text": 5}, "content[0] must be"),
    ],
)
def test_parts_no_model_reads_get_a_400_that_names_them(client: httpx.Client, part: dict, named: str) -> None:
    body = chat_body(max_tokens=4, messages=[{"role": "user", "content": [part]}])
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and named in error["message"], error
    assert text_of(ask(client, max_tokens=2))


def test_ignore_eos_generates_exactly_max_tokens(client: httpx.Client) -> None:
    answer = ask(client, messages=[{"role": "user", "content": "Say hi."}], max_tokens=48, ignore_eos=True)
    assert answer["usage"]["completion_tokens"] == 48
    assert answer["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("n", [1, 2])
def test_usage_on_every_chunk_with_continuous_usage_stats(client: httpx.Client, n: int) -> None:
    """Every choice's tokens so far, never going back (a second choice's first chunk counted none);
    only with include_usage, as vLLM sends it."""
    body = chat_body(max_completion_tokens=20, ignore_eos=True, stream=True, n=n)
    options = {"include_usage": True, "continuous_usage_stats": True}
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream_options": options}) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert all(chunk["usage"]["prompt_tokens"] > 0 for chunk in chunks)
    assert counts == sorted(counts) and counts[-1] == 20 * n  # growing, to the last token
    assert chunks[-1]["choices"] == []  # include_usage's own last chunk
    if n == 1:
        alone = {**body, "stream_options": {"continuous_usage_stats": True}, "max_completion_tokens": 4}
        with client.stream("POST", "/v1/chat/completions", json=alone) as response:
            assert not any("usage" in json.loads(event) for event in sse_events(response)[:-1])


def test_n_choices_are_independent_samples_from_one_request(client: httpx.Client) -> None:
    """Seeded too: each choice is its own sample, and a repeat (from this worker's cache) gets each
    choice back, not n copies of one."""
    body = chat_body(
        messages=[{"role": "user", "content": "Write ten random words."}],
        temperature=1.0,
        max_tokens=24,
        ignore_eos=True,
        n=3,
        seed=20261207,
    )
    first = client.post("/v1/chat/completions", json=body)
    answer = first.json()
    assert [choice["index"] for choice in answer["choices"]] == [0, 1, 2]
    texts = [choice["message"]["content"] for choice in answer["choices"]]
    assert len(set(texts)) == 3, texts  # 24 sampled tokens: equal answers would mean shared draws
    assert answer["usage"]["completion_tokens"] == 3 * 24
    again = client.post("/v1/chat/completions", json=body)  # on the same connection: the same worker
    assert (first.headers["x-fnserve-cache"], again.headers["x-fnserve-cache"]) == ("miss", "hit")
    assert again.json()["choices"] == answer["choices"]
    del body["seed"]  # streamed as generated, not replayed from the cache
    with client.stream("POST", "/v1/chat/completions", json={**body, "n": 2, "stream": True}) as response:
        chunks = [json.loads(event) for event in sse_events(response)[:-1]]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert mine[-1]["finish_reason"] == "length"
        assert "".join(c["delta"].get("content") or "" for c in mine).strip()


def test_a_completion_of_a_list_of_prompts_answers_each_with_n_choices(client: httpx.Client) -> None:
    """As vLLM numbers them: prompt i's j-th choice at index i·n + j; each prompt's tokens counted once."""
    prompts = ["The capital of France is", "Two plus two is"]

    def complete(prompt: str | list[str], **extra: Any) -> httpx.Response:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
        return client.post("/v1/completions", json=body)

    alone = [complete(prompt).json() for prompt in prompts]
    both = complete(prompts, n=2).json()
    assert [choice["index"] for choice in both["choices"]] == [0, 1, 2, 3]
    texts = [choice["text"] for choice in both["choices"]]
    assert texts == [answer["choices"][0]["text"] for answer in alone for _ in range(2)]
    usage = both["usage"]
    assert usage["prompt_tokens"] == sum(answer["usage"]["prompt_tokens"] for answer in alone)
    assert usage["completion_tokens"] == 2 * sum(answer["usage"]["completion_tokens"] for answer in alone)
    assert complete(prompts[:1]).json()["choices"] == alone[0]["choices"]
    for bad in ([], [1, 2], ["a"] * 9):  # 9 prompts with n=2: 18 choices, over the 16
        refused = complete(bad, n=2)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt", refused.text


def test_top_k_of_one_samples_the_greedy_answer(client: httpx.Client) -> None:
    greedy = text_of(ask(client, max_tokens=24))
    assert text_of(ask(client, max_tokens=24, temperature=1.0, top_k=1)) == greedy
    # A request without top_k in the same engine still samples from every token.
    sampled = {text_of(ask(client, max_tokens=24, temperature=1.5, top_p=1.0)) for _ in range(3)}
    assert sampled != {greedy}


def test_the_largest_top_k_and_seed_are_served(client: httpx.Client) -> None:
    """A top-k past the vocabulary samples from all of it; the largest seed is cached as any other."""
    body = chat_body(max_tokens=8, temperature=1.0, top_k=2**31 - 1, seed=-(2**63))
    first, again = (client.post("/v1/chat/completions", json=body) for _ in range(2))
    assert first.status_code == again.status_code == 200, first.text
    assert text_of(again.json()) == text_of(first.json()) and again.headers["x-fnserve-cache"] == "hit"


ACCEPTED = {
    "user": "someone",
    "metadata": {"team": "search"},
    "service_tier": "auto",
    "store": False,
    "seed": 7,
    "response_format": {"type": "text"},
    "presence_penalty": 0,
    "frequency_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_tokens": 0,
    "top_k": -1,
    "skip_special_tokens": True,
    "logprobs": False,
    "stop": "\n\n",
}


def test_fields_with_no_effect_here_are_accepted(client: httpx.Client) -> None:
    assert text_of(ask(client, max_tokens=8, **ACCEPTED))
    completion = {"model": MODEL, "prompt": "The sea is", "max_tokens": 4, "logprobs": 0}
    assert client.post("/v1/completions", json=completion).status_code == 200


def test_null_asks_for_a_fields_default_and_a_required_null_is_refused(client: httpx.Client) -> None:
    """OpenAI's optional fields are "... or null"; clients send null for "unset"."""
    unset = dict.fromkeys(
        ("top_p", "n", "stream", "stream_options", "seed", "stop", "presence_penalty", "frequency_penalty")
    ) | dict.fromkeys(("top_k", "min_tokens", "repetition_penalty", "ignore_eos", "speculation", "logprobs"))
    plain, nulls = ask(client, max_tokens=8), ask(client, max_tokens=8, user=None, **unset)  # greedy
    assert (nulls["choices"], nulls["usage"]) == (plain["choices"], plain["usage"])
    sampled = client.post("/v1/chat/completions", json=chat_body(max_tokens=8, temperature=None))
    assert sampled.status_code == 200 and "x-fnserve-cache" not in sampled.headers  # 1.0, not greedy
    completion = {"model": MODEL, "prompt": "The sea is", "max_tokens": 4, "logprobs": None, "colour": None}
    assert client.post("/v1/completions", json=completion).json()["error"]["param"] == "colour"  # unknown
    del completion["colour"]
    assert "logprobs" not in client.post("/v1/completions", json=completion).json()["choices"][0]
    vectors = {"model": EMBEDDER, "input": "null", "encoding_format": None, "dimensions": None}
    assert len(client.post("/v1/embeddings", json=vectors).json()["data"][0]["embedding"]) == 384
    refused = client.post("/v1/chat/completions", json={**chat_body(max_tokens=4), "model": None})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "model"


@pytest.mark.parametrize(
    ("override", "param"),
    [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5}, "min_tokens"),  # over max_tokens
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2**31}, "top_k"),  # past the engine's int32: it had stopped every request in the batch
        ({"seed": 2**63}, "seed"),  # past the cache key's 64 bits: a 500 before
        ({"min_tokens": 2**64}, "min_tokens"),
        ({"max_tokens": 2**64}, "max_tokens"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream: true
    ],
)
def test_what_is_not_supported_or_out_of_range_gets_a_400_that_names_it(
    client: httpx.Client, override: dict[str, Any], param: str
) -> None:
    response = client.post("/v1/chat/completions", json={**chat_body(max_tokens=4), **override})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_tokenize_and_detokenize_as_vllm_has_them(client: httpx.Client, tokenizer: Any) -> None:
    prompt = "The lighthouse keeper counted the waves."
    tokens = client.post("/tokenize", json={"model": MODEL, "prompt": prompt}).json()
    assert tokens["tokens"] == tokenizer(prompt)["input_ids"] and tokens["count"] == len(tokens["tokens"])
    messages = [{"role": "user", "content": prompt}]
    chat = client.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert chat["tokens"] == list(expected)
    models = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert tokens["max_model_len"] == chat["max_model_len"] == models[MODEL]["max_model_len"] > 0
    assert models[EMBEDDER]["max_model_len"] == 256
    back = client.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()
    assert back == {"prompt": tokenizer.decode(tokens["tokens"])}
    for bad, param in (
        ({"model": MODEL, "tokens": [10**9]}, "tokens"),
        ({"model": MODEL, "tokens": ["a"]}, "tokens"),
        ({"model": "gpt-9", "tokens": [1]}, "model"),
    ):
        response = client.post("/detokenize", json=bad)
        assert response.status_code in (400, 404) and response.json()["error"]["param"] == param, (
            response.text
        )
    both = client.post("/tokenize", json={"model": MODEL, "prompt": prompt, "messages": messages})
    assert both.status_code == 400
    spelled = client.post("/tokenize", json={"model": MODEL, "prompt": prompt, "return_token_strs": True})
    assert spelled.json()["token_strs"] == tokenizer.convert_ids_to_tokens(tokens["tokens"])


def test_logprobs_are_the_models_own_log_softmax(client: httpx.Client, tokenizer: Any) -> None:
    steps = greedy_steps(QUESTION, 12, top=3)
    answer = ask(client, max_tokens=12, logprobs=True, top_logprobs=3)
    content = answer["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == [tokenizer.decode([token]) for token, _, _ in steps]
    for entry, (_, logprob, top) in zip(content, steps, strict=True):
        assert entry["logprob"] == pytest.approx(logprob, abs=1e-3)
        assert entry["bytes"] == list(entry["token"].encode())
        assert [t["token"] for t in entry["top_logprobs"]] == [tokenizer.decode([i]) for i, _ in top]
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx([v for _, v in top], abs=1e-3)
    # Streamed (a shorter answer, so not the cached one): the same entries, spread over the chunks.
    body = chat_body(max_tokens=6, logprobs=True, top_logprobs=3, stream=True)
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = [json.loads(data) for data in sse_events(response) if data != "[DONE]"]
    streamed = [
        entry
        for chunk in chunks
        for choice in chunk["choices"]
        if choice.get("logprobs")
        for entry in choice["logprobs"]["content"]
    ]
    assert [entry["token"] for entry in streamed] == [entry["token"] for entry in content[:6]]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content[:6]], abs=1e-3)
    assert "logprobs" not in ask(client, max_tokens=4)["choices"][0]


def test_completion_logprobs_come_in_the_legacy_shape(client: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "The sea is", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    choice = client.post("/v1/completions", json={**body, "ignore_eos": True}).json()["choices"][0]
    logprobs = choice["logprobs"]
    tokens = logprobs["tokens"]
    assert "".join(tokens) == choice["text"] and len(tokens) == 6
    assert logprobs["text_offset"] == list(accumulate([0] + [len(token) for token in tokens[:-1]]))
    for token, logprob, top in zip(tokens, logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        # Greedy: the chosen token is the likeliest, so it is among the two and its logprob the largest.
        assert len(top) == 2 and top[token] == logprob == max(top.values()) and logprob <= 0


PENALISED = "Write a short poem about the sea."  # greedy, it repeats "a canvas of endless blue"


@pytest.mark.parametrize(
    ("penalties", "reference_penalties"),
    [
        ({"frequency_penalty": 1.5, "presence_penalty": 0.5}, {"frequency": 1.5, "presence": 0.5}),
        ({"repetition_penalty": 1.3}, {"repetition": 1.3}),
    ],
)
def test_penalties_apply_as_vllm_defines_them(
    client: httpx.Client, tokenizer: Any, penalties: dict[str, float], reference_penalties: dict[str, float]
) -> None:
    expected = greedy_steps(PENALISED, 24, **reference_penalties)
    answer = text_of(ask(client, PENALISED, max_tokens=24, **penalties))
    assert answer == tokenizer.decode([token for token, _, _ in expected], skip_special_tokens=True)
    assert answer != text_of(ask(client, PENALISED, max_tokens=24))


def test_min_tokens_holds_back_the_end_of_text(client: httpx.Client) -> None:
    short = ask(client, max_tokens=40)
    assert short["choices"][0]["finish_reason"] == "stop" and short["usage"]["completion_tokens"] < 20
    held = ask(client, max_tokens=40, min_tokens=20)
    assert held["usage"]["completion_tokens"] >= 20
    # Stop strings too, as vLLM: a space would otherwise end the answer at its first word.
    spaced = ask(client, max_tokens=40, min_tokens=20, stop=[" "])["choices"][0]
    assert spaced["message"]["content"].count(" ") >= 2, spaced
