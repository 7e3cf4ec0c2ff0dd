"""The two databases the batch store runs on, behind one small interface.

SQLite (WAL, a file on local disk) is the embedded default: one server owns it, so lines claimed by
another run of the server were left by one that is gone. PostgreSQL (FNSERVE_BATCH_DATABASE_URL) is
shared by every replica: another owner is a live replica until its lease runs out, and claims skip
the rows other replicas hold (`FOR UPDATE SKIP LOCKED`).

The store writes its SQL once, with `?` placeholders and types both databases read the same way
(BIGINT, DOUBLE PRECISION, TEXT); the few differences are attributes here.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

WAIT_SECONDS = 3  # for a connection from the pool: the longest a batch route waits before its 503
# How long psycopg_pool goes on trying to replace a lost connection (attempts 1 s apart, then it gives up
# until a call asks for one): under WAIT_SECONDS, so that a call made once the database is back finds an
# attempt within its wait, or the pool given up and connecting at once. At 10 s its attempts came 1, 2
# and 4 s apart: a call made once the database was back waited up to 2 s in eight tries, and a gap of
# 4 s is past its wait (a 503); at 2 s each was served within 0.01 s (the Xeon 6/207; README,
# "The database away").
RECONNECT_SECONDS = 2
RETRY_SECONDS = 1.0  # while the database is away: how often one call tries it again
# Besides a lost connection (no SQLSTATE) and class 08 (connection exceptions): the server shutting down,
# crashed, or starting up.
AWAY_STATES = ("57P01", "57P02", "57P03")


class StoreUnavailable(Exception):
    """The database cannot be reached now: a batch route answers 503, the runner waits and tries again."""


class Breaker:
    """Refuses calls at once while the database is known to be away. Without it every batch route and
    runner step waits the pool's seconds for a database that is not there, holding one of asyncio's few
    worker threads (shared with image decoding) the whole time, and a read through HAProxy waits that
    three times over. Only a failed `reachable` probe (a connection of its own, outside the pool) opens
    it: a pool that times out is not proof, since psycopg_pool keeps backing off its reconnection for
    seconds after the database is back. While it is open, one call each `retry_seconds` probes again,
    alone, and the first probe that connects closes it. Written here rather than taken from pybreaker
    (1.4.1): its half-open state lets every call through until one of them ends, so each would wait out
    the pool again, and it counts failures where this needs a probe."""

    def __init__(self, retry_seconds: float, reachable: Callable[[], bool]) -> None:
        self.retry_seconds = retry_seconds
        self._reachable = reachable
        self._lock = threading.Lock()
        self._away_since: float | None = None  # wall-clock time of this outage's first failed probe
        self._probed_at = 0.0  # monotonic time of the last failed probe
        self._probing = False

    @contextmanager
    def guard(self, away: Callable[[Exception], bool]) -> Iterator[None]:
        """Runs the block unless the database is away; `away` tells an outage from a failure of the
        call's own."""
        probe = False
        with self._lock:
            if self._away_since is not None:
                if self._probing or time.monotonic() < self._probed_at + self.retry_seconds:
                    raise self._refusal()
                self._probing = probe = True
        if probe and not self._probe():
            raise self._refusal()
        try:
            yield
        except Exception as exc:
            if away(exc) and self._away_since is None:
                self._probe()
            raise

    def _probe(self) -> bool:
        """Whether the database takes a connection now; the breaker opens or closes by the answer."""
        try:
            reachable = self._reachable()
        except BaseException:  # an interrupted probe settles nothing, and the next call may probe
            with self._lock:
                self._probing = False
            raise
        with self._lock:
            self._probing = False
            if reachable:
                self._away_since = None
            else:
                self._away_since = self._away_since or time.time()
                self._probed_at = time.monotonic()
        return reachable

    def _refusal(self) -> StoreUnavailable:
        since = f"for {time.time() - (self._away_since or time.time()):.0f} s"
        every = f"tried again every {self.retry_seconds:g} s"
        return StoreUnavailable(f"the batch database has been unreachable {since} ({every})")


class Transaction(Protocol):
    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any: ...
    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class Database(Protocol):
    shared: bool  # other servers use it at the same time
    blob: str  # the column type of file bodies
    lock_rows: str  # appended to a SELECT whose rows (of table `{alias}`) this transaction claims
    migration_lock: str  # run first in the transaction that migrates the schema

    def transaction(self) -> Iterator[Transaction]: ...
    def rows(self, sql: str, *args: Any) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


def named(cursor: Any) -> list[dict[str, Any]]:
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


class SQLiteDatabase:
    shared = False
    blob = "BLOB"
    lock_rows = ""  # BEGIN IMMEDIATE already serializes writers
    migration_lock = "SELECT 1"

    def __init__(self, path: Path) -> None:
        # One connection per process, used from worker threads in turn.
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process (what the tests check), not a power cut.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=10000")

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite has rolled back already after some errors
                    self._db.execute("ROLLBACK")
                raise

    def rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self._lock:
            return named(self._db.execute(sql, args))

    def close(self) -> None:
        self._db.close()


class PostgresTransaction:
    """psycopg's cursor under the store's `?` placeholders."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection

    @staticmethod
    def sql(text: str) -> str:
        return text.replace("%", "%%").replace("?", "%s")

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self._connection.execute(self.sql(sql), args)  # never None: `%%` is unescaped then

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._connection.cursor().executemany(self.sql(sql), rows)


class PostgresDatabase:
    shared = True
    blob = "BYTEA"
    lock_rows = " FOR UPDATE OF {alias} SKIP LOCKED"
    migration_lock = "SELECT pg_advisory_xact_lock(7406)"  # any fixed key: fnserve's schema

    def __init__(self, url: str, retry_seconds: float = RETRY_SECONDS) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        self._errors = (psycopg.OperationalError, psycopg.InterfaceError)
        self._url = url
        # Client-side binding: the store's SQL compares parameters with NULL (`? IS NULL`), which
        # server-side binding cannot type. A short connect timeout: a route waits seconds at most for
        # a database that went away before it answers 503.
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=16,  # connections open as needed: one per store call in flight (worker threads)
            timeout=WAIT_SECONDS,
            # A failed reconnection gives up soon, so that the next request connects at once: psycopg's
            # default backs off for up to 5 minutes, answering 503 long after the database is back.
            reconnect_timeout=RECONNECT_SECONDS,
            kwargs={"autocommit": True, "cursor_factory": psycopg.ClientCursor, "connect_timeout": 3},
            check=ConnectionPool.check_connection,  # a connection from before a restart is replaced
            open=False,
        )
        self._pool.open(wait=False)
        self.breaker = Breaker(retry_seconds, self._reachable)

    def _reachable(self) -> bool:
        import psycopg

        try:
            psycopg.connect(self._url, connect_timeout=WAIT_SECONDS).close()
        except psycopg.Error:
            return False
        return True

    def _away(self, exc: Exception) -> bool:
        """The database may be gone (stopped, unreachable, restarting), not merely failing this call."""
        from psycopg_pool import PoolTimeout

        if isinstance(exc, PoolTimeout):  # or every connection busy: the probe tells
            return True
        if isinstance(exc, self._errors):
            state = exc.sqlstate or ""
            return not state or state.startswith("08") or state in AWAY_STATES
        return False

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        from psycopg_pool import PoolTimeout

        try:
            with self.breaker.guard(self._away), self._pool.connection() as connection:
                yield connection
        except PoolTimeout as exc:
            busy = "unreachable, or every connection busy"
            message = f"the batch database did not answer in {WAIT_SECONDS} s ({busy})"
            raise StoreUnavailable(message) from exc
        except self._errors as exc:
            raise StoreUnavailable(f"the batch database failed: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._connection() as connection, connection.transaction():
            yield PostgresTransaction(connection)

    def rows(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        with self._connection() as connection:
            return named(connection.execute(PostgresTransaction.sql(sql), args))

    def close(self) -> None:
        self._pool.close()


def open_database(url: str | None, root: Path) -> Database:
    if url:
        return PostgresDatabase(url)
    root.mkdir(parents=True, exist_ok=True)
    return SQLiteDatabase(root / "batches.db")
