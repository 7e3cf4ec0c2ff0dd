"""The HTTP status of each kind of refusal, one table for every protocol that answers over HTTP (OpenAI,
OIP REST, BentoML's native endpoints); each adds its own error shape."""

from __future__ import annotations

from http import HTTPStatus

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
