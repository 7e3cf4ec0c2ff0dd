"""Admission by time, and functions that share the CPU.

A function refuses at once a request that would wait past its target to start, instead of queueing it
until its client gives up. The wait is the work queued ahead times the function's recent service rate.
For the encoders that rate is seconds per input of recent forward passes. For the chat engine it is
seconds to first token per request waiting.

On a CPU the encoders yield to the chat engine. While the engine has work, each encoder worker spends
at most its share of the time in forward passes and rests for the remainder. Otherwise a flood of
embeddings keeps every core busy, and the engine's decode steps wait their turn behind it."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from pathlib import Path

import bentoml

from services.admission import DEADLINE_PASSED, rejected, seconds_left
from services.functions.hardware import Choices, server_folder, server_instance
from services.functions.types import Refused

logger = logging.getLogger("bentoml.fnserve.pacing")
EXPECTED_WAIT = bentoml.metrics.Gauge(
    name="fnserve_expected_wait_seconds",
    documentation="A new request's expected wait to start (first token for chat), by function",
    labelnames=["function"],
)
RESTED = bentoml.metrics.Counter(
    name="fnserve_rested_seconds",
    documentation="Seconds an encoder worker rested between forward passes to leave the chat engine "
    "its share of the CPU",
    labelnames=["function"],
)


class ServiceRate:
    """Seconds of service per unit of queued work (an input, a request), over the last `window`
    observations: a sum rather than an average of ratios, so large batches weigh as much as they cost."""

    def __init__(self, window: int = 32) -> None:
        self._seen: deque[tuple[float, float]] = deque(maxlen=window)

    def observe(self, units: float, seconds: float) -> None:
        if units > 0:
            self._seen.append((units, seconds))

    def seconds_for(self, units: float) -> float:
        """0 before anything was observed: an idle function admits."""
        done = sum(u for u, _ in self._seen)
        return units * sum(s for _, s in self._seen) / done if done else 0.0


def admit(
    function: str, expected: float, target: float, deadline: float | None, setting: str, idle: bool = False
) -> None:
    """Refuses (queue_full, with a retry-after) a request expected to wait past `target` or its own
    deadline before it starts, and (deadline) one whose deadline has passed already. With nothing
    waiting ahead (`idle`) only the request's own deadline can refuse it: it starts at once, a refusal
    could not make it sooner, and one slow request's estimate (a long prompt's first token) would
    otherwise refuse every later one, none of which would be admitted to correct it."""
    EXPECTED_WAIT.labels(function=function).set(expected)
    left = seconds_left(deadline)
    if left is not None and left <= 0:
        rejected("deadline")
        raise Refused("deadline", DEADLINE_PASSED)
    if left is not None and (idle or left < target):
        limit, why = left, "the request's deadline"
    elif idle:
        return
    else:
        limit, why = target, setting
    if expected <= limit:
        return
    rejected("expected_wait")
    message = (
        f"this request would wait about {expected:.1f} s to start, over the {limit:.1f} s allowed "
        f"({why}); try again in a moment"
    )
    raise Refused("queue_full", message, retry_after=max(1, math.ceil(expected - target)))


BEAT = 0.25  # seconds between the engine's signs of work; an encoder trusts one for twice as long


def beat_path(server: str) -> Path:
    return server_folder() / f"{server}-engine-busy"


class EngineBeat:
    """The chat engine's sign that it has work, read by the encoders of the same server: the modification
    time of one file in the server's own folder, touched by the engine's process at most every `BEAT`
    seconds while it has requests (a stat per forward pass; no lock, no socket)."""

    def __init__(self, server: str) -> None:
        self.path = beat_path(server)
        self._touched = 0.0

    def busy(self) -> None:
        """Called by the engine's process whenever it has requests."""
        now = time.time()
        if now - self._touched >= BEAT:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)  # if removed under the running server
                self.path.touch()
            except OSError as exc:  # the encoders only yield less: never a chat's failure
                logger.warning("the engine's beat %s could not be written: %s", self.path, exc)
            self._touched = now


class Share:
    """An encoder's yielding to the chat engine: `share` of its time in forward passes while the engine
    has work."""

    def __init__(self, server: str, function: str, share: float) -> None:
        self.path, self.function, self.share = beat_path(server), function, share

    def rest_after(self, busy_seconds: float) -> float:
        """Seconds to rest after a forward pass of `busy_seconds`: none while the engine is idle, else
        enough to keep the pass to `share` of the time."""
        if self.share >= 1:
            return 0.0
        try:
            beat = self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0
        if time.time() - beat > 2 * BEAT:
            return 0.0
        rest = busy_seconds * (1 / self.share - 1)
        RESTED.labels(function=self.function).inc(rest)
        return rest


def encoder_share(function: str, share: float, device: str, choices: Choices) -> Share:
    """The yielding an encoder on `device` does for the chat engine, recorded as one of its choices."""
    if device != "cpu":
        value = float(choices.add("cpu_share", 1, "rule", "not on a CPU: it shares no cores with the engine"))
    else:
        reason = "FNSERVE_ENCODER_CPU_SHARE: its share of the time while the chat engine has work"
        value = float(choices.add("cpu_share", share, "setting", reason))
    return Share(server_instance(), function, value)
