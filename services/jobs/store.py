"""The durable part of batch jobs: files, batches and per-line state in a database (services/jobs/db.py):
SQLite by default, PostgreSQL when replicas share the store.

Every input line is one row, committed as it changes state (pending -> running -> done or failed), so a
server killed mid-job resumes where it stopped: lines claimed by a server that is gone are claimed again
(by another replica once their lease runs out), and the output and error files are written once, from the
rows, when no line is left. That gives every input line exactly one output or error line.

File bodies live in the database too, in 1 MiB chunks: every replica reads every upload and result, and
a cluster that already runs PostgreSQL needs no object store beside it. Written on the standard
library's sqlite3 and psycopg: BentoML's own task store is deleted at every start of `bentoml serve`
(../shared/FIELD-NOTES.md).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from services.functions.hardware import server_running
from services.jobs.db import Database, StoreUnavailable, Transaction, open_database

logger = logging.getLogger("bentoml.fnserve.batch")

# Each entry moves the schema one version on; the store runs those a database has not seen, at start.
MIGRATIONS = (
    """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, purpose TEXT NOT NULL, filename TEXT NOT NULL, bytes BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, endpoint TEXT NOT NULL, input_file_id TEXT NOT NULL,
    completion_window TEXT NOT NULL, metadata TEXT, status TEXT NOT NULL, ending TEXT,
    created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL, in_progress_at BIGINT,
    finalizing_at BIGINT, completed_at BIGINT, cancelling_at BIGINT, cancelled_at BIGINT,
    expired_at BIGINT, finalizer TEXT, output_file_id TEXT, error_file_id TEXT
);
CREATE TABLE IF NOT EXISTS lines (
    batch_id TEXT NOT NULL, idx INTEGER NOT NULL, custom_id TEXT, body TEXT, state TEXT NOT NULL,
    owner TEXT, claimed_at DOUBLE PRECISION, attempts INTEGER NOT NULL DEFAULT 0, result TEXT,
    PRIMARY KEY (batch_id, idx)
);
CREATE INDEX IF NOT EXISTS lines_by_state ON lines (state, batch_id)
""",
    # File bodies move from the local disk into the database.
    """
CREATE TABLE IF NOT EXISTS file_chunks (
    file_id TEXT NOT NULL, seq INTEGER NOT NULL, data {blob} NOT NULL, PRIMARY KEY (file_id, seq)
)
""",
)
CHUNK = 2**20
# A line claimed this many times already whose last claim ended with its worker dead (it is still
# `running`, the claim stale) may be what kills it. Such lines run one at a time per worker (BatchRunner),
# so that a line that kills its worker every time is not given up with the neighbours claimed with it
# each time. A line that failed (a 5xx) was put back `pending`: it is not one.
SUSPECT_AFTER = 2
ROWS_PER_INSERT = 500

KINDS = ("output", "error")
# The batches' columns set at creation, and those set later.
CREATED = (
    "id", "endpoint", "input_file_id", "completion_window", "metadata", "status", "ending", "created_at",
    "expires_at", "in_progress_at",
)  # fmt: skip
LATER = (
    "finalizing_at", "completed_at", "cancelling_at", "cancelled_at", "expired_at", "finalizer",
    "output_file_id", "error_file_id",
)  # fmt: skip
FINAL = ("completed", "failed", "expired", "cancelled")
# What a batch becomes when its last line is settled, by how it was ending.
FINAL_STATUS = {None: "completed", "cancelled": "cancelled", "expired": "expired"}


class BadFile(ValueError):
    """The input file cannot be a batch (rejected at creation, with this message)."""


@dataclass(frozen=True)
class Line:
    batch_id: str
    idx: int
    custom_id: str
    body: dict[str, Any]
    endpoint: str
    attempts: int  # this one included: a line that keeps failing (or killing its server) is given up on


@dataclass(frozen=True)
class Outcome:
    line: Line
    ok: bool
    result: str  # JSON: the output line's `response` (ok), or its `error` with the `response` if any


# Ids made since this time begin with their creation second (8 hex digits), so that a page after a row
# deleted meanwhile still knows where it was (the openai client's iterator, deleting as it goes).
TIMED_IDS_SINCE = 1_796_688_000  # 2026-12-08 UTC; older ids are random throughout


def new_id(prefix: str, created: int) -> str:
    """`prefix`, then 24 hex digits as before: the creation second, then 16 random ones."""
    return f"{prefix}_{created:08x}{secrets.token_hex(8)}"


def created_in(identifier: str) -> int | None:
    """The creation second a `new_id` id holds; None for an id that cannot be one of them (an older,
    random id reads as a time outside the span since, almost always)."""
    _, _, digits = identifier.rpartition("_")
    if len(digits) != 24 or not all(c in "0123456789abcdef" for c in digits):
        return None
    created = int(digits[:8], 16)
    return created if TIMED_IDS_SINCE <= created <= time.time() + 60 else None


def parse_line(raw: str, endpoint: str) -> tuple[str, dict[str, Any] | None, dict[str, Any] | None]:
    """(custom_id, request body, None) for a good line, or (custom_id, None, error) for a bad one."""
    try:  # orjson: strict where the json module takes NaN, lone surrogates and any depth (a RecursionError);
        line = orjson.loads(raw)  # and written back as orjson writes it, which stops at 255 levels
        orjson.dumps(line)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError) as exc:
        found = re.search(r'"custom_id"\s*:\s*"([^"\\]*)"', raw)  # still worth naming the line by it
        return (
            found[1] if found and storable(found[1]) else "",
            None,
            {"code": "invalid_json", "message": f"not JSON: {exc}"},
        )
    if not isinstance(line, dict):
        return "", None, {"code": "invalid_request", "message": "the line is not a JSON object"}
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "", None, {"code": "missing_custom_id", "message": "custom_id must be a non-empty string"}
    if not storable(custom_id):
        message = "custom_id must be text without NUL characters or unpaired surrogates"
        return "", None, {"code": "invalid_custom_id", "message": message}
    if line.get("method", "POST") != "POST":
        return custom_id, None, {"code": "invalid_method", "message": "method must be POST"}
    if line.get("url") != endpoint:
        message = f"url is {line.get('url')!r}, but this batch's endpoint is {endpoint}"
        return custom_id, None, {"code": "invalid_url", "message": message}
    if not isinstance(line.get("body"), dict):
        return custom_id, None, {"code": "invalid_body", "message": "body must be a JSON object"}
    return custom_id, line["body"], None


def storable(text: str) -> bool:
    """Text both databases hold: PostgreSQL refuses NUL in text, and neither takes lone surrogates."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def ended_error(ending: str) -> str:
    return json.dumps({"code": f"batch_{ending}", "message": f"the batch was {ending} before this line ran"})


def value_pages(rows: list[tuple[Any, ...]]) -> Iterator[tuple[str, list[Any]]]:
    """Rows as the placeholders of a VALUES list and their values, a page of ROWS_PER_INSERT at a time:
    one statement a page instead of one a row."""
    for first in range(0, len(rows), ROWS_PER_INSERT):
        page = rows[first : first + ROWS_PER_INSERT]
        row = "(" + ", ".join("?" * len(page[0])) + ")"
        yield ", ".join([row] * len(page)), [value for each in page for value in each]


def update_lines(
    db: Transaction, assignments: str, rows: list[tuple[Any, ...]], condition: str = "", args: tuple = ()
) -> None:
    """Many lines, each with values of its own (see `value_pages`): a statement per line cost a round
    trip each to PostgreSQL, most of a claim's time there. Each row is (values..., batch_id,
    idx); `assignments` reads the values as v.column1, v.column2, ... (both databases' names for the
    columns of a VALUES list)."""
    width = len(rows[0]) if rows else 0
    for values, flat in value_pages(rows):
        db.execute(
            f"UPDATE lines SET {assignments} FROM (VALUES {values}) AS v"
            f" WHERE lines.batch_id = v.column{width - 1} AND lines.idx = v.column{width}{condition}",
            [*flat, *args],
        )


class ChunkWriter:
    """A result file written as it is produced, one chunk per commit; it becomes a file only when its
    batch's finalizing registers it."""

    def __init__(self, store: BatchStore, file_id: str) -> None:
        self.store = store
        self.file_id = file_id
        self.size = 0
        self._buffer = bytearray()
        self._next = 0

    def write(self, text: str) -> None:
        data = text.encode()
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            with self.store._transaction() as db:
                self._next = self.store._write_chunks(db, self.file_id, bytes(self._buffer), self._next)
            self._buffer.clear()

    def discard(self) -> None:
        with self.store._transaction() as db:
            db.execute("DELETE FROM file_chunks WHERE file_id = ?", (self.file_id,))


def cursor_page(table: str, after: str | None, ascending: bool) -> tuple[str, tuple[Any, ...], str]:
    """The WHERE condition (and its arguments) and the ORDER BY of a page of `table` in creation order
    (ties by id) after the row `after`, a cursor; the condition holds for every row if it is None. A
    cursor whose row was deleted is placed by the creation time its id holds; one that holds none
    matches no row (an empty last page), as before."""
    before = ">" if ascending else "<"
    direction = "ASC" if ascending else "DESC"
    created = f"coalesce((SELECT created_at FROM {table} WHERE id = ?), ?)"
    where = f"(? IS NULL OR created_at {before} {created} OR (created_at = {created} AND id {before} ?))"
    placed = created_in(after) if after is not None else None
    return (
        where,
        (after, after, placed, after, placed, after),
        f"ORDER BY created_at {direction}, id {direction}",
    )


class BatchStore:
    def __init__(
        self, root: Path, instance: str, database_url: str | None = None, worker: str | None = None
    ) -> None:
        """`instance` names the running server (`server_instance`); each worker process claims as
        `instance/pid`. On a store of its own (SQLite), lines claimed by another server run that has
        stopped are claimed again at once; lines of one still running on this host (a second server
        started on the same folder) only once their lease runs out, as on a shared store (PostgreSQL),
        where every claim waits for its lease, as for a worker that died inside a live server. `worker`
        is the process id unless given; the host's name comes first, since containers on different
        machines can share PIDs."""
        self.instance = f"{socket.gethostname()}/{instance}"
        self.owner = f"{self.instance}/{worker or os.getpid()}"
        self.root = root
        self.db: Database = open_database(database_url, root)
        self._migrated = False
        try:
            self._migrate()
        except StoreUnavailable as exc:  # the server starts anyway; batch routes answer 503 meanwhile
            logger.warning("%s; the schema is checked again on the next batch request", exc)

    def close(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        imported: list[Path] = []
        with self.db.transaction() as db:
            db.execute(self.db.migration_lock)  # replicas starting together migrate one at a time
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            rows = db.execute("SELECT max(version) FROM schema_version").fetchall()
            version = rows[0][0] or 0
            for number, script in enumerate(MIGRATIONS[version:], version + 1):
                for statement in script.format(blob=self.db.blob).split(";"):
                    if statement.strip():
                        db.execute(statement)
                if number == 2:
                    imported = self._import_disk_files(db)
                db.execute("INSERT INTO schema_version VALUES (?)", (number,))
        for path in imported:  # only once their chunks are committed
            path.unlink()
        self._migrated = True

    def _import_disk_files(self, db: Transaction) -> list[Path]:
        """Stores made before version 2 kept file bodies in `root/files/`; returns those imported."""
        folder = self.root / "files"
        imported = []
        for (file_id,) in db.execute("SELECT id FROM files").fetchall():
            path = folder / file_id
            if path.exists():
                self._write_chunks(db, file_id, path.read_bytes())
                imported.append(path)
        return imported

    @contextmanager
    def _transaction(self) -> Iterator[Transaction]:
        if not self._migrated:
            self._migrate()
        with self.db.transaction() as db:
            yield db

    def _rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        """A read. Text no database can hold (a caller's id with a NUL) matches no row: PostgreSQL would
        refuse the query, which answered 500 for what can only be a 404 or an empty list."""
        if any(isinstance(arg, str) and not storable(arg) for arg in args):
            return []
        if not self._migrated:
            self._migrate()
        return self.db.rows(sql, *args)

    # Files

    @staticmethod
    def _write_chunks(db: Transaction, file_id: str, content: bytes, first: int = 0) -> int:
        """Returns the next chunk's number."""
        chunks = [content[i : i + CHUNK] for i in range(0, len(content), CHUNK)]
        db.executemany(
            "INSERT INTO file_chunks VALUES (?, ?, ?)",
            [(file_id, first + n, chunk) for n, chunk in enumerate(chunks)],
        )
        return first + len(chunks)

    def add_file(self, content: bytes, filename: str, purpose: str) -> dict:
        created = int(time.time())
        row = {"id": new_id("file", created), "purpose": purpose, "filename": filename, "bytes": len(content)}
        row["created_at"] = created
        with self._transaction() as db:  # the row and its body appear together
            self._write_chunks(db, row["id"], content)
            db.execute("INSERT INTO files VALUES (?, ?, ?, ?, ?)", tuple(row.values()))
        return row  # as committed (see create_batch)

    def get_file(self, file_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM files WHERE id = ?", file_id)
        return rows[0] if rows else None

    def read_file(self, file_id: str) -> Iterator[bytes]:
        """The body, a few chunks per query: an output file can be larger than memory should hold."""
        seq = 0
        while page := self._rows(
            "SELECT seq, data FROM file_chunks WHERE file_id = ? AND seq >= ? ORDER BY seq LIMIT 8",
            file_id,
            seq,
        ):
            for row in page:
                yield bytes(row["data"])
            seq = page[-1]["seq"] + 1

    def list_files(
        self,
        purpose: str | None = None,
        limit: int = 10_000,
        after: str | None = None,
        ascending: bool = False,
    ) -> list[dict]:
        """A page of files, newest first unless `ascending`, after the file `after` (a cursor)."""
        where, args, order = cursor_page("files", after, ascending)
        return self._rows(
            f"SELECT * FROM files WHERE (? IS NULL OR purpose = ?) AND {where} {order} LIMIT ?",
            purpose, purpose, *args, limit,
        )  # fmt: skip

    def delete_file(self, file_id: str) -> bool:
        if not storable(file_id):  # as in _rows, for a write
            return False
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
            db.execute("DELETE FROM file_chunks WHERE file_id = ?", (file_id,))
        return bool(deleted)

    # Batches

    def create_batch(
        self,
        file_id: str,
        endpoint: str,
        window_seconds: int,
        window: str,
        metadata: dict | None,
        max_lines: int,
    ) -> dict:
        """Splits the input file into lines. Bad lines are settled at once as errors; a file that is not
        JSONL at all raises BadFile."""
        if (file := self.get_file(file_id)) is None:
            raise FileNotFoundError(file_id)
        content = b"".join(self.read_file(file_id))  # a few chunks per query, unlocked:
        if len(content) != file["bytes"]:  # a file deleted meanwhile is not taken as its first part
            raise FileNotFoundError(file_id)
        try:
            # utf-8-sig: a byte-order mark (Windows tools write one) is not part of the first line
            text = content.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise BadFile(f"the input file is not UTF-8 text: {exc}") from exc
        # "\n" only: splitlines() would also cut at U+2028 and the like, which JSON strings may hold.
        raws = [raw.removesuffix("\r") for raw in text.split("\n") if raw.strip()]
        if not raws:
            raise BadFile("the input file has no lines")
        if len(raws) > max_lines:
            raise BadFile(f"the input file has {len(raws)} lines; a batch takes at most {max_lines}")
        parsed = [parse_line(raw, endpoint) for raw in raws]
        if all(body is None and error["code"] == "invalid_json" for _, body, error in parsed):  # type: ignore[index]
            raise BadFile("the input file is not JSONL: no line of it is JSON")
        now = int(time.time())
        batch_id = new_id("batch", now)
        rows = []
        seen: set[str] = set()
        for idx, (custom_id, body, error) in enumerate(parsed):
            if error is None and custom_id in seen:
                error = {"code": "duplicate_custom_id", "message": f"custom_id {custom_id!r} is used twice"}
            seen.add(custom_id)
            if error is None:
                rows.append((batch_id, idx, custom_id, json.dumps(body), "pending", None, None, 0, None))
            else:
                rows.append((batch_id, idx, custom_id, None, "failed", None, None, 0, json.dumps(error)))
        batch = (
            batch_id, endpoint, file_id, window, json.dumps(metadata) if metadata else None, "in_progress",
            None, now, now + window_seconds, now,
        )  # fmt: skip
        with self._transaction() as db:
            db.execute(
                f"INSERT INTO batches ({', '.join(CREATED)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", batch
            )
            for values, flat in value_pages(rows):
                db.execute(f"INSERT INTO lines VALUES {values}", flat)
        # What was committed, not read back: a database lost now must not turn a created batch into a
        # 503 that the caller (or a load balancer) would retry into a second batch.
        created = {**dict.fromkeys(LATER), **dict(zip(CREATED, batch, strict=True)), "metadata": metadata}
        failed = sum(row[4] == "failed" for row in rows)
        return {**created, "request_counts": {"total": len(rows), "completed": 0, "failed": failed}}

    def get_batch(self, batch_id: str) -> dict | None:
        rows = self._rows("SELECT * FROM batches WHERE id = ?", batch_id)
        if not rows:
            return None
        batch = rows[0]
        batch["metadata"] = json.loads(batch["metadata"]) if batch["metadata"] else None
        counts = dict(
            (row["state"], row["n"])
            for row in self._rows(
                "SELECT state, count(*) AS n FROM lines WHERE batch_id = ? GROUP BY state", batch_id
            )
        )
        batch["request_counts"] = {
            "total": sum(counts.values()),
            "completed": counts.get("done", 0),
            "failed": counts.get("failed", 0),
        }
        return batch

    def list_batches(self, limit: int, after: str | None) -> tuple[list[dict], bool]:
        """A page of batches, newest first, after the batch `after` (a cursor), and whether more follow."""
        where, args, order = cursor_page("batches", after, ascending=False)
        ids = self._rows(f"SELECT id FROM batches WHERE {where} {order} LIMIT ?", *args, limit + 1)
        # A batch the retention deleted between the two reads is left out, not answered as None; more
        # follow by the first read (counted after the second, a deletion had ended the listing).
        page = [batch for row in ids[:limit] if (batch := self.get_batch(row["id"])) is not None]
        return page, len(ids) > limit

    def end_batch(self, batch_id: str, ending: str, now: float | None = None) -> bool:
        """Cancel or expire: lines not yet started are settled as errors that say why; lines running
        finish and are kept. False if the batch was already ending or final."""
        if not storable(batch_id):
            return False
        now = int(now or time.time())
        error = ended_error(ending)
        status = "cancelling" if ending == "cancelled" else "in_progress"
        stamp = "cancelling_at" if ending == "cancelled" else "expired_at"
        with self._transaction() as db:
            changed = db.execute(
                f"UPDATE batches SET ending = ?, status = ?, {stamp} = ?"
                " WHERE id = ? AND status = 'in_progress' AND ending IS NULL",
                (ending, status, now, batch_id),
            ).rowcount
            if changed:
                db.execute(
                    "UPDATE lines SET state = 'failed', result = ? WHERE batch_id = ? AND state = 'pending'",
                    (error, batch_id),
                )
        return bool(changed)

    def endings(self) -> dict[str, str]:
        """Batches being cancelled or expired, and which: lines of theirs already claimed are not run."""
        rows = self._rows(
            "SELECT id, ending FROM batches WHERE ending IS NOT NULL AND status NOT IN (?, ?, ?, ?)", *FINAL
        )
        return {row["id"]: row["ending"] for row in rows}

    def expire_overdue(self, now: float | None = None) -> list[str]:
        now = now or time.time()
        overdue = self._rows(
            "SELECT id FROM batches WHERE status = 'in_progress' AND ending IS NULL AND expires_at < ?", now
        )
        return [row["id"] for row in overdue if self.end_batch(row["id"], "expired", now)]

    # Lines

    def claim(
        self,
        limit: int,
        lease_seconds: float,
        max_attempts: int,
        endpoints: tuple[str, ...] = (),
        among: bool = True,
        suspects: bool | None = None,
    ) -> list[Line]:
        """Up to `limit` lines to run, oldest batch first, of batches whose endpoint is (`among`) or is
        not among `endpoints` (any endpoint if none is named): pending ones, and running ones whose
        server is gone or whose lease ran out. A line claimed `max_attempts` times already (it failed,
        or its worker died running it, each time) is settled as failed instead. `suspects` True takes
        only lines claimed SUSPECT_AFTER times or more whose last worker died running them, False only
        the others, None either; a line due to be given up is not a suspect."""
        if limit <= 0:
            return []
        now = time.time()
        stale, args = self._stale("l.owner", "l.claimed_at", now - lease_seconds)
        kind = (
            f"b.endpoint {'' if among else 'NOT '}IN ({', '.join('?' * len(endpoints))})"
            if endpoints
            else "1 = 1"
        )
        if suspects is not None:
            suspect = (
                f"l.state = 'running' AND l.attempts BETWEEN {SUSPECT_AFTER} AND {int(max_attempts) - 1}"
            )
            kind += f" AND {'' if suspects else 'NOT '}({suspect})"
        with self._transaction() as db:
            rows = db.execute(
                "SELECT l.batch_id, l.idx, l.custom_id, l.body, b.endpoint, l.attempts + 1 FROM lines l"
                " JOIN batches b ON b.id = l.batch_id"
                f" WHERE b.status IN ('in_progress', 'cancelling') AND {kind} AND (l.state = 'pending'"
                f"   OR (l.state = 'running' AND {stale}))"
                " ORDER BY b.created_at, l.idx LIMIT ?" + self.db.lock_rows.format(alias="l"),
                (*endpoints, *args, limit),
            ).fetchall()
            given_up = [row for row in rows if row[5] > max_attempts]
            rows = [row for row in rows if row[5] <= max_attempts]
            error = json.dumps({"code": "server_error", "message": f"given up after {max_attempts} attempts"})
            update_lines(db, "state = 'failed', result = v.column1", [(error, *row[:2]) for row in given_up])
            update_lines(
                db,
                "state = 'running', owner = v.column1, claimed_at = v.column2, attempts = attempts + 1",
                [(self.owner, now, *row[:2]) for row in rows],
            )
        return [Line(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5]) for row in rows]

    def _stale(self, owner: str, since: str, cutoff: float) -> tuple[str, tuple[Any, ...]]:
        """The SQL condition (and its arguments) for a claim that another may take over: its lease ran
        out, or, on a store of this server's own, it was made by a server run that is gone."""
        gone = [] if self.db.shared else self._gone_runs()
        condition = " OR ".join([f"{since} < ?", *[f"{owner} LIKE ?" for _ in gone]])
        return f"({condition})", (cutoff, *[f"{run}/%" for run in gone])

    def _gone_runs(self) -> list[str]:
        """The other server runs that hold claims in this store and have stopped. A run on another host
        (a folder shared between containers) cannot be seen, and counts as stopped."""
        claims = self._rows(
            "SELECT owner FROM lines WHERE state = 'running'"
            " UNION SELECT finalizer FROM batches WHERE status = 'finalizing'"
        )
        runs = {claim["owner"].rpartition("/")[0] for claim in claims if claim["owner"]}
        host = f"{socket.gethostname()}/"
        return sorted(
            run
            for run in runs - {self.instance}
            if not (run.startswith(host) and server_running(run.removeprefix(host)))
        )

    def renew(self, lines: list[Line]) -> None:
        """Extend the lease of lines this worker is still running (or holding for a free slot)."""
        with self._transaction() as db:
            update_lines(
                db,
                "claimed_at = v.column1",
                [(time.time(), line.batch_id, line.idx) for line in lines],
                " AND state = 'running' AND owner = ?",
                (self.owner,),
            )

    def release(self, line: Line) -> None:
        """Put a line that failed for a passing reason back in the queue."""
        with self._transaction() as db:
            db.execute(
                "UPDATE lines SET state = 'pending', owner = NULL WHERE batch_id = ? AND idx = ?"
                " AND state = 'running' AND owner = ?",
                (line.batch_id, line.idx, self.owner),
            )

    def hand_back(self, lines: list[Line]) -> None:
        """Lines this worker stopped unfinished as its server stops: pending again at once, with the
        attempt their claim counted given back (a server that stops in order is no fault of theirs).
        Lines recorded or claimed by another meanwhile are left as they are."""
        with self._transaction() as db:
            update_lines(
                db,
                "state = 'pending', owner = NULL, attempts = attempts - 1",
                [(line.batch_id, line.idx) for line in lines],
                " AND state = 'running' AND owner = ?",
                (self.owner,),
            )

    def settle(self, outcomes: list[Outcome]) -> None:
        """Record finished lines, in one commit. Only a line still claimed by this worker is written, so
        a line claimed again after a lease ran out is recorded once."""
        with self._transaction() as db:
            update_lines(
                db,
                "state = v.column1, result = v.column2",
                [("done" if o.ok else "failed", o.result, o.line.batch_id, o.line.idx) for o in outcomes],
                " AND state = 'running' AND owner = ?",
                (self.owner,),
            )

    def finalize_ready(self, lease_seconds: float) -> list[str]:
        """Write the output and error files of the oldest batch with no line left to run, and mark it
        final (one a call: each holds its claim on the batch while it writes; the runner renews its lines'
        claims meanwhile, on a timer of its own). A batch left half-finalized by a server that is gone is
        finalized again; only the attempt that still holds the batch when it is done registers its files."""
        now = int(time.time())
        stale, args = self._stale("finalizer", "finalizing_at", now - lease_seconds)
        with self._transaction() as db:
            ready = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM batches b WHERE (status IN ('in_progress', 'cancelling')"
                    f"   OR (status = 'finalizing' AND {stale}))"
                    " AND NOT EXISTS (SELECT 1 FROM lines WHERE batch_id = b.id"
                    "   AND state IN ('pending', 'running')) ORDER BY b.created_at LIMIT 1"
                    + self.db.lock_rows.format(alias="b"),
                    args,
                ).fetchall()
            ]
            db.executemany(
                "UPDATE batches SET status = 'finalizing', finalizing_at = ?, finalizer = ? WHERE id = ?",
                [(now, self.owner, batch_id) for batch_id in ready],
            )
        for batch_id in ready:
            self._finalize(batch_id)
        return ready

    def _finalize(self, batch_id: str) -> None:
        """Streams the rows into the two files a page at a time: a batch's results can be far larger
        than memory should hold at once."""
        short = batch_id.removeprefix("batch_")
        files = {kind: ChunkWriter(self, f"file-{kind}-{short}-{secrets.token_hex(4)}") for kind in KINDS}
        after = -1
        while page := self._rows(
            "SELECT idx, custom_id, state, result FROM lines WHERE batch_id = ? AND idx > ?"
            " ORDER BY idx LIMIT 1000",
            batch_id, after,
        ):  # fmt: skip
            for row in page:
                head = json.dumps({"id": f"batch_req_{short}_{row['idx']}", "custom_id": row["custom_id"]})
                if row["state"] == "done":  # spliced as text: re-encoding its floats cost more than the run
                    files["output"].write(f'{head[:-1]}, "response": {row["result"]}, "error": null}}\n')
                else:
                    error = json.loads(row["result"])
                    response = error.pop("response", None)
                    files["error"].write(
                        json.dumps({**json.loads(head), "response": response, "error": error})
                    )
                    files["error"].write("\n")
            after = page[-1]["idx"]
            with self._transaction() as db:  # still at it: the claim on the batch is renewed a page at a time
                db.execute(
                    "UPDATE batches SET finalizing_at = ? WHERE id = ? AND finalizer = ?",
                    (int(time.time()), batch_id, self.owner),
                )
        for writer in files.values():
            writer.flush()
        ending = self._rows("SELECT ending FROM batches WHERE id = ?", batch_id)[0]["ending"]
        status = FINAL_STATUS[ending]
        stamp = "completed_at" if status == "completed" else f"{status}_at"
        written = {kind: writer for kind, writer in files.items() if writer.size}
        with self._transaction() as db:
            held = db.execute(
                f"UPDATE batches SET status = ?, {stamp} = coalesce({stamp}, ?), output_file_id = ?,"
                " error_file_id = ? WHERE id = ? AND status = 'finalizing' AND finalizer = ?",
                (
                    status, int(time.time()), getattr(written.get("output"), "file_id", None),
                    getattr(written.get("error"), "file_id", None), batch_id, self.owner,
                ),
            ).rowcount  # fmt: skip
            for kind, writer in written.items():
                if held:
                    db.execute(
                        "INSERT INTO files VALUES (?, ?, ?, ?, ?)",
                        (
                            writer.file_id,
                            f"batch_{kind}",
                            f"{batch_id}_{kind}.jsonl",
                            writer.size,
                            int(time.time()),
                        ),
                    )
        for writer in files.values():
            if not held or not writer.size:
                writer.discard()

    def has_work(self) -> bool:
        rows = self._rows(
            "SELECT 1 AS x FROM batches WHERE status IN ('in_progress', 'cancelling', 'finalizing') LIMIT 1"
        )
        return bool(rows)

    # Retention

    def clean_up(self, retention_seconds: float, now: float | None = None) -> int:
        """Delete batches final for longer than the retention time, with their lines and files, and files
        older than it that no unfinished batch reads. Returns the number of batches deleted."""
        cutoff = (now or time.time()) - retention_seconds
        old = self._rows(
            "SELECT id, input_file_id, output_file_id, error_file_id FROM batches"
            " WHERE status IN (?, ?, ?, ?)"
            " AND coalesce(completed_at, cancelled_at, expired_at, created_at) < ?",
            *FINAL, cutoff,
        )  # fmt: skip
        files = {f for row in old for f in (row["output_file_id"], row["error_file_id"]) if f}
        files |= {
            row["id"]
            for row in self._rows(
                "SELECT id FROM files f WHERE created_at < ? AND NOT EXISTS (SELECT 1 FROM batches"
                " WHERE input_file_id = f.id AND status NOT IN (?, ?, ?, ?))",
                cutoff,
                *FINAL,
            )  # fmt: skip
        }
        with self._transaction() as db:
            for row in old:
                db.execute("DELETE FROM lines WHERE batch_id = ?", (row["id"],))
                db.execute("DELETE FROM batches WHERE id = ?", (row["id"],))
                # Bodies an interrupted finalizing left without a file row.
                short = row["id"].removeprefix("batch_")
                db.execute("DELETE FROM file_chunks WHERE file_id LIKE ?", (f"file-%-{short}-%",))
        for file_id in files:
            self.delete_file(file_id)
        return len(old)
