"""API keys and body-size limits on a real server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.server import serve

KEYS = ("first-key", "second-key")
MAX_BODY = 100_000
EMBEDDER = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    env = {"FNSERVE_API_KEYS": ",".join(KEYS), "FNSERVE_MAX_BODY_BYTES": str(MAX_BODY)}
    with serve(env=env) as base:
        yield base


def test_every_route_but_the_probes_needs_a_key(url: str) -> None:
    for path in ("/readyz", "/livez"):
        assert httpx.get(f"{url}{path}").status_code == 200
    for method, path in (
        ("GET", "/v1/models"),
        ("POST", "/encode"),
        ("GET", "/metrics"),
        ("GET", "/models/status"),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Basic {KEYS[0]}"}):
            response = httpx.request(method, f"{url}{path}", headers=headers, json={"texts": ["x"]})
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
    for key in KEYS:
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_openai_client_with_a_key(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[1])
    assert len(client.embeddings.create(model=EMBEDDER, input="hello").data[0].embedding) == 384
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope").models.list()


def test_oversized_bodies_get_413_and_the_next_request_is_served(url: str) -> None:
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    big = {"model": EMBEDDER, "input": ["word " * 1000] * 30}  # ~150 kB
    response = httpx.post(f"{url}/v1/embeddings", json=big, headers=headers)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: cut at the limit, so no longer valid JSON
        yield b'{"model": "all-minilm-l6-v2", "input": "'
        yield b"x" * (MAX_BODY + 10)
        yield b'"}'

    cut = httpx.post(
        f"{url}/v1/embeddings", content=chunked(), headers={**headers, "content-type": "application/json"}
    )
    assert cut.status_code == 400
    ok = httpx.post(f"{url}/v1/embeddings", json={"model": EMBEDDER, "input": "fine"}, headers=headers)
    assert ok.status_code == 200
