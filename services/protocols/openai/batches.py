"""The OpenAI Files and Batches routes, onto the batch runner and its store (services/jobs/)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import StreamingResponse

from services.functions.api import current
from services.jobs.runner import BatchRunner
from services.jobs.store import BadFile, storable
from services.protocols.openai.protocol import (
    APIError,
    Batch,
    BatchCreateRequest,
    BatchList,
    FileDeleted,
    FileList,
    FileObject,
)


def runner() -> BatchRunner:
    return current().jobs


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
    filename = file.filename or "input.jsonl"
    if not storable(filename):
        raise APIError(400, "the file name must be text without NUL characters", "file")
    row = await asyncio.to_thread(runner().store.add_file, content, filename, purpose)
    return FileObject.model_validate(row)


@routes.get("/v1/files", response_model=FileList)
async def list_files(
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
    after: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> FileList:
    """Paged as OpenAI pages it: the openai client's iterator asks for the page after the last id for as
    long as `has_more` is true, and took a page without it for more to come."""
    store = runner().store
    rows = await asyncio.to_thread(store.list_files, purpose or None, limit + 1, after, order == "asc")
    return FileList(**paged([FileObject.model_validate(row) for row in rows[:limit]], len(rows) > limit))


async def existing_file(file_id: str) -> dict[str, Any]:
    row = await asyncio.to_thread(runner().store.get_file, file_id)
    if row is None:
        raise APIError(404, f"no file {file_id}", "file_id", "not_found")
    return row


@routes.get("/v1/files/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: str) -> FileObject:
    return FileObject.model_validate(await existing_file(file_id))


@routes.get("/v1/files/{file_id}/content")
async def file_content(file_id: str) -> StreamingResponse:
    row = await existing_file(file_id)
    # Streamed a few chunks at a time (starlette runs the iterator in its thread pool); the first read
    # here, so that a database gone since the check still gets its 503.
    chunks = runner().store.read_file(file_id)
    first = await asyncio.to_thread(next, chunks, b"")
    return StreamingResponse(
        itertools.chain([first], chunks),
        media_type="application/jsonl",
        headers={"content-length": str(row["bytes"])},
    )


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
    rows, more = await asyncio.to_thread(runner().store.list_batches, limit, after)
    return BatchList(**paged([Batch.model_validate(row) for row in rows], more))


def paged(data: list[Any], more: bool) -> dict[str, Any]:
    """A list page's fields."""
    return {
        "data": data,
        "first_id": data[0].id if data else None,
        "last_id": data[-1].id if data else None,
        "has_more": more,
    }


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
