"""Admission, shared by every protocol of a worker: API keys, the concurrency bound and each request's
deadline. The HTTP middleware (services/protocols/guard.py) and the gRPC server (services/protocols/oip/
grpc.py) both ask one `Admission`, so one bound covers both ports."""

from __future__ import annotations

import hmac
import time
from contextvars import ContextVar

import bentoml

from services.functions.types import Refused

# Absolute time.monotonic() by which the current request must be answered; None outside a request
# (batch lines run without one).
DEADLINE: ContextVar[float | None] = ContextVar("deadline", default=None)

DEADLINE_PASSED = "the request's deadline passed (its timeout or FNSERVE_REQUEST_TIMEOUT_SECONDS)"

REJECTIONS = bentoml.metrics.Counter(
    name="fnserve_rejections",
    documentation="Requests refused or cut short, by reason (queue_full, loading, deadline, "
    "concurrency, overloaded, unauthorized, too_large, invalid)",
    labelnames=["reason"],
)


def rejected(reason: str) -> None:
    REJECTIONS.labels(reason=reason).inc()


def count_refusal(refusal: Refused) -> None:
    """Bad input is counted by the protocol that answers it; load and deadline refusals where a
    function decided them."""
    if refusal.kind in ("invalid", "not_found"):
        rejected("invalid")


def seconds_left(deadline: float | None) -> float | None:
    """Seconds left before `deadline` (time.monotonic()), or None without one."""
    return None if deadline is None else deadline - time.monotonic()


def remaining() -> float | None:
    """Seconds left before the current request's deadline."""
    return seconds_left(DEADLINE.get())


class Admission:
    """One per worker process. `max_concurrency` is the worker's share of requests in flight."""

    def __init__(self, keys: list[str], max_concurrency: int, timeout_seconds: float) -> None:
        self._keys = [key.encode() for key in keys]
        self.max_concurrency, self.in_flight = max_concurrency, 0
        self.timeout = timeout_seconds

    @property
    def open(self) -> bool:
        return not self._keys

    def authorized(self, authorization: str | None) -> bool:
        """`Bearer <key>` with one of the keys (or anything when none is configured)."""
        if not self._keys:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Every key is compared, in constant time, so timing tells nothing about which one nearly matched.
        matches = [hmac.compare_digest(token.strip().encode(), key) for key in self._keys]
        return any(matches)

    def deadline(self, asked: float | None) -> float:
        """The request's deadline (time.monotonic()): the server's timeout, or less if the caller asked
        for less. `asked` must be above 0."""
        timeout = self.timeout if asked is None else min(asked, self.timeout)
        return time.monotonic() + timeout

    def enter(self) -> bool:
        """Takes a place among the requests in flight; False (and counted) when there is none."""
        if self.in_flight >= self.max_concurrency:
            rejected("concurrency")
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    @property
    def busy_message(self) -> str:
        return f"this server is at its limit of {self.max_concurrency} requests"
