"""Admission for the HTTP port, as ASGI middleware on the entry service: it sees every route (OpenAI,
Open Inference Protocol, BentoML's native endpoints and UI) and answers what it refuses in the error shape
of the protocol the path belongs to."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import bentoml
from cachetools import TTLCache
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.admission import DEADLINE, Admission, rejected
from services.protocols.oip.rest import PREFIX as OIP_PREFIX
from services.protocols.oip.rest import error_response as oip_error
from services.protocols.openai.protocol import error_response as openai_error

# Probes: no key, never refused for load. /health is vLLM's, which benchmark tools check first.
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/health", "/v2/health/live", "/v2/health/ready"})
UNBOUNDED_PATHS = OPEN_PATHS | {"/metrics"}  # with the scrape, never refused for load
# BentoML's own endpoints that take files. BentoML 1.4.40 answers a malformed form on them with 500
# (starlette's 400 is caught by its generic handler), so the guard parses it first with the same parser.
NATIVE_FORMS = frozenset({"/classify"})
TIMEOUT_HEADER = b"x-fnserve-timeout"  # seconds; lowers the request's deadline, never raises it
REASONS = {401: "unauthorized", 413: "too_large", 400: "invalid", 429: "concurrency"}
HOLD_SECONDS = 1.0  # the most a repeated refusal is held: one refusal a second for a connection at most

HELD = bentoml.metrics.Counter(
    name="fnserve_refusals_held",
    documentation="429 answers held back because their connection asked again before the Retry-After "
    "of its previous 429 had passed",
)


class EarlyRetries:
    """When each connection may next be refused at once: the Retry-After its last 429 gave.

    Why: load generators and naive retry loops ask again the moment they are refused, and each refusal
    costs the worker's event loop a request's parsing, beside the model's thread on the same cores. At
    256 connections on a 2-core EPYC (Zen 5, 2026-12-04) the entry workers refused about 1,600 long
    inputs a second and served 108, against 162 at 16 connections (README, Benchmark). A 429 that
    repeats an early retry is answered when the Retry-After has passed (at most `longest` later),
    so such a connection costs one refusal a second, while a client that waits as told is answered at
    once. Measured there, 256 long-input connections: 152 answers/s with 331 refusals held, against 65
    with 42,255 refusals at once. Keyed by connection (the peer's address and port): one HTTP/1.1
    request at a time."""

    def __init__(
        self, max_held: int, longest: float = HOLD_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """`max_held` 429s at most are held at once: BentoML's own concurrency bound, outside this
        middleware, counts a held one, and past it BentoML answers a plain 429 at once."""
        self.max_held, self.holding, self._longest, self._clock = max_held, 0, longest, clock
        self._next: TTLCache[tuple[str, int], float] = TTLCache(maxsize=65536, ttl=60, timer=clock)

    def hold(self, peer: tuple[str, int], retry_after: float) -> float:
        """Seconds to hold this 429 to `peer` (0 if its last one's Retry-After has passed, or as many
        are held as may be), remembering the Retry-After it gives."""
        now = self._clock()
        held = min(max(0.0, self._next.get(peer, now) - now), self._longest)
        if self.holding >= self.max_held:
            held = 0.0
        self._next[peer] = now + held + retry_after
        return held


class PacedSend:
    """One request's ASGI `send`, holding back a 429 that repeats an early retry until `flush`, after
    the request has left admission: a held refusal keeps no place among the requests in flight."""

    def __init__(self, send: Send, peer: tuple[str, int], early: EarlyRetries) -> None:
        self._send, self._peer, self._early = send, peer, early
        self._held: list[Message] = []
        self._seconds = 0.0

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 429:
            self._seconds = self._early.hold(self._peer, retry_after(message))
        if self._seconds:
            self._held.append(message)
        else:
            await self._send(message)

    async def flush(self, at_once: bool = False) -> None:
        """Sends what was held: after the hold, or `at_once` (the request failed after its 429)."""
        if not self._held:
            return
        if not at_once:
            HELD.inc()
            self._early.holding += 1
            try:
                await asyncio.sleep(self._seconds)
            finally:
                self._early.holding -= 1
        for message in self._held:
            await self._send(message)


def retry_after(start: Message) -> float:
    """The Retry-After of a response's start message, in seconds (1 where it has none)."""
    value = header(start, b"retry-after")
    return float(value) if value and value.isdigit() else 1.0


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        admission: Admission,
        max_body_bytes: int,
        upload_bytes: int,
        early_retries: EarlyRetries | None = None,
    ) -> None:
        """BentoML's own concurrency bound sits above the admission's as a backstop, since its 429 is in
        no protocol's shape and has no Retry-After. `early_retries`: None answers every 429 at once."""
        self.app = app
        self.admission = admission
        self._max_body_bytes, self._upload_bytes = max_body_bytes, upload_bytes
        self._early = early_retries

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = scope.get("client")
        # Port 0: uvicorn took the address from a proxy's X-Forwarded-For, which names no connection.
        if self._early is None or not client or not client[1]:
            return await self._guarded(scope, receive, send)
        paced = PacedSend(send, (client[0], client[1]), self._early)
        try:
            await self._guarded(scope, receive, paced)
        except Exception:
            await paced.flush(at_once=True)
            raise
        await paced.flush()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        shape = oip_error if path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/") else openai_error
        refuse = RefusalSender(send, shape)
        if path not in OPEN_PATHS and not self.admission.authorized(header(scope, b"authorization")):
            return await refuse(
                401, "invalid or missing API key (Authorization: Bearer <key>)", "invalid_api_key"
            )
        limit = self._upload_bytes if path == "/v1/files" else self._max_body_bytes
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await refuse(413, f"the request body is over {limit} bytes", "request_too_large")
        kind = (header(scope, b"content-type") or "").lower()
        if kind.startswith("multipart/") and "boundary=" not in kind:  # BentoML's parser answers 500
            return await refuse(400, "a multipart body needs a boundary in its Content-Type")
        if path in UNBOUNDED_PATHS:
            return await self.app(scope, capped(receive, limit), send)
        asked = header(scope, TIMEOUT_HEADER)
        seconds = None
        if asked is not None:
            try:
                seconds = float(asked)
            except ValueError:
                seconds = math.nan
            if not seconds > 0:  # NaN included
                return await refuse(
                    400, f"x-fnserve-timeout must be a number of seconds above 0, not {asked!r}"
                )
        if not self.admission.enter():
            return await refuse(429, self.admission.busy_message, "concurrency", counted=True)
        DEADLINE.set(self.admission.deadline(seconds))
        try:
            receive = capped(receive, limit)
            if path in NATIVE_FORMS and kind.startswith("multipart/"):  # read once admitted, not before
                body = await whole_body(receive)
                if (problem := await form_problem(scope, body)) is not None:
                    return await refuse(400, problem)
                receive = replayed(body, receive)
            await self.app(scope, receive, send)
        finally:
            self.admission.leave()


class RefusalSender:
    def __init__(self, send: Send, shape: Callable[..., JSONResponse]) -> None:
        self._send, self._shape = send, shape

    async def __call__(
        self, status: int, message: str, code: str | None = None, counted: bool = False
    ) -> None:
        if not counted:
            rejected(REASONS[status])
        headers: dict[str, Any] = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
        response = self._shape(status, message, code=code, headers=headers)
        await self._send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
        await self._send({"type": "http.response.body", "body": response.body})


def header(scope: Scope | Message, name: bytes) -> str | None:
    """A header of a request's scope or a response's start message (where headers are optional)."""
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def capped(receive: Receive, limit: int) -> Receive:
    """A body sent without a length is cut at the limit; the route then answers it as malformed."""
    seen = 0

    async def receive_capped() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            body = message.get("body", b"")
            if seen + len(body) > limit:
                message = {**message, "body": body[: max(limit - seen, 0)], "more_body": False}
            seen += len(body)
        return message

    return receive_capped


async def whole_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body"):
            return b"".join(chunks)


async def form_problem(scope: Scope, body: bytes) -> str | None:
    """What starlette's multipart parser (the one BentoML reads forms with) finds wrong in `body`."""
    from starlette.datastructures import Headers
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def stream() -> AsyncIterator[bytes]:
        yield body

    try:
        form = await MultiPartParser(Headers(scope=scope), stream()).parse()
    except MultiPartException as exc:
        return f"the multipart body is malformed: {exc.message}"
    await form.close()
    return None


def replayed(body: bytes, receive: Receive) -> Receive:
    """The body already read, then the connection's own messages (its disconnect)."""
    sent = False

    async def receive_replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive_replayed
