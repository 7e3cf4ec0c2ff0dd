"""Session fixtures: one real embedding server for the whole run."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.server import LONG, serve


@pytest.fixture(scope="session")
def server() -> Iterator[str]:
    # fp32: the tests compare served text with transformers' exactly, and bf16 greedy output can depend
    # on what else is in the batch.
    with serve(env={"FNSERVE_GENERATION_DTYPE": "float32"}) as url:
        yield url


@pytest.fixture(scope="session")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=LONG) as c:
        yield c
