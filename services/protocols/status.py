"""The HTTP status of each kind of refusal, one table for every protocol that answers over HTTP (OpenAI,
OIP REST, BentoML's native endpoints); each adds its own error shape. And the methods a path takes, for
their 405s."""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

from fastapi.routing import APIRoute
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from services.functions.types import RefusalKind

HTTP_STATUS: dict[RefusalKind, HTTPStatus] = {
    "invalid": HTTPStatus.BAD_REQUEST,
    "not_found": HTTPStatus.NOT_FOUND,
    "queue_full": HTTPStatus.TOO_MANY_REQUESTS,
    "loading": HTTPStatus.SERVICE_UNAVAILABLE,
    "overloaded": HTTPStatus.SERVICE_UNAVAILABLE,
    "deadline": HTTPStatus.GATEWAY_TIMEOUT,
    "failed": HTTPStatus.INTERNAL_SERVER_ERROR,
}


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
