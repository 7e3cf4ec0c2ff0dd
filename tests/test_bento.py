"""`bentoml build` packs services and weights into a Bento, and `bentoml serve <tag>` serves it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import httpx

from tests.server import BENTOML, LONG, ONE_WORKER, ROOT, serve


def test_bento_builds_and_serves(tmp_path: Path) -> None:
    done = subprocess.run(
        [*BENTOML, "build", "--output", "tag"], cwd=ROOT, capture_output=True, text=True, env=os.environ
    )
    assert done.returncode == 0, done.stderr
    found = re.search(r"__tag__:(\S+)", done.stdout)
    assert found, done.stdout
    tag = found.group(1)
    try:
        # Served from an empty folder, so the code comes from the Bento and not from the checkout; with
        # one entry worker (the session server tests two): a second one is a second import of torch.
        with serve(tag, env=ONE_WORKER, cwd=tmp_path) as url:
            body = {"model": "all-minilm-l6-v2", "input": "from the bento"}
            response = httpx.post(f"{url}/v1/embeddings", json=body, timeout=LONG)
            assert response.status_code == 200, response.text
            assert len(response.json()["data"][0]["embedding"]) == 384
    finally:
        subprocess.run([*BENTOML, "delete", "--yes", tag], capture_output=True, check=True)
