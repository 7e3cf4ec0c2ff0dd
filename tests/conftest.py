"""Session fixtures: one real embedding server for the whole run, and a real PostgreSQL."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from deploy.cluster.parts import Postgres, temporary_postgres
from services.jobs.store import BatchStore
from tests.server import (
    BATCH_MAX_FILE_BYTES,
    CACHES_OFF,
    IMAGE_MAX_BYTES,
    IMAGE_MAX_PIXELS,
    KEYS,
    MAX_BODY,
    ONE_WORKER,
    free_port,
    http_client,
    serve,
)

# Admission by time refuses what would wait past a target in seconds, so on a slow or busy machine it
# would refuse requests a test expects served. The test servers inherit targets out of reach; the
# tests of admission by time (tests/test_spike.py) tighten them with each request's own deadline.
for variable in (
    "FNSERVE_EMBEDDING_MAX_WAIT_SECONDS",
    "FNSERVE_IMAGE_MAX_WAIT_SECONDS",
    "FNSERVE_GENERATION_MAX_WAIT_SECONDS",
):
    os.environ.setdefault(variable, "3600")


@pytest.fixture(scope="session")
def server() -> Iterator[str]:
    """Default settings but two: fp32, because the tests compare served text with transformers' exactly
    and bf16 greedy output can depend on what else is in the batch; and a cap on batch files that a
    test can reach. The batch tests run their jobs here too, each to its end."""
    env = {"FNSERVE_GENERATION_DTYPE": "float32", "FNSERVE_BATCH_MAX_FILE_BYTES": str(BATCH_MAX_FILE_BYTES)}
    with serve(env=env) as url:
        yield url


@pytest.fixture(scope="session")
def keyed_server() -> Iterator[tuple[str, str]]:
    """API keys required, bodies capped and requests traced (the admission tests), fp32 and no caches
    (the OIP tests compare protocols token for token, every answer computed): its URL and its gRPC
    address."""
    grpc_port = free_port()
    env = {
        **CACHES_OFF,
        **ONE_WORKER,
        "FNSERVE_GRPC_PORT": str(grpc_port),
        "FNSERVE_API_KEYS": ",".join(KEYS),
        "FNSERVE_MAX_BODY_BYTES": str(MAX_BODY),
        "FNSERVE_TRACE_REQUESTS": "true",
        "FNSERVE_EMBEDDING_DTYPE": "float32",
        "FNSERVE_GENERATION_DTYPE": "float32",
    }
    with serve(env=env) as url:
        yield url, f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="session")
def capped_server() -> Iterator[tuple[str, str]]:
    """Answers capped at 16 tokens (most valid chats the fuzzer sends would otherwise generate 128 to
    512 tokens each: nine minutes in all here), inputs over the embedding window refused instead of cut,
    and images limited low enough to test the limits, classified in fp32 (compared with the model run in
    the test) and never cached: settings that the session server's tests must not see, on one server
    rather than three. Its URL and its gRPC address."""
    grpc_port = free_port()
    env = {
        "FNSERVE_GRPC_PORT": str(grpc_port),
        "FNSERVE_GENERATION_MAX_TOKENS": "16",
        "FNSERVE_EMBEDDING_OVERFLOW": "reject",
        "FNSERVE_IMAGE_DTYPE": "float32",
        "FNSERVE_IMAGE_MAX_PIXELS": str(IMAGE_MAX_PIXELS),
        "FNSERVE_IMAGE_MAX_BYTES": str(IMAGE_MAX_BYTES),
        "FNSERVE_IMAGE_CACHE_SIZE": "0",
    }
    with serve(env=env) as url:
        yield url, f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="session")
def client(server: str) -> Iterator[httpx.Client]:
    with http_client(server) as c:
        yield c


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    """A real PostgreSQL (Debian's, as `make cluster` runs it) for the batch store's tests."""
    with temporary_postgres(tmp_path_factory.mktemp("postgres") / "postgres.log") as database:
        yield database


@pytest.fixture
def store_at(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., BatchStore]]:
    """Makes batch stores as servers (`instance`) would open them, on the backend of the test's
    parameter: `sqlite` (a file in tmp_path) or `postgres` (a database of the test's own)."""
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres").new_database()
    opened: list[BatchStore] = []

    def store(instance: str, worker: str | None = None) -> BatchStore:
        opened.append(BatchStore(tmp_path, instance, url, worker))
        return opened[-1]

    yield store
    for each in opened:
        each.close()
