"""OpenAI chat completions and completions on the main server: real model, real streaming."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from tests.reference import reference
from tests.server import LONG, counter, http_client, server_log

TOKENS = "fnserve_generation_completion_tokens_total"

MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France?"


def chat_body(question: str = QUESTION, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0, **extra}


def sse_events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, in order."""
    return [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]


def ask(client: httpx.Client, question: str = QUESTION, **extra: Any) -> dict[str, Any]:
    response = client.post("/v1/chat/completions", json=chat_body(question, **extra))
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_answer_equals_transformers(client: httpx.Client) -> None:
    answer = ask(client, max_tokens=32)
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": reference(QUESTION, 32)}
    assert answer["object"] == "chat.completion" and answer["model"] == MODEL
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_stream_deltas_concatenate_to_the_answer(client: httpx.Client) -> None:
    whole = ask(client, max_tokens=32)
    body = chat_body(max_tokens=32, stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert len(chunks) > 5, "tokens should arrive one by one"
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_stop_string_cuts_and_is_not_returned(client: httpx.Client) -> None:
    full = ask(client, max_tokens=32)["choices"][0]["message"]["content"]
    assert " is " in full
    cut = ask(client, max_tokens=32, stop=[" is "])["choices"][0]
    assert cut["message"]["content"] == full[: full.index(" is ")]
    assert cut["finish_reason"] == "stop"


def test_top_p_and_temperature_apply_per_request(client: httpx.Client) -> None:
    """Sampled and greedy requests share batches: a tiny nucleus leaves only the top token, so that
    request answers greedily, while full-nucleus sampling at a high temperature wanders off."""
    greedy = ask(client, max_tokens=32)["choices"][0]["message"]["content"]
    kinds = [
        {"temperature": 1.5, "top_p": 1e-6},
        {"temperature": 0, "top_p": 0.9},  # top_p: not the cached greedy answer
        *[{"temperature": 1.5, "top_p": 1.0}] * 3,
    ]
    with ThreadPoolExecutor(len(kinds)) as pool:
        answers = list(pool.map(lambda extra: ask(client, max_tokens=32, **extra), kinds))
    texts = [a["choices"][0]["message"]["content"] for a in answers]
    assert texts[0] == texts[1] == greedy  # a greedy request in a batch that samples stays greedy
    assert any(text != greedy for text in texts[2:])


def test_max_tokens_is_honoured(client: httpx.Client) -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        answer = ask(client, "Tell me a long story about a fox.", **{field: 5})
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 5


def test_completions_route(client: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    answer = client.post("/v1/completions", json=body).json()
    assert answer["object"] == "text_completion"
    assert "Paris" in answer["choices"][0]["text"]


def test_sixteen_concurrent_streams_complete_with_their_sequential_answers(client: httpx.Client) -> None:
    questions = [f"In one sentence, what is {n} plus {n}?" for n in range(1, 17)]
    sequential = {q: ask(client, q, max_tokens=24)["choices"][0]["message"]["content"] for q in questions[:3]}

    def stream(question: str) -> str:
        with client.stream(
            "POST", "/v1/chat/completions", json=chat_body(question, max_tokens=24, stream=True)
        ) as r:
            chunks = [json.loads(event) for event in sse_events(r)[:-1]]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(stream, questions))
    assert all(answers)
    assert answers[:3] == [sequential[q] for q in questions[:3]]  # fp32: batching does not change text


@pytest.mark.parametrize("choices", [1, 2])
def test_disconnect_mid_stream_cancels_in_the_engine(server: str, client: httpx.Client, choices: int) -> None:
    """With `n: 2` each choice is read by a task of its own, which must stop before its request closes."""
    body = chat_body("Write a very long story about a dragon.", max_tokens=500, stream=True, n=choices)
    before, logged = counter(server, TOKENS), server_log(server).stat().st_size
    with (
        http_client(server) as own,
        own.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        for _ in range(10):
            next(lines)
        assert client.get("/engine/stats").json()["running"] == choices
    deadline = time.monotonic() + LONG
    while client.get("/engine/stats").json()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert counter(server, TOKENS) - before < 450 * choices  # cancelled: far from 500 tokens a choice
    with server_log(server).open("rb") as log:
        log.seek(logged)
        assert b"Traceback" not in log.read()  # the stream closed cleanly, each of its requests with it


@pytest.mark.parametrize(
    ("path", "body"),
    [
        # Sampled, so never a cached answer; all 500 tokens unless cancelled.
        ("/v1/chat/completions", chat_body("Hi", max_tokens=500, temperature=0.7, ignore_eos=True)),
        (
            f"/v2/models/{MODEL}/generate",
            {"text_input": "Hi", "parameters": {"max_tokens": 500, "temperature": 0.7, "ignore_eos": True}},
        ),
    ],
    ids=["openai", "oip"],
)
def test_a_client_that_goes_away_before_a_whole_answer_cancels_it(
    server: str, client: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    """Not streamed, nothing is sent until the answer is whole: a client gone before then had its
    answer generated on to its last token, for nobody, holding its place in the engine's batch."""
    payload = json.dumps(body)
    host, port = server.removeprefix("http://").split(":")
    before, logged = counter(server, TOKENS), server_log(server).stat().st_size
    with socket.create_connection((host, int(port)), timeout=LONG) as own:
        own.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n{payload}".encode()
        )
        deadline = time.monotonic() + LONG
        while not client.get("/engine/stats").json()["running"]:  # the answer is being generated
            assert time.monotonic() < deadline
            time.sleep(0.05)
    deadline = time.monotonic() + LONG
    while client.get("/engine/stats").json()["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert counter(server, TOKENS) - before < 450  # cancelled: far from the 500 tokens asked for
    with server_log(server).open("rb") as log:
        log.seek(logged)
        assert b"Traceback" not in log.read()


def test_a_client_gone_mid_body_is_no_server_error(server: str, client: httpx.Client) -> None:
    """What listens for a disconnect reads the body first: a client gone before its body ended had
    been logged as an unexpected error, with a traceback."""
    host, port = server.removeprefix("http://").split(":")
    logged = server_log(server).stat().st_size
    closed = {"endpoint": "/v1/chat/completions", "http_response_code": "499"}
    before = counter(server, "bentoml_service_request_total", **closed)
    with socket.create_connection((host, int(port)), timeout=LONG) as own:
        own.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            'Content-Length: 1000\r\n\r\n{"model": '.encode()
        )
    deadline = time.monotonic() + LONG
    while counter(server, "bentoml_service_request_total", **closed) == before:  # the server is done with it
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert ask(client, max_tokens=4)["choices"][0]["message"]["content"]  # served after it
    with server_log(server).open("rb") as log:
        log.seek(logged)
        assert b"Traceback" not in log.read()


def test_openai_client_chat_completions_streaming_and_models(server: str) -> None:
    api = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    answer = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=16, temperature=0
    )
    streamed = api.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == answer.choices[0].message.content
    completion = api.completions.create(model=MODEL, prompt="One, two, three,", max_tokens=4, temperature=0)
    assert completion.choices[0].text
    assert MODEL in [m.id for m in api.models.list().data]
    with pytest.raises(openai.BadRequestError):
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=17)


LONG_PROMPT = "word " * 9000  # over SmolLM2's 8192-token window

BAD = [
    pytest.param({"messages": []}, 400, "messages", id="empty-messages"),
    pytest.param({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages", id="unknown-role"),
    pytest.param({"messages": [{"role": "user", "content": 7}]}, 400, "messages", id="wrong-type"),
    pytest.param({"messages": "hi"}, 400, "messages", id="messages-not-a-list"),
    pytest.param({"max_tokens": 100_000}, 400, "max_tokens", id="max-tokens-over-cap"),
    pytest.param({"max_tokens": 0}, 400, "max_tokens", id="max-tokens-zero"),
    pytest.param({"temperature": 5}, 400, "temperature", id="temperature"),
    pytest.param({"n": 17}, 400, "n", id="n-over-sixteen"),
    pytest.param({"model": "gpt-9"}, 404, "model", id="unknown-model"),
    pytest.param({"messages": [{"role": "user", "content": LONG_PROMPT}]}, 400, "messages", id="over-window"),
    pytest.param({"logit_bias": {}}, 400, "logit_bias", id="unknown-field"),
    pytest.param(
        {"messages": [{"role": "user", "content": "word " * 4500}]}, 400, "messages", id="over-cache"
    ),
    pytest.param(
        {"messages": [{"role": "user", "content": "word " * 4500}], "max_tokens": None},
        400,
        "messages",
        id="over-cache-no-max-tokens",
    ),
    pytest.param({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", id="five-stop-strings"),
]


def batch_ids(client: httpx.Client) -> list[str]:
    return [batch["id"] for batch in client.get("/v1/batches", params={"limit": 100}).json()["data"]]


def test_a_lone_surrogate_in_a_name_is_a_400_and_nothing_is_stored(client: httpx.Client) -> None:
    """JSON can escape a lone surrogate ("\\ud800") that no text can hold: as a field's name, or as a key
    of a batch's metadata, which was stored and came back as other characters. Each is a 400, and no
    batch is made."""
    kind = {"content-type": "application/json"}
    body = json.dumps({**chat_body(max_tokens=2), "\ud800": 1})  # ensure_ascii: the escape, as sent
    assert client.post("/v1/chat/completions", content=body, headers=kind).status_code == 400
    upload = client.post("/v1/files", files={"file": ("in.jsonl", b"{}")}, data={"purpose": "batch"})
    batch = {
        "input_file_id": upload.json()["id"],
        "endpoint": "/v1/chat/completions",
        "metadata": {"\ud800": "x"},
    }
    before = batch_ids(client)
    refused = client.post("/v1/batches", content=json.dumps(batch), headers=kind)
    assert refused.status_code == 400 and "lone surrogate" in refused.json()["error"]["message"], refused.text
    assert batch_ids(client) == before
    assert client.delete(f"/v1/files/{upload.json()['id']}").json()["deleted"]
    assert ask(client, max_tokens=2)["choices"][0]["message"]["content"]


@pytest.mark.parametrize(("override", "status", "param"), BAD)
def test_bad_chat_requests_get_openai_errors(
    client: httpx.Client, override: dict[str, Any], status: int, param: str
) -> None:
    response = client.post("/v1/chat/completions", json={**chat_body(max_tokens=4), **override})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["param"] == param
    assert ask(client, max_tokens=2)["choices"][0]["message"]["content"]


def test_a_prompt_longer_than_the_window_can_span_is_refused_on_its_length(
    client: httpx.Client, server: str
) -> None:
    """400,000 characters: no token of SmolLM2's spans more than 81, so they cannot fit the 4,032-token
    window. Refused before the tokenizer reads them (a 16 MB body took it seconds), by every route
    that takes a prompt, with a message that says why; the next request is served."""
    import bentoml

    huge = "word " * 80_000
    messages = [{"role": "user", "content": huge}]
    asked = [
        ("/v1/chat/completions", {**chat_body(max_tokens=4), "messages": messages}),
        ("/v1/completions", {"model": MODEL, "prompt": huge, "max_tokens": 4}),
        ("/tokenize", {"model": MODEL, "prompt": huge}),
    ]
    for path, body in asked:
        response = client.post(path, json=body)
        assert response.status_code == 400, (path, response.text)
        assert "the prompt is 400000 characters" in response.json()["error"]["message"], path
    refused = pytest.raises(bentoml.exceptions.BentoMLException)
    with bentoml.SyncHTTPClient(server) as native, refused as raised:
        list(native.chat(messages=messages, max_tokens=4))
    assert "400000 characters" in str(raised.value)
    assert ask(client, max_tokens=2)["choices"][0]["message"]["content"]


def test_native_bentoml_streaming_chat(server: str) -> None:
    import bentoml

    with bentoml.SyncHTTPClient(server) as native:
        deltas = list(native.chat(messages=[{"role": "user", "content": QUESTION}], max_tokens=32))
    assert len(deltas) > 3
    assert "".join(deltas) == reference(QUESTION, 32)


def test_empty_prompt_is_refused_and_the_engine_keeps_serving(client: httpx.Client) -> None:
    response = client.post("/v1/completions", json={"model": MODEL, "prompt": "", "max_tokens": 4})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"
    assert ask(client, max_tokens=2)["choices"][0]["message"]["content"]
