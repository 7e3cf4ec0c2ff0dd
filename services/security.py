"""API keys and request-size limits, as ASGI middleware on the entry service: it sees every route, the
OpenAI ones, BentoML's native endpoints and its UI alike."""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.protocol import error_body

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz"})  # probes answer without a key


class Guard:
    def __init__(self, app: ASGIApp, keys: list[str], max_body_bytes: int, upload_bytes: int) -> None:
        self.app = app
        self._keys = [key.encode() for key in keys]
        self._max_body_bytes, self._upload_bytes = max_body_bytes, upload_bytes

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
        await self.app(scope, capped(receive, limit), send)

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


async def reject(send: Send, status: int, message: str, code: str) -> None:
    body = error_body(status, message, code=code)
    headers = [(b"content-type", b"application/json")]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
