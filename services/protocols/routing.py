"""Routing shared by the protocols that answer over HTTP (OpenAI, OIP REST): the methods a path takes,
for their 405s, and routes whose work stops when their client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, but logs and traces do


def other_methods(routes: Iterable[BaseRoute], scope: Scope) -> list[str]:
    """The methods of the routes that match this request's path but not its method, sorted. A protocol's
    catch-all route (its own 404 shape) matches every path and method fully, so Starlette's router
    sends a wrong method there, not to its 405: the catch-all asks this."""
    return sorted(
        method
        for route in routes
        if isinstance(route, APIRoute) and route.matches(scope)[0] == Match.PARTIAL
        for method in route.methods
    )


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
