"""Routing shared by the protocols that answer over HTTP (OpenAI, OIP REST): the 405 of a method a path
does not take, and routes whose work stops when their client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match

from services.admission import rejected

CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, but logs and traces do


def wrong_method(routes: Iterable[BaseRoute], request: Request) -> tuple[str, str] | None:
    """For a request whose path these routes take by other methods only: the 405's message and its
    `Allow` header (the refusal counted); None otherwise. A protocol's catch-all route (its own 404
    shape) matches every path and method fully, so Starlette's router sends a wrong method there, not
    to its 405: the catch-all asks this, and answers in its protocol's shape."""
    allowed = sorted(
        method
        for route in routes
        if isinstance(route, APIRoute) and route.matches(request.scope)[0] == Match.PARTIAL
        for method in route.methods
    )
    if not allowed:
        return None
    rejected("invalid")
    methods = ", ".join(allowed)
    return f"{request.method} is not allowed on {request.url.path} (allowed: {methods})", methods


class CancelledOnDisconnect(APIRoute):
    """A route whose handler is cancelled when its client disconnects before the answer: a whole (not
    streamed) chat answer had generated on to its last token for nobody, holding its place in the
    engine's batch and in the concurrency bound, and a client's retry doubled the work. Streams
    already end so (Starlette listens while it sends them). The same as vLLM's `with_cancellation`,
    here for every route of a router. The body is read first (Starlette keeps it for the handler):
    what listens for the disconnect takes the request's messages, so it must not take the body's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def handle_while_connected(request: Request) -> Response:
            try:
                await request.body()
            except ClientDisconnect:  # gone mid-body: FastAPI's own read had answered it quietly too
                return Response(status_code=CLIENT_CLOSED)
            handling = asyncio.ensure_future(handle(request))
            gone = asyncio.ensure_future(disconnected(request))
            try:
                await asyncio.wait((handling, gone), return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
                if not handling.done():  # the client went (or this request was cancelled): so does its work
                    handling.cancel()
                    await asyncio.gather(handling, return_exceptions=True)  # its clean-up ends first
            return Response(status_code=CLIENT_CLOSED) if handling.cancelled() else handling.result()

        return handle_while_connected


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (once the body is read, the only message left to receive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
