"""Admission by time, and functions that share the CPU.

A function refuses at once a request that would wait past its target to start, instead of queueing it
until its client gives up. The wait is the work queued ahead times the function's recent service rate.
For the encoders that rate is seconds per padded token of recent forward passes, stretched by the rests
they take for the engine. For the chat engine it is seconds to first token per request waiting.

On a CPU the encoders yield to the chat engine. While the engine has work, each entry worker's encoders
together spend at most their share of its time in forward passes and rest for the remainder. Otherwise a
flood of embeddings keeps every core busy, and the engine's decode steps wait their turn behind it."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from functools import cache
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
    documentation="Seconds an encoder's next forward pass waited for its worker's rest, which leaves the "
    "chat engine its share of the CPU",
    labelnames=["function"],
)


class ServiceRate:
    """Seconds of service per unit of queued work (an input, a request), over the last `window`
    observations, and of those only the ones made in the last `max_age` seconds: a sum rather than an
    average of ratios, so large batches weigh as much as they cost."""

    def __init__(
        self, window: int = 32, max_age: float = math.inf, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._seen: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._max_age, self._clock = max_age, clock

    def observe(self, units: float, seconds: float) -> None:
        if units > 0:
            self._seen.append((self._clock(), units, seconds))

    def seconds_for(self, units: float) -> float:
        """0 before anything was observed (or lately): an idle function admits."""
        since = self._clock() - self._max_age
        recent = [(u, s) for at, u, s in self._seen if at >= since]
        done = sum(u for u, _ in recent)
        return units * sum(s for _, s in recent) / done if done else 0.0


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


class Turns:
    """When an encoder's forward passes may run: at once, always (on a GPU, or with a share of 1)."""

    async def wait(self) -> float:
        """Returns once a pass may start: the seconds waited."""
        return 0.0

    def begin(self) -> None:
        """A forward pass starts (its thread is given the work)."""

    def end(self) -> None:
        """A forward pass ends (its thread is done, whether or not its caller still waits)."""

    def stretch(self) -> float:
        """Wall seconds per second of forward passes, the passes' own rests included, now."""
        return 1.0

    def pending(self) -> float:
        """Seconds of rest before the next pass may start."""
        return 0.0


class Share:
    """An entry worker's yielding to the chat engine: `share` of its time in encoder forward passes while
    the engine has work, whichever of its encoders runs them. One clock for the worker's encoders: each
    had rested after its own passes only, so the two together took up to twice the share. Used from the
    worker's event loop only."""

    def __init__(self, server: str, share: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.path, self.share, self._clock = beat_path(server), share, clock
        self._passes = 0  # under way, of either encoder
        self._charged = 0.0  # the time (self._clock()) up to which the passes' busy time is charged
        self._owed = 0.0  # seconds of rest due once the passes under way end
        self._resume = 0.0  # before this (self._clock()), no encoder pass starts
        self._idle = asyncio.Event()  # set while no pass is under way
        self._idle.set()

    def engine_busy(self) -> bool:
        """Whether the engine's beat is recent: an encoder trusts one for two beats. A beat that cannot
        be read is no beat: it is read where a pass ends, and the rest's bookkeeping must not fail."""
        try:
            beat = self.path.stat().st_mtime
        except OSError:
            return False
        return time.time() - beat <= 2 * BEAT

    def begin(self) -> None:
        """A forward pass of either encoder starts: busy time is charged from when the worker's encoders
        went from idle to busy (passes of two encoders overlap, in either order)."""
        if not self._passes:
            self._charged = self._clock()
            self._idle.clear()
        self._passes += 1

    def end(self) -> None:
        """A forward pass ends. While the engine has work, the rest owed grows by the busy time since the
        last charge times (1/share - 1). The rest begins when no pass is under way: a rest that
        overlapped another pass would not rest."""
        self._passes -= 1
        now = self._clock()
        busy, self._charged = now - self._charged, now
        if busy > 0 and self.engine_busy():
            self._owed += busy * (1 / self.share - 1)
        if not self._passes:
            self._resume, self._owed = now + self._owed, 0.0
            self._idle.set()

    def wait_seconds(self) -> float:
        """Seconds before an encoder pass may start; while a rest is owed but a pass is still under way,
        at least the rest owed."""
        return self._owed or max(0.0, self._resume - self._clock())

    async def wait(self, function: str) -> float:
        """Returns once a pass may start, counting the wait as `function`'s rest: the seconds waited."""
        if not self.wait_seconds():
            return 0.0
        began = self._clock()
        while rest := self.wait_seconds():
            if self._owed:  # due once the passes under way end, and then set
                await self._idle.wait()
            else:
                await asyncio.sleep(rest)
        waited = self._clock() - began
        RESTED.labels(function=function).inc(waited)
        return waited

    def stretch(self) -> float:
        return 1 / self.share if self.engine_busy() else 1.0


class EncoderTurns(Turns):
    """One encoder's turns on its worker's `Share`."""

    def __init__(self, share: Share, function: str) -> None:
        self.share, self.function = share, function

    async def wait(self) -> float:
        return await self.share.wait(self.function)

    def begin(self) -> None:
        self.share.begin()

    def end(self) -> None:
        self.share.end()

    def stretch(self) -> float:
        return self.share.stretch()

    def pending(self) -> float:
        return self.share.wait_seconds()


@cache
def worker_share(server: str, share: float) -> Share:
    """The one `Share` of this process's encoders."""
    return Share(server, share)


def encoder_turns(function: str, share: float, device: str, choices: Choices) -> Turns:
    """The yielding an encoder on `device` does for the chat engine, recorded as one of its choices."""
    if device != "cpu":
        choices.add("cpu_share", 1, "rule", "not on a CPU: it shares no cores with the engine")
        return Turns()
    reason = "FNSERVE_ENCODER_CPU_SHARE: the worker's encoders' share of its time while the engine has work"
    value = float(choices.add("cpu_share", share, "setting", reason))
    return EncoderTurns(worker_share(server_instance(), value), function) if value < 1 else Turns()
