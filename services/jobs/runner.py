"""Batch jobs: the runner that works through the lines of the store (services/jobs/store.py).

A line runs through the same function as an online request of its endpoint (the caller's `execute`), so
embedding lines join the greedy batcher (at background priority: online requests go first into every
forward pass, services/functions/batching.py) and chat lines the engine's continuous batch (as equals of
online chats, but at most FNSERVE_BATCH_GENERATION_CONCURRENCY at a time per worker).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import nullcontext, suppress
from functools import partial
from typing import Any

from services.config import Settings
from services.functions.batching import BACKGROUND
from services.jobs.db import StoreUnavailable
from services.jobs.store import BatchStore, Line, Outcome, ended_error

logger = logging.getLogger("bentoml.fnserve.batch")
Execute = Callable[[str, dict[str, Any]], Awaitable[tuple[bool, str]]]
GENERATION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_ATTEMPTS = 5
STOP_WAIT_SECONDS = 10.0  # how long a stop waits for the step in progress (a store call) to end


class BatchRunner:
    """One per worker process; workers share the store and claim lines from it in turn."""

    def __init__(self, store: BatchStore, execute: Execute, settings: Settings) -> None:
        self.store = store
        self._execute = execute
        self.settings = settings
        self._generation_slots = asyncio.Semaphore(settings.batch_generation_concurrency)
        self._wake = asyncio.Event()
        self._done: list[Outcome] = []
        self._in_flight: dict[asyncio.Task[None], Line] = {}
        self._suspects: set[asyncio.Task[None]] = set()  # held lines claimed as suspects (store.claim)
        self._endings: dict[str, str] = {}
        self._unavailable = False
        self._claiming = True
        self._ending = False
        self._task: asyncio.Task[None] | None = None  # run()'s

    def wake(self) -> None:
        self._wake.set()

    def stop_claiming(self) -> None:
        """At the stop signal: lines in flight run on and are recorded, and no new ones are taken, so the
        other workers and replicas get them at once instead of after this worker's drain."""
        self._claiming = False
        self._wake.set()

    async def run(self) -> None:
        # Every line task inherits this context: its embedding forwards queue behind online ones.
        BACKGROUND.set(True)
        self._task = asyncio.current_task()
        renewing = asyncio.create_task(self._keep_claims())
        try:
            await self._loop()
        finally:
            renewing.cancel()

    async def _keep_claims(self) -> None:
        """Renews the claims of the lines this worker holds (running, waiting for a slot, or finished and
        not yet recorded) a few times a lease, on its own: a step that writes a large batch's files, or
        cleans up old ones, can take longer than a lease, and its lines would be taken and run again."""
        while True:
            await asyncio.sleep(self.settings.batch_lease_seconds / 4)
            held = [*self._in_flight.values(), *(outcome.line for outcome in self._done)]
            if not held:
                continue
            try:
                await asyncio.to_thread(self.store.renew, held)
            except StoreUnavailable:
                continue  # the runner's loop says so; the claims are renewed once the store is back
            except Exception:
                logger.exception("renewing the batch lines' claims failed")

    async def _loop(self) -> None:
        last_cleanup = 0.0
        while not self._ending:
            try:
                more = await self._step()
                # A stop waits for this step: the minute's clean-up is left to the workers that go on.
                if not self._ending and time.monotonic() - last_cleanup > 60:
                    await asyncio.to_thread(self.store.expire_overdue)
                    await asyncio.to_thread(self.store.clean_up, self.settings.batch_retention_seconds)
                    last_cleanup = time.monotonic()
                if self._unavailable:
                    logger.info("the batch database is back")
                    self._unavailable = False
                if not more:
                    await self._sleep()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:  # said once per outage; the routes answer 503 meanwhile
                if not self._unavailable:
                    logger.warning("%s; batch lines wait until it is back", exc)
                self._unavailable = True
                await asyncio.sleep(1)
                continue
            except Exception:  # the store or a handler failed unexpectedly: keep the loop alive
                logger.exception("batch runner step failed")
                await asyncio.sleep(1)

    async def _step(self) -> bool:
        """Claim lines while there is room, record finished ones; True if more may be waiting."""
        settings = self.settings
        lease = settings.batch_lease_seconds
        held = list(self._in_flight.values())
        room = settings.batch_concurrency - len(held) if self._claiming else 0
        generating = sum(line.endpoint in GENERATION_ENDPOINTS for line in held)
        self._endings = await asyncio.to_thread(self.store.endings)
        # Each claim's lines start at once: a failure of the next store call must not strand them.
        claim = partial(self.store.claim, lease_seconds=lease, max_attempts=MAX_ATTEMPTS, suspects=False)
        # A suspect (store.SUSPECT_AFTER) is claimed first, and only while no other is held here: if it
        # kills this worker, the suspects not yet claimed are not charged with it.
        rooms = [0 if self._suspects else min(1, room)]
        suspect = self._start(await asyncio.to_thread(claim, rooms[0], suspects=True), suspect=True)
        generating += sum(line.endpoint in GENERATION_ENDPOINTS for line in suspect)
        room -= len(suspect)
        # Chat and completion lines wait for one of a few slots: a worker holds at most twice as many as
        # it can run, and leaves the rest to other workers and replicas.
        rooms.append(min(room, 2 * settings.batch_generation_concurrency - generating))
        lines = self._start(await asyncio.to_thread(claim, rooms[1], endpoints=GENERATION_ENDPOINTS))
        rooms.append(room - len(lines))
        others = self._start(
            await asyncio.to_thread(claim, rooms[2], endpoints=GENERATION_ENDPOINTS, among=False)
        )
        claimed = (suspect, lines, others)
        full = any(0 < limit == len(got) for limit, got in zip(rooms, claimed, strict=True))
        await self.settle()
        if not full and not self._ending:  # finalizing is any worker's, and a stop waits for this step
            await asyncio.to_thread(self.store.finalize_ready, settings.batch_lease_seconds)
        return full

    def _start(self, lines: list[Line], suspect: bool = False) -> list[Line]:
        for line in lines:
            task = asyncio.create_task(self._run_line(line))
            self._in_flight[task] = line
            task.add_done_callback(self._in_flight.pop)
            if suspect:
                self._suspects.add(task)
                task.add_done_callback(self._suspects.discard)
        return lines

    async def stop(self) -> None:
        """After the HTTP drain (lines in flight ran on through it): what finished is recorded, and the
        lines still running or waiting for a slot are stopped and handed back, so that other workers and
        replicas take them now, not once their lease runs out (two minutes, at every rolling restart),
        and without the attempt a crash would count. The loop's step in progress ends first: a claim
        already in the store's thread commits whatever becomes of the task that asked for it, and a
        cancelled step would leave its lines running here, unseen, until their lease ran out."""
        self._claiming, self._ending = False, True
        self._wake.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=STOP_WAIT_SECONDS)
            self._task.cancel()  # a store call that hangs past the wait: its lines wait for their lease
        unfinished = list(self._in_flight.items())
        for task, _ in unfinished:
            task.cancel()
        await asyncio.gather(*(task for task, _ in unfinished), return_exceptions=True)
        await self.settle()
        if unfinished:  # those just recorded are no longer running: left as they are
            await asyncio.to_thread(self.store.hand_back, [line for _, line in unfinished])

    async def settle(self) -> None:
        """Record finished lines; if the store refuses, they are kept for the next try."""
        if not self._done:
            return
        done, self._done = self._done, []
        try:
            await asyncio.to_thread(self.store.settle, done)
        except BaseException:
            self._done = done + self._done
            raise

    async def _sleep(self) -> None:
        """Until a line finishes, a batch is created in this worker, or the poll interval passes (another
        worker may have created one)."""
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wake.wait())]
        if self._in_flight:
            waits.append(
                asyncio.ensure_future(asyncio.wait(list(self._in_flight), return_when="FIRST_COMPLETED"))
            )
        _, pending = await asyncio.wait(waits, timeout=0.5, return_when="FIRST_COMPLETED")
        for future in pending:
            future.cancel()
        self._wake.clear()

    async def _run_line(self, line: Line) -> None:
        slot = self._generation_slots if line.endpoint in GENERATION_ENDPOINTS else nullcontext()
        try:
            async with slot:
                ok, result = await self._execute_unless_ended(line)
        except Exception as exc:  # a server-side failure (5xx, a runner not up yet): retried, then given up
            if line.attempts < MAX_ATTEMPTS:
                logger.warning("batch line %s/%s: %s; retrying", line.batch_id, line.custom_id, exc)
                await asyncio.sleep(2**line.attempts)
                with suppress(StoreUnavailable):  # then it waits for its lease to run out instead
                    await asyncio.to_thread(self.store.release, line)
                return
            logger.error(
                "batch line %s/%s failed %d times: %s", line.batch_id, line.custom_id, line.attempts, exc
            )
            message = f"failed {line.attempts} times; last: {type(exc).__name__}: {exc}"
            ok, result = False, json.dumps({"code": "server_error", "message": message})
        self._done.append(Outcome(line, ok, result))
        self._wake.set()

    async def _execute_unless_ended(self, line: Line) -> tuple[bool, str]:
        """Claimed lines can wait for a slot; one whose batch was cancelled meanwhile is not run."""
        if ending := self._endings.get(line.batch_id):
            return False, ended_error(ending)
        return await self._execute(line.endpoint, line.body)
