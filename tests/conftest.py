"""Session fixtures: one real embedding server for the whole run."""

from __future__ import annotations

import os
from collections.abc import Iterator

import httpx
import pytest

from tests.server import LONG, serve

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
    # fp32: the tests compare served text with transformers' exactly, and bf16 greedy output can depend
    # on what else is in the batch.
    with serve(env={"FNSERVE_GENERATION_DTYPE": "float32"}) as url:
        yield url


@pytest.fixture(scope="session")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=LONG) as c:
        yield c
