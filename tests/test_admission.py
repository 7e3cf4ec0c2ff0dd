"""API keys, body-size limits and request tracing on a real server; the concurrency bound on the
middleware."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import suppress

import httpx
import openai
import pytest
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from services.admission import Admission
from services.config import Settings
from services.protocols.guard import HOLD_SECONDS, EarlyRetries, Guard
from tests.server import KEYS, LONG, MAX_BODY
from tests.test_batch import fnserve_cli

EMBEDDER = "all-minilm-l6-v2"


@pytest.fixture(scope="module")
def url(keyed_server: tuple[str, str]) -> str:
    return keyed_server[0]


def test_every_route_but_the_probes_needs_a_key(url: str) -> None:
    for path in ("/readyz", "/livez"):
        assert httpx.get(f"{url}{path}", timeout=LONG).status_code == 200
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
        assert (
            httpx.get(
                f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=LONG
            ).status_code
            == 200
        )


@pytest.mark.parametrize("keys", ["", ",", " , ", "pässwort", "two words"])
def test_a_key_setting_no_call_could_use_stops_the_server_at_start(keys: str) -> None:
    """Fails closed: no key at all had left every route open; a key no header carries as written had
    refused every call."""
    with pytest.raises(ValidationError, match="api_keys"):
        Settings(api_keys=keys)


def test_the_command_line_takes_its_key_from_the_environment(url: str) -> None:
    """So that it stays out of `ps` and the shell's history."""
    command = [*fnserve_cli(url), "status", "batch_none"]
    environment = {name: value for name, value in os.environ.items() if name != "FNSERVE_API_KEY"}
    runs = [
        subprocess.run(command, capture_output=True, text=True, timeout=LONG, env=env)
        for env in (environment, {**environment, "FNSERVE_API_KEY": KEYS[0]})
    ]
    assert [run.returncode != 0 for run in runs] == [True, True]  # no batch of that id either way
    assert runs[0].stderr.startswith("error 401:"), runs[0].stderr
    assert runs[1].stderr.startswith("error 404: no batch batch_none"), runs[1].stderr


def test_openai_client_with_a_key(url: str) -> None:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[1])
    assert len(client.embeddings.create(model=EMBEDDER, input="hello").data[0].embedding) == 384
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="nope").models.list()


def test_requests_are_traced_only_where_the_setting_asks(url: str, server: str) -> None:
    """BentoML records a span per request unless its URL is excluded; its native endpoints then name
    the span in a header. Off by default (services/config.py), on here with FNSERVE_TRACE_REQUESTS."""
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    traced = httpx.post(f"{url}/encode", json={"texts": ["x"]}, headers=auth, timeout=LONG)
    assert traced.status_code == 200 and len(traced.headers["x-bentoml-request-id"]) == 16
    untraced = httpx.post(f"{server}/encode", json={"texts": ["x"]}, timeout=LONG)
    assert untraced.status_code == 200 and "x-bentoml-request-id" not in untraced.headers


def test_oversized_bodies_get_413_and_the_next_request_is_served(url: str) -> None:
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    big = {"model": EMBEDDER, "input": ["word " * 1000] * 30}  # ~150 kB
    response = httpx.post(f"{url}/v1/embeddings", json=big, headers=headers, timeout=LONG)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: cut at the limit, so no longer valid JSON
        yield b'{"model": "all-minilm-l6-v2", "input": "'
        yield b"x" * (MAX_BODY + 10)
        yield b'"}'

    cut = httpx.post(
        f"{url}/v1/embeddings", content=chunked(), headers={**headers, "content-type": "application/json"}
    )
    assert cut.status_code == 400
    ok = httpx.post(
        f"{url}/v1/embeddings", json={"model": EMBEDDER, "input": "fine"}, headers=headers, timeout=LONG
    )
    assert ok.status_code == 200


def held_until(release: asyncio.Event) -> ASGIApp:
    """An app that answers 200 once `release` is set: requests that stay in flight until then."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


def test_requests_past_the_concurrency_bound_get_429_and_probes_still_answer() -> None:
    """The bound itself, on the middleware alone: a server would need hundreds of open requests."""
    release = asyncio.Event()
    slow_app = held_until(release)

    guard = Guard(
        slow_app, Admission([], max_concurrency=2, timeout_seconds=5), max_body_bytes=100, upload_bytes=100
    )

    # A file upload is read only once admitted: at the bound it is refused before it is parsed.
    form = {"content": b"--x\r\nnot a form", "headers": {"content-type": "multipart/form-data; boundary=x"}}

    async def scenario() -> tuple[list[httpx.Response], list[httpx.Response], httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=guard)
        async with httpx.AsyncClient(transport=transport, base_url="http://fnserve") as client:
            busy = [asyncio.create_task(client.get("/v1/models")) for _ in range(2)]
            await asyncio.sleep(0.1)
            refused = [await client.get("/v1/models"), await client.post("/classify", **form)]
            probe = asyncio.create_task(client.get("/readyz"))
            await asyncio.sleep(0.1)
            release.set()
            return await asyncio.gather(*busy), refused, await probe, await client.post("/classify", **form)

    served, refused, probe, malformed = asyncio.run(scenario())
    assert [r.status_code for r in served] == [200, 200] and probe.status_code == 200
    for response in refused:
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "concurrency"
    assert (
        malformed.status_code == 400 and "multipart body is malformed" in malformed.json()["error"]["message"]
    )


def test_a_connection_asking_again_before_its_retry_after_gets_its_next_429_when_it_passes() -> None:
    now = [100.0]
    early = EarlyRetries(max_held=1, clock=lambda: now[0])
    a, b = ("127.0.0.1", 40001), ("127.0.0.1", 40002)
    assert early.hold(a, 1) == 0  # a first refusal: at once
    now[0] += 0.25
    assert early.hold(a, 1) == 0.75  # asked again early: answered when the Retry-After has passed
    assert early.hold(b, 1) == 0  # another connection is answered at once
    now[0] += 0.75 + 1
    assert early.hold(a, 30) == 0  # waited as told
    assert early.hold(a, 30) == HOLD_SECONDS  # asked again at once: held, but never past the cap
    early.holding = 1
    assert early.hold(b, 1) == 0  # as many held as may be: at once


def test_a_held_429_keeps_no_place_in_flight_and_past_the_most_held_429s_go_at_once() -> None:
    release = asyncio.Event()
    busy_app = held_until(release)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != "/refuse":
            return await busy_app(scope, receive, send)
        # A function's refusal for time, with a long Retry-After: a repeat is held for a minute.
        headers = [(b"retry-after", b"60"), (b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": b'{"error": {"code": "queue_full"}}'})

    admission = Admission([], max_concurrency=2, timeout_seconds=5)
    early = EarlyRetries(max_held=1, longest=60)
    guard = Guard(app, admission, max_body_bytes=100, upload_bytes=100, early_retries=early)

    def client(port: int) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=guard, client=("127.0.0.1", port))
        return httpx.AsyncClient(transport=transport, base_url="http://fnserve")

    async def until(condition: Callable[[], bool]) -> None:
        while not condition():
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        async with client(40001) as a, client(40002) as retrier, client(40003) as other, client(40004) as b:
            busy = asyncio.create_task(a.get("/busy"))
            await until(lambda: admission.in_flight == 1)
            first = await retrier.get("/refuse")
            assert first.status_code == 429 and first.headers["retry-after"] == "60"
            again = asyncio.create_task(retrier.get("/refuse"))
            await until(lambda: early.holding == 1)
            assert admission.in_flight == 1  # the held refusal left admission
            for _ in range(2):  # a first refusal, then a repeat at once, as one is held already
                assert (await other.get("/refuse")).headers["retry-after"] == "60"
            assert not again.done()  # still held
            second = asyncio.create_task(b.get("/busy"))
            await until(lambda: admission.in_flight == 2)  # so another request takes the place
            release.set()
            assert [r.status_code for r in await asyncio.gather(busy, second)] == [200, 200]
            again.cancel()
            with suppress(asyncio.CancelledError):
                await again
            assert early.holding == 0

    asyncio.run(asyncio.wait_for(scenario(), LONG))
