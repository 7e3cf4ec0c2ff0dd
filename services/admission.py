"""Admission, as ASGI middleware on the entry service: API keys, request-size limits, the concurrency
bound and each request's deadline. It sees every route, the OpenAI ones, BentoML's native endpoints and
its UI alike, and answers what it refuses in the OpenAI error shape."""

from __future__ import annotations

import hmac
import math
import time
from contextvars import ContextVar

import bentoml
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.protocol import error_body

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz"})  # probes answer without a key
UNBOUNDED_PATHS = OPEN_PATHS | {"/metrics"}  # and, with the scrape, are never refused for load
TIMEOUT_HEADER = b"x-fnserve-timeout"  # seconds; lowers the request's deadline, never raises it
# Absolute time.monotonic() by which the current request must be answered; None outside a request
# (batch lines run without one).
DEADLINE: ContextVar[float | None] = ContextVar("deadline", default=None)

DEADLINE_PASSED = "the request's deadline passed (x-fnserve-timeout or FNSERVE_REQUEST_TIMEOUT_SECONDS)"

REJECTIONS = bentoml.metrics.Counter(
    name="fnserve_rejections",
    documentation="Requests refused or cut short, by reason (queue_full, loading, deadline, "
    "concurrency, overloaded, unauthorized, too_large, invalid)",
    labelnames=["reason"],
)


def rejected(reason: str) -> None:
    REJECTIONS.labels(reason=reason).inc()


def seconds_left(deadline: float | None) -> float | None:
    """Seconds left before `deadline` (time.monotonic()), or None without one."""
    return None if deadline is None else deadline - time.monotonic()


def remaining() -> float | None:
    """Seconds left before the current request's deadline."""
    return seconds_left(DEADLINE.get())


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        keys: list[str],
        max_body_bytes: int,
        upload_bytes: int,
        max_concurrency: int,
        timeout_seconds: float,
    ) -> None:
        """`max_concurrency` is this worker's share of requests in flight; BentoML's own bound sits
        above it as a backstop, since its 429 is not in the OpenAI shape and has no Retry-After."""
        self.app = app
        self._keys = [key.encode() for key in keys]
        self._max_body_bytes, self._upload_bytes = max_body_bytes, upload_bytes
        self._max_concurrency, self._in_flight = max_concurrency, 0
        self._timeout = timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self._keys and path not in OPEN_PATHS and not self._authorized(scope):
            return await reject(
                send, 401, "invalid or missing API key (Authorization: Bearer <key>)", "invalid_api_key"
            )
        limit = self._upload_bytes if path == "/v1/files" else self._max_body_bytes
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await reject(send, 413, f"the request body is over {limit} bytes", "request_too_large")
        kind = (header(scope, b"content-type") or "").lower()
        if kind.startswith("multipart/") and "boundary=" not in kind:  # BentoML's parser answers 500
            return await reject(send, 400, "a multipart body needs a boundary in its Content-Type")
        if path in UNBOUNDED_PATHS:
            return await self.app(scope, capped(receive, limit), send)
        asked = header(scope, TIMEOUT_HEADER)
        timeout = self._timeout
        if asked is not None:
            try:
                timeout = min(float(asked), timeout)
            except ValueError:
                timeout = math.nan
            if not timeout > 0:  # NaN included
                return await reject(
                    send, 400, f"x-fnserve-timeout must be a number of seconds above 0, not {asked!r}"
                )
        if self._in_flight >= self._max_concurrency:
            return await reject(
                send, 429, f"this server is at its limit of {self._max_concurrency} requests", "concurrency"
            )
        self._in_flight += 1
        DEADLINE.set(time.monotonic() + timeout)
        try:
            await self.app(scope, capped(receive, limit), send)
        finally:
            self._in_flight -= 1

    def _authorized(self, scope: Scope) -> bool:
        given = header(scope, b"authorization") or ""
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Every key is compared, in constant time, so timing tells nothing about which one nearly matched.
        matches = [hmac.compare_digest(token.strip().encode(), key) for key in self._keys]
        return any(matches)


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
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


REASONS = {401: "unauthorized", 413: "too_large", 400: "invalid", 429: "concurrency"}


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """The OpenAI error shape, for the middleware and the routes alike; refusals for load (429, 503)
    say when to try again."""
    retry = {"Retry-After": "1"} if status in (429, 503) else {}
    body = error_body(status, message, param, code)
    return JSONResponse(body, status_code=status, headers={**retry, **(headers or {})})


async def reject(send: Send, status: int, message: str, code: str | None = None) -> None:
    rejected(REASONS[status])
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    response = error_response(status, message, code=code, headers=headers)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
