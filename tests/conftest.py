"""Session fixtures: one real embedding server for the whole run."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.server import serve


@pytest.fixture(scope="session")
def server() -> Iterator[str]:
    with serve() as url:
        yield url


@pytest.fixture(scope="session")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c
