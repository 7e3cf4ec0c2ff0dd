"""Batch jobs: the OpenAI Files and Batches routes, and the runner that works through the lines.

Lines run through the same handlers as the online routes, so embedding lines join the greedy batcher
(at background priority: online requests go first into every forward pass, services/batching.py) and
chat lines the engine's continuous batch (as equals of online chats, but at most
FNSERVE_BATCH_GENERATION_CONCURRENCY at a time per worker). State lives in services/batch_store.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from typing import Annotated, Any

import bentoml
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import FileResponse, Response

from services.batch_store import BadFile, BatchStore, Line, Outcome, ended_error
from services.batching import BACKGROUND
from services.config import Settings
from services.protocol import (
    APIError,
    Batch,
    BatchCreateRequest,
    BatchList,
    FileDeleted,
    FileList,
    FileObject,
)

logger = logging.getLogger("bentoml.fnserve.batch")
Execute = Callable[[str, dict[str, Any]], Awaitable[tuple[bool, str]]]
GENERATION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_ATTEMPTS = 5


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
        self._endings: dict[str, str] = {}
        self._renewed = time.monotonic()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        # Every line task inherits this context: its embedding forwards queue behind online ones.
        BACKGROUND.set(True)
        last_cleanup = 0.0
        while True:
            try:
                more = await self._step()
                if time.monotonic() - last_cleanup > 60:
                    await asyncio.to_thread(self.store.expire_overdue)
                    await asyncio.to_thread(self.store.clean_up, self.settings.batch_retention_seconds)
                    last_cleanup = time.monotonic()
                if not more:
                    await self._sleep()
            except asyncio.CancelledError:
                raise
            except Exception:  # the store or a handler failed unexpectedly: keep the loop alive
                logger.exception("batch runner step failed")
                await asyncio.sleep(1)

    async def _step(self) -> bool:
        """Claim lines while there is room, record finished ones; True if more may be waiting."""
        settings = self.settings
        room = settings.batch_concurrency - len(self._in_flight)
        lease = settings.batch_lease_seconds
        lines = await asyncio.to_thread(self.store.claim, room, lease, MAX_ATTEMPTS) if room else []
        self._endings = await asyncio.to_thread(self.store.endings)
        for line in lines:
            task = asyncio.create_task(self._run_line(line))
            self._in_flight[task] = line
            task.add_done_callback(self._in_flight.pop)
        await self.settle()
        if time.monotonic() - self._renewed > lease / 4:  # lines waiting for a slot keep their claim
            await asyncio.to_thread(self.store.renew, list(self._in_flight.values()))
            self._renewed = time.monotonic()
        if len(lines) < room:
            await asyncio.to_thread(self.store.finalize_ready, settings.batch_lease_seconds)
        return bool(lines) and len(lines) == room

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


def runner() -> BatchRunner:
    return bentoml.get_current_service().batch_runner


routes = APIRouter()


@routes.post("/v1/files", response_model=FileObject)
async def upload_file(file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]) -> FileObject:
    """Upload a JSONL input file (purpose `batch`)."""
    settings = runner().settings
    if purpose != "batch":
        raise APIError(400, "only purpose=batch is supported", "purpose")
    content = await file.read(settings.batch_max_file_bytes + 1)
    if len(content) > settings.batch_max_file_bytes:
        raise APIError(
            413, f"the file is over {settings.batch_max_file_bytes} bytes", "file", "file_too_large"
        )
    row = await asyncio.to_thread(runner().store.add_file, content, file.filename or "input.jsonl", purpose)
    return FileObject.model_validate(row)


@routes.get("/v1/files", response_model=FileList)
async def list_files(purpose: str | None = None) -> FileList:
    rows = await asyncio.to_thread(runner().store.list_files, purpose)
    return FileList(data=[FileObject.model_validate(row) for row in rows])


async def existing_file(file_id: str) -> dict[str, Any]:
    row = await asyncio.to_thread(runner().store.get_file, file_id)
    if row is None or not runner().store.file_path(file_id).exists():
        raise APIError(404, f"no file {file_id}", "file_id", "not_found")
    return row


@routes.get("/v1/files/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: str) -> FileObject:
    return FileObject.model_validate(await existing_file(file_id))


@routes.get("/v1/files/{file_id}/content")
async def file_content(file_id: str) -> Response:
    await existing_file(file_id)
    # Streamed from disk: an output file can be larger than memory should hold.
    return FileResponse(runner().store.file_path(file_id), media_type="application/jsonl")


@routes.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str) -> FileDeleted:
    await existing_file(file_id)
    return FileDeleted(id=file_id, deleted=await asyncio.to_thread(runner().store.delete_file, file_id))


@routes.post("/v1/batches", response_model=Batch)
async def create_batch(request: BatchCreateRequest) -> Batch:
    """Start a batch over an uploaded file. Bad lines go to the error file; a file that is not JSONL, or
    has more lines than the configured cap, is refused here."""
    row = await existing_file(request.input_file_id)
    if row["purpose"] != "batch":
        raise APIError(400, f"file {request.input_file_id} is not a batch input file", "input_file_id")
    store, settings = runner().store, runner().settings
    try:
        batch = await asyncio.to_thread(
            store.create_batch,
            request.input_file_id,
            request.endpoint,
            request.window_seconds,
            request.completion_window,
            request.metadata,
            settings.batch_max_lines,
        )
    except BadFile as exc:
        raise APIError(400, str(exc), "input_file_id", "invalid_file") from exc
    except FileNotFoundError as exc:  # deleted between the check and the read
        raise APIError(404, f"no file {request.input_file_id}", "input_file_id", "not_found") from exc
    runner().wake()
    return Batch.model_validate(batch)


@routes.get("/v1/batches", response_model=BatchList)
async def list_batches(
    limit: Annotated[int, Query(ge=1, le=100)] = 20, after: str | None = None
) -> BatchList:
    rows = await asyncio.to_thread(runner().store.list_batches, limit + 1, after)
    data = [Batch.model_validate(row) for row in rows[:limit]]
    return BatchList(
        data=data,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
        has_more=len(rows) > limit,
    )


async def existing_batch(batch_id: str) -> dict[str, Any]:
    row = await asyncio.to_thread(runner().store.get_batch, batch_id)
    if row is None:
        raise APIError(404, f"no batch {batch_id}", "batch_id", "not_found")
    return row


@routes.get("/v1/batches/{batch_id}", response_model=Batch)
async def retrieve_batch(batch_id: str) -> Batch:
    return Batch.model_validate(await existing_batch(batch_id))


@routes.post("/v1/batches/{batch_id}/cancel", response_model=Batch)
async def cancel_batch(batch_id: str) -> Batch:
    """Lines not started are settled as cancelled; running ones finish and are kept in the output."""
    await existing_batch(batch_id)
    await asyncio.to_thread(runner().store.end_batch, batch_id, "cancelled")
    runner().wake()
    return Batch.model_validate(await existing_batch(batch_id))
