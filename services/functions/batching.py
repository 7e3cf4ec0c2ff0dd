"""Greedy request batching for in-process model calls.

Whenever the model is free, everything queued (up to `max_batch_size` items, and where items differ in
length up to `max_batch_tokens` padded tokens) goes into the next forward pass; while it is busy, new
requests queue. Load alone sets the batch size: one request runs at once at low load, and batches fill
under concurrency, with no wait window to tune.

Written here rather than reusing BentoML's CorkDispatcher because that one sizes its wait window from the
average wait of recent batches, which feeds back on itself: after a burst it kept adding ~70 ms to every
request at one-at-a-time load (README, benchmarks), and it polls the queue every millisecond.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from services.admission import DEADLINE_PASSED, rejected, seconds_left
from services.functions.pacing import ServiceRate, Turns, admit
from services.functions.types import Refused

# Set in the batch runner's context: its requests fill what room online requests leave in each forward
# pass, and are never shed for waiting (they are not waited on by a client).
BACKGROUND: ContextVar[bool] = ContextVar("background", default=False)
ONLINE_QUIET_SECONDS = 1.0  # background batches grow back to full size after this long without online work
WAITS_MAX_AGE = 30.0  # seconds the encoders' waits for their turn are trusted


@asynccontextmanager
async def answered_by(deadline: float | None) -> AsyncIterator[None]:
    """The body under a request's deadline (time.monotonic()): past it the request's queued inputs are
    dropped, and a timeout or a full queue leaves as the function's refusal."""
    try:
        async with asyncio.timeout(seconds_left(deadline)):
            yield
    except TimeoutError:
        rejected("deadline")
        raise Refused("deadline", DEADLINE_PASSED) from None
    except QueueFull as exc:
        rejected("queue_full")
        raise Refused("queue_full", str(exc)) from None


@dataclass
class Pass:
    """A forward pass as it fills: its items, and the longest of them (in tokens)."""

    count: int = 0
    longest: int = 0

    def takes(self, items: int, longest: int, max_items: int, max_tokens: float) -> bool:
        """Whether `items` more, the longest of them `longest` tokens, fit (into an empty pass, always)."""
        total = self.count + items
        return not self.count or (total <= max_items and total * max(self.longest, longest) <= max_tokens)

    def add(self, items: int, longest: int) -> None:
        """Puts `items` in, the longest of them `longest` tokens."""
        self.count, self.longest = self.count + items, max(self.longest, longest)

    @property
    def tokens(self) -> int:
        """Padded tokens: what the pass computes over, and so what it costs."""
        return self.count * self.longest


def passes(lengths: list[int], max_items: int, max_tokens: float) -> list[list[int]]:
    """The indices of items of these lengths, grouped into passes of at most `max_items` items and
    `max_tokens` padded tokens, at least one item each. Shortest first, so that a pass pads its texts to
    about their own length: in the order given, one long text among short ones would make each of them
    cost as much."""
    grouped: list[list[int]] = []
    current = Pass()
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if not current.takes(1, lengths[i], max_items, max_tokens):
            current = Pass()
        if not current.count:
            grouped.append([])
        grouped[-1].append(i)
        current.add(1, lengths[i])
    return grouped


class QueueFull(Exception):
    """Raised instead of queueing past the bound: the caller answers 429 with Retry-After."""


T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class WaitTarget:
    """Admission by time: an online request expected to wait longer than `seconds` (or its deadline)
    to start is refused at once; `setting` names the variable that sets it, `function` the metric label."""

    function: str
    seconds: float
    setting: str


@dataclass
class _Request:
    """What the chunks of one request share: once one has entered a forward pass, the request has
    started, and the chunks after it wait for their own request, not for the queue; a request shed
    for waiting is counted once, however many chunks it had."""

    started: bool = False
    shed: bool = False


@dataclass
class _Job(Generic[T, R]):
    items: list[T]
    future: asyncio.Future[list[R]]
    request: _Request
    longest: int
    enqueued: float = field(default_factory=time.monotonic)


class GreedyBatcher(Generic[T, R]):
    def __init__(
        self,
        run_batch: Callable[[list[T]], list[R]],
        max_batch_size: int,
        max_queue_seconds: float,
        max_queue: int,
        on_batch: Callable[[int, float], None] = lambda size, wait: None,
        on_queue: Callable[[int], None] = lambda queued: None,
        wait_target: WaitTarget | None = None,
        turns: Turns | None = None,
        max_batch_tokens: int = 0,
        tokens: Callable[[T], int] = lambda item: 1,
    ) -> None:
        """`run_batch` maps items to results in order and runs in a thread of this batcher's own (passes
        run one at a time), so that a pass never waits for asyncio's shared threads, which image
        decoding or the batch store may have busy; `on_batch` receives
        each batch's size and the queue wait of its oldest job; `on_queue` the online items waiting,
        whenever that changes. Requests that wait longer than `max_queue_seconds` to start are shed
        (refused as overloaded: 503) instead of running late; an online request that would take a
        non-empty queue past `max_queue` items raises QueueFull, and one expected to wait past
        `wait_target` is refused. Passes start in their `turns` (the worker's encoders yielding the
        CPU to the chat engine), which hear when each begins and ends; the answers of a pass are sent
        before any rest.
        With `max_batch_tokens`, a pass also holds at most that many padded tokens, an item's being
        `tokens(item)`: what a pass of texts costs grows with its tokens, not its texts, so long texts
        fill one with fewer of them."""
        self._run_batch = run_batch
        self._max_batch_size = max_batch_size
        self._max_batch_tokens = max_batch_tokens or math.inf
        self._tokens = tokens
        self._max_queue_seconds = max_queue_seconds
        self._max_queue = max_queue
        self._on_batch = on_batch
        self._on_queue = on_queue
        self._wait_target, self._turns = wait_target, turns or Turns()
        self.rate = ServiceRate()  # seconds of forward pass per padded token
        # Seconds a pass waited for its turn, per pass, while resting: the other encoder's load, which a
        # spell long past (both flooding) says nothing of.
        self.waits = ServiceRate(max_age=WAITS_MAX_AGE)
        self._running = 0  # padded tokens of the forward passes under way (or queued in the thread)
        self._running_passes = 0
        self._queue: deque[_Job[T, R]] = deque()
        self._background: deque[_Job[T, R]] = deque()
        self._online_seen = -ONLINE_QUIET_SECONDS
        # An eighth of a batch: at a quarter, online p50 under a running job was 2.1x its idle value.
        self._background_size = max(1, max_batch_size // 8)
        self._background_tokens = self._max_batch_tokens / 8
        self._worker: asyncio.Task[None] | None = None
        self._forward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fnserve-forward")

    async def forward(self, items: list[T]) -> list[R]:
        """`items` as one pass in this batcher's thread, after the pass under way, for a caller that
        batches on its own (BentoML's batchable endpoint): it waits its turn here, and its passes count
        in the rate, the waits and the work under way that admission reads, as the queue's do (without
        them, /encode's load was missing from every other protocol's expected wait)."""
        return await self._pass(items, await self._turns.wait())

    async def _pass(self, items: list[T], waited: float) -> list[R]:
        """`items` as one pass, its turn waited for (`waited` seconds)."""
        if self._turns.stretch() > 1:  # resting for the engine: what the estimate reads then
            self.waits.observe(1, waited)
        padded = len(items) * max(map(self._tokens, items))
        self._running, self._running_passes = self._running + padded, self._running_passes + 1
        self._turns.begin()

        def timed() -> tuple[float, list[R]]:
            """When the thread took the pass (a pass queued there behind another is not charged for that
            wait), and its results."""
            return time.monotonic(), self._run_batch(items)

        computed = asyncio.get_running_loop().run_in_executor(self._forward_thread, timed)

        # The pass ends when its thread does: a caller that gives up (cancelled) leaves it computing.
        def ended(future: asyncio.Future[tuple[float, list[R]]]) -> None:
            self._turns.end()
            self._running, self._running_passes = self._running - padded, self._running_passes - 1
            if not future.cancelled() and future.exception() is None:  # read: a failure is not logged
                self.rate.observe(padded, time.monotonic() - future.result()[0])

        computed.add_done_callback(ended)
        _, results = await asyncio.shield(computed)
        return results

    @property
    def bounds(self) -> tuple[int, float]:
        """An online pass's most items and padded tokens."""
        return self._max_batch_size, self._max_batch_tokens

    def check(self, count: int, deadline: float | None = None) -> None:
        """Refuses now an online request of `count` items that `submit` would refuse (QueueFull, or
        admission by time), so that its caller need not prepare the items first."""
        if BACKGROUND.get():
            return
        queued = self.queued
        if queued and queued + count > self._max_queue:  # one always fits
            raise QueueFull(f"{queued} inputs are waiting for the model; try again shortly")
        if target := self._wait_target:
            admit(target.function, self.expected_wait, target.seconds, deadline, target.setting)

    async def submit(self, items: list[T], deadline: float | None = None) -> list[R]:
        """Results for `items`, in order. Inputs larger than a batch are split across batches."""
        background = BACKGROUND.get()
        self.check(len(items), deadline)
        # Background work is cut small, so that an online request never waits behind a full forward.
        size, budget = (self._background_size, self._background_tokens) if background else self.bounds
        lengths = [self._tokens(item) for item in items]
        groups = passes(lengths, size, budget)
        loop = asyncio.get_running_loop()
        request = _Request()
        jobs = [
            _Job([items[i] for i in group], loop.create_future(), request, max(lengths[i] for i in group))
            for group in groups
        ]
        if background:
            self._background.extend(jobs)
        else:
            self._queue.extend(jobs)
            self._online_seen = time.monotonic()
            self._on_queue(self.queued)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        try:
            parts = await asyncio.gather(*(job.future for job in jobs))
        except BaseException:
            for job in jobs:  # a cancelled (timed-out) or failed caller's queued chunks are skipped
                job.future.cancel()
            self._on_queue(self.queued)
            raise
        order = [i for group in groups for i in group]
        placed = dict(zip(order, (result for part in parts for result in part), strict=True))
        return [placed[i] for i in range(len(items))]

    @property
    def expected_wait(self) -> float:
        """Seconds before a new online request's first input would enter a forward pass: the rest already
        due, then the padded tokens ahead of it (in the passes the queue will make) at the recent
        seconds per padded token. Counted in inputs, a rate learned on short texts admitted a burst of
        long ones that was then shed for waiting, and one learned on long texts refused short ones.
        While the encoders rest for the engine, a pass is followed by its own rest (the share), or
        waits as long as recent passes waited for their turn, whichever is longer: the other encoder's
        passes and rests are a wait per pass, not a cost per token."""
        ahead, passes = Pass(), self._running_passes
        tokens = self._running
        for job in self._queue:
            if job.future.done():
                continue
            if not ahead.takes(len(job.items), job.longest, *self.bounds):
                tokens, ahead, passes = tokens + ahead.tokens, Pass(), passes + 1
            ahead.add(len(job.items), job.longest)
        passes += int(bool(ahead.count))
        work = self.rate.seconds_for(tokens + ahead.tokens)
        if (stretch := self._turns.stretch()) > 1:
            work = max(work * stretch, work + passes * self.waits.seconds_for(1))
        return self._turns.pending() + work

    def load(self) -> dict[str, float]:
        """What admission by time reads, for status pages: recent seconds per padded token (per input
        where inputs have no length: images), and the wait a new request would have to start."""
        return {"seconds_per_token": self.rate.seconds_for(1), "expected_wait_seconds": self.expected_wait}

    @property
    def queued(self) -> int:
        """Online items waiting; those of cancelled (timed-out) requests no longer count."""
        return sum(len(job.items) for job in self._queue if not job.future.done())

    def _next_batch(self) -> list[_Job[T, R]]:
        batch: list[_Job[T, R]] = []
        filled = Pass()

        def fits(job: _Job[T, R], max_items: int, max_tokens: float) -> bool:
            return filled.takes(len(job.items), job.longest, max_items, max_tokens)

        now = time.monotonic()
        while self._queue:
            job = self._queue[0]
            expired = not job.request.started and now - job.enqueued > self._max_queue_seconds
            # What is done or shed leaves the queue whether it would fit or not.
            if not (job.future.done() or expired or fits(job, *self.bounds)):
                break
            self._queue.popleft()
            if job.future.done():
                continue
            if expired:
                if not job.request.shed:
                    rejected("overloaded")
                    job.request.shed = True
                message = (
                    f"the request waited over {self._max_queue_seconds:g} s for the model; try again shortly"
                )
                job.future.set_exception(Refused("overloaded", message, retry_after=1))
                continue
            job.request.started = True
            batch.append(job)
            filled.add(len(job.items), job.longest)
        if batch:
            return batch
        # Background work runs only in forwards with no online request in them, and in small ones
        # while online requests keep coming: an online request then waits for a short forward at most.
        recent = now - self._online_seen < ONLINE_QUIET_SECONDS
        limits = (self._background_size, self._background_tokens) if recent else self.bounds
        while self._background and (self._background[0].future.done() or fits(self._background[0], *limits)):
            job = self._background.popleft()
            if not job.future.done():
                batch.append(job)
                filled.add(len(job.items), job.longest)
        return batch

    async def _drain(self) -> None:
        try:
            while self._queue or self._background:
                waited = await self._turns.wait()  # before the pass is taken: what comes meanwhile joins it
                batch = self._next_batch()
                self._on_queue(self.queued)
                if batch:
                    await self._run(batch, waited)
        except BaseException as exc:  # never a queue left without a worker: its callers get the error
            for job in (*self._queue, *self._background):
                if not job.future.done():
                    job.future.set_exception(RuntimeError(f"the batcher stopped: {exc!r}"))
            self._queue.clear()
            self._background.clear()
            raise

    async def _run(self, batch: list[_Job[T, R]], waited: float) -> None:
        try:
            items = [item for job in batch for item in job.items]
            self._on_batch(len(items), time.monotonic() - batch[0].enqueued)
            results = await self._pass(items, waited)
            start = 0
            for job in batch:
                if not job.future.done():
                    job.future.set_result(results[start : start + len(job.items)])
                start += len(job.items)
        except BaseException as exc:  # its callers get the error, never a hang; the worker keeps serving
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(
                        exc if isinstance(exc, Exception) else RuntimeError("batch cancelled")
                    )
            if not isinstance(exc, Exception):
                raise
