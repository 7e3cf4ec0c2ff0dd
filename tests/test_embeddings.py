"""The embedding function end to end: real model, real `bentoml serve`, real HTTP."""

from __future__ import annotations

import base64
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.server import KEYS, counter, histogram, http_client

MODEL = "all-minilm-l6-v2"
WINDOW = 256  # the model's window in tokens (FNSERVE_EMBEDDING_MAX_TOKENS)


def post_json(client: httpx.Client, path: str, body: object) -> httpx.Response:
    """JSON as a client in another language may send it: ASCII with escapes, lone surrogates included."""
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def embed(client: httpx.Client, texts: str | list[str], **extra: object) -> np.ndarray:
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": texts, **extra})
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def test_similar_sentences_score_higher_than_unrelated(client: httpx.Client) -> None:
    cat, kitten, tax = embed(
        client,
        [
            "A cat sits on the mat.",
            "A kitten is sitting on a rug.",
            "Quarterly tax filings are due in April.",
        ],
    )
    assert cat @ kitten > 0.5
    assert cat @ kitten > cat @ tax + 0.3


def test_response_has_openai_shape_unit_vectors_and_usage(client: httpx.Client) -> None:
    body = client.post("/v1/embeddings", json={"model": MODEL, "input": ["hello world", "hi"]}).json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert all(item["object"] == "embedding" for item in body["data"])
    vectors = np.array([item["embedding"] for item in body["data"]])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    # [CLS] hello world [SEP] and [CLS] hi [SEP]
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}


def test_single_string_input(client: httpx.Client) -> None:
    assert embed(client, "just one").shape == (1, 384)


def test_same_input_gives_same_vector(client: httpx.Client) -> None:
    first = embed(client, "reproducible results matter")
    second = embed(client, "reproducible results matter")
    np.testing.assert_array_equal(first, second)


def test_repeated_inputs_come_from_the_cache(client: httpx.Client) -> None:
    def post(inputs: list[str]) -> httpx.Response:
        response = client.post("/v1/embeddings", json={"model": MODEL, "input": inputs})
        assert response.status_code == 200
        return response

    def lookups(result: str) -> float:
        lines = client.get("/metrics").text.splitlines()
        prefix = f'fnserve_cache_lookups_total{{function="embedding",result="{result}"'
        return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))

    text = f"cache me {time.time_ns()}"
    hits_before = lookups("hit")
    first = post([text])
    assert first.headers["x-fnserve-cache"] == "miss"
    # Each worker has its own cache: repeat until the worker that saw it answers.
    repeats = [post([text]) for _ in range(8)]
    hit = next(r for r in repeats if r.headers["x-fnserve-cache"] == "hit")
    assert hit.json()["data"] == first.json()["data"] and hit.json()["usage"] == first.json()["usage"]
    assert lookups("hit") > hits_before
    mixed = [post([text, f"new {time.time_ns()}"]).headers["x-fnserve-cache"] for _ in range(8)]
    assert "partial" in mixed


def test_with_the_cache_off_nothing_is_looked_up_or_said_to_miss(keyed_server: tuple[str, str]) -> None:
    """The keyed server keeps no response cache: its answers carry no x-fnserve-cache, and its metrics
    count no lookups (a hit rate of 0 would read as a cache that never hits)."""
    url, _ = keyed_server
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    with http_client(url, headers=auth) as c:
        body = {"model": MODEL, "input": ["no cache", "here"]}
        answers = [c.post("/v1/embeddings", json=body) for _ in "ab"]
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json()["data"] == answers[1].json()["data"]
        assert not any("x-fnserve-cache" in a.headers for a in answers)
        assert counter(url, "fnserve_cache_lookups_total", headers=auth, function="embedding") == 0


def test_base64_encoding_matches_floats(client: httpx.Client) -> None:
    floats = embed(client, "encode me")
    response = client.post(
        "/v1/embeddings", json={"model": MODEL, "input": "encode me", "encoding_format": "base64"}
    )
    decoded = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(decoded, floats[0])


def test_openai_client_round_trips(server: str) -> None:
    api = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    texts = ["The weather is lovely today.", "It is sunny and warm outside."]
    result = api.embeddings.create(model=MODEL, input=texts)  # the client asks for base64 by default
    as_floats = api.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in result.data] == [0, 1]
    assert result.usage.prompt_tokens > 0
    np.testing.assert_allclose(
        [d.embedding for d in result.data], [d.embedding for d in as_floats.data], atol=1e-6
    )
    assert MODEL in [m.id for m in api.models.list().data]
    with pytest.raises(openai.NotFoundError) as err:
        api.embeddings.create(model="no-such-model", input="x")
    assert err.value.body["code"] == "model_not_found"


def test_native_bentoml_endpoint_agrees_with_openai_route(client: httpx.Client) -> None:
    texts = ["for BentoML clients, in their own shape", "native endpoint"]  # longest first: passes sort
    native = client.post("/encode", json={"texts": texts})
    assert native.status_code == 200, native.text
    np.testing.assert_allclose(np.array(native.json()), embed(client, texts), atol=2e-3)


def test_native_endpoint_rejects_bad_input(client: httpx.Client) -> None:
    for body in ({"texts": []}, {"texts": [""]}, {"texts": "not a list"}, {}, {"texts": ["\ud800"]}):
        response = post_json(client, "/encode", body)
        assert response.status_code == 400, (body, response.text)
        assert "error" in response.json()


def test_concurrent_requests_are_batched_and_correct(client: httpx.Client) -> None:
    texts = [f"sentence number {i} about serving models" for i in range(96)]
    # Each alone through the native endpoint, which has no response cache: the OpenAI route would
    # answer the concurrent repeats from its cache.
    alone = {text: np.array(client.post("/encode", json={"texts": [text]}).json()[0]) for text in texts[:4]}
    with ThreadPoolExecutor(max_workers=32) as pool:
        vectors = list(pool.map(lambda text: embed(client, text)[0], texts))
    for text, vector in zip(texts[:4], vectors, strict=False):
        # bf16 kernels may block differently for another batch shape: equal up to rounding.
        assert float(vector @ alone[text]) > 0.999
    assert mean_batch_size(client, "fnserve_embedding_batch_size") > 1.5


def mean_batch_size(client: httpx.Client, name: str) -> float:
    return histogram(client.get("/metrics").text, name)[1]


def test_native_endpoint_batches_concurrent_calls(client: httpx.Client) -> None:
    def call(i: int) -> int:
        return client.post("/encode", json={"texts": [f"native call {i}"]}).status_code

    with ThreadPoolExecutor(max_workers=32) as pool:
        assert set(pool.map(call, range(200))) == {200}
    assert mean_batch_size(client, "bentoml_service_adaptive_batch_size") > 1.5


BAD_REQUESTS = [
    pytest.param({"input": "no model"}, 400, "model", id="missing-model"),
    pytest.param({"model": MODEL}, 400, "input", id="missing-input"),
    pytest.param({"model": MODEL, "input": 42}, 400, "input", id="wrong-type"),
    pytest.param({"model": MODEL, "input": []}, 400, "input", id="empty-list"),
    pytest.param({"model": MODEL, "input": ["ok", ""]}, 400, "input", id="empty-string"),
    pytest.param({"model": MODEL, "input": [[1, 2, 3]]}, 400, "input", id="token-arrays"),
    pytest.param({"model": MODEL, "input": ["x"] * 513}, 400, "input", id="too-many-inputs"),
    pytest.param({"model": MODEL, "input": "a" * 8193}, 400, "input", id="input-too-long"),
    pytest.param({"model": "gpt-9", "input": "x"}, 404, "model", id="unknown-model"),
    pytest.param({"model": MODEL, "input": "x", "dimensions": 128}, 400, "dimensions", id="dimensions"),
    pytest.param(
        {"model": MODEL, "input": "x", "encoding_format": "int8"}, 400, "encoding_format", id="format"
    ),
    pytest.param({"model": MODEL, "input": "x", "temperature": 1}, 400, "temperature", id="unknown-field"),
    pytest.param([1, 2], 400, None, id="not-an-object"),
    pytest.param({"model": MODEL, "input": ["ok", "\ud800"]}, 400, "input", id="lone-surrogate"),
    pytest.param({"model": "\ud800", "input": "x"}, 400, "model", id="surrogate-model"),
    pytest.param({"model": MODEL, "input": [None, "x"]}, 400, "input", id="null-item"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(
    client: httpx.Client, body: object, status: int, param: str | None
) -> None:
    response = post_json(client, "/v1/embeddings", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert embed(client, "still serving").shape == (1, 384)


@pytest.mark.parametrize(
    ("method", "path", "content", "status"),
    [
        ("POST", "/v1/embeddings", b'{"model": "all-minilm', 400),
        ("POST", "/v1/embeddings", b"input=hello", 400),
        ("GET", "/v1/embeddings", b"", 405),
        ("PUT", "/v1/files", b"", 405),
        ("GET", "/v1/batches/batch_x/cancel", b"", 405),
        ("GET", "/v1/images/classifications", b"", 405),
        ("POST", "/v1/nothing-here", b"{}", 404),
    ],
    ids=[
        "malformed-json",
        "not-json",
        "wrong-method",
        "wrong-method-files",
        "wrong-method-templated",
        "wrong-method-images",
        "unknown-route",
    ],
)
def test_malformed_http_gets_json_4xx(
    client: httpx.Client, method: str, path: str, content: bytes, status: int
) -> None:
    response = client.request(method, path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]
    if status == 405:  # RFC 9110: a 405 lists the methods the path takes
        assert method not in response.headers["allow"] and response.headers["allow"], response.headers


def test_health_and_metrics_endpoints(client: httpx.Client) -> None:
    assert client.get("/readyz").status_code == 200
    assert client.get("/livez").status_code == 200
    assert "bentoml_service_request_total" in client.get("/metrics").text


def test_openapi_documents_the_routes(client: httpx.Client) -> None:
    spec = client.get("/docs.json").json()
    assert "/v1/embeddings" in spec["paths"] and "/encode" in spec["paths"]


def test_reject_policy_refuses_inputs_over_the_window(capped_server: tuple[str, str]) -> None:
    with http_client(capped_server[0]) as c:
        long_text = "word " * 400
        response = c.post("/v1/embeddings", json={"model": MODEL, "input": ["short", long_text]})
        assert response.status_code == 400
        assert "input[1]" in response.json()["error"]["message"]
        assert embed(c, "short").shape == (1, 384)
        # vLLM's truncate_prompt_tokens=-1, as its benchmark sends it, asks for the cut instead.
        cut = {"model": MODEL, "input": long_text, "truncate_prompt_tokens": -1}
        response = c.post("/v1/embeddings", json=cut)
        assert response.status_code == 200 and response.json()["usage"]["prompt_tokens"] == 256
        response = c.post("/v1/embeddings", json={**cut, "truncate_prompt_tokens": 10})
        assert response.status_code == 400 and response.json()["error"]["param"] == "truncate_prompt_tokens"


def test_truncate_policy_embeds_inputs_over_the_window(client: httpx.Client) -> None:
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": "word " * 400})
    assert response.status_code == 200
    assert response.json()["usage"]["prompt_tokens"] == 256


@pytest.mark.parametrize("route", ["/v1/embeddings", "/encode"])
def test_long_texts_fill_a_pass_with_fewer_within_its_token_budget(client: httpx.Client, route: str) -> None:
    """Passes are bounded in padded tokens as well as texts: a request of texts at the window's full
    length runs in passes of as many as the budget holds, never one pass of the whole batch size. The
    native `/encode` too, though BentoML's batching before it counts texts only."""
    made = client.get("/models/status").json()[MODEL]["choices"]
    budget, size = int(made["max_batch_tokens"]["value"]), int(made["max_batch_size"]["value"])
    per_pass = max(1, min(size, budget // WINDOW))
    texts = [f"{uuid.uuid4()} " + "word " * 400 for _ in range(2 * per_pass + 1)]  # unique: computed
    url = str(client.base_url)

    def passes() -> tuple[float, ...]:
        return tuple(counter(url, f"fnserve_embedding_batch_tokens_{part}") for part in ("count", "sum"))

    before = passes()
    if route == "/encode":
        response = client.post(route, json={"texts": texts})
        assert response.status_code == 200, response.text
        vectors = np.array(response.json())
        assert vectors.shape == (len(texts), 384)
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3)
    else:
        response = client.post(route, json={"model": MODEL, "input": texts})
        assert response.status_code == 200
        assert response.json()["usage"]["prompt_tokens"] == WINDOW * len(texts)
    after = passes()
    assert after[0] - before[0] == 3  # two full passes and the one text left
    assert after[1] - before[1] == WINDOW * len(texts)  # all at the window's length: no padding


def test_the_text_encoders_are_set_once_and_only_read_after() -> None:
    """What EmbeddingFunction relies on to tokenize in several threads at once: each encoder is a copy
    of the tokenizers-library encoder under transformers' tokenizer, with its own settings, which
    encoding and padding never write (transformers' own call rewrites them whenever a call's differ).
    A padded pass gives each text the vector it has alone."""
    import bentoml
    from transformers import AutoModel, AutoTokenizer

    from models.catalog import CATALOG
    from services.functions.embedding import TextEncoder

    def settings() -> list[tuple[object, object]]:
        return [(each._encoder.truncation, each._encoder.padding) for each in (window, counting)]

    path = bentoml.models.get(CATALOG[MODEL].tag).path
    tokenizer = AutoTokenizer.from_pretrained(path)
    window, counting = TextEncoder(tokenizer, WINDOW), TextEncoder(tokenizer, None)
    before = settings()
    assert before[0][0]["max_length"] == WINDOW and before[0][1] is None and before[1] == (None, None)
    texts = ["a short call", "word " * 400]
    tokenizer(texts, padding=True, truncation=False)  # transformers' tokenizer rewritten, not ours
    ids = window.tokenize(texts)
    assert [len(each) for each in ids] == [5, WINDOW] and len(counting.tokenize(texts)[1]) == 402
    assert ids == tokenizer(texts, truncation=True, max_length=WINDOW)["input_ids"]  # the same ids
    model = AutoModel.from_pretrained(path).eval()
    together, counts = window.embed(model, ids, "cpu")
    alone = [window.embed(model, [each], "cpu")[0][0] for each in ids]
    assert counts == [5, WINDOW]
    np.testing.assert_allclose(together, alone, atol=1e-5)  # the padding is masked out
    assert settings() == before
