"""Schemathesis against the served OpenAPI document: no 5xx, and responses that match their schemas."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from tests.server import LONG

CONFIG = Path(__file__).with_name("schemathesis.toml")
CASES_PER_OPERATION = 25  # bounded: `make test` runs it; the seed makes a failure repeatable
# Two operations at a time: the server batches what arrives together, and one at a time left it waiting
# on the client (the same cases took 111 s, against 61 s with two, on the 2-core Zen 4 here).
FUZZ_WORKERS = 2
# The fuzzer, with Python's `ast.parse` taken by one thread at a time. CPython 3.11 keeps the AST
# constructor's recursion depth in state its threads share (python/cpython#106905), and hypothesis parses
# the source of each filter lambda as schemathesis's two workers build their strategies: two parses at
# once crashed the fuzzer itself ("SystemError: AST constructor recursion depth mismatch"), not a finding,
# beside `stress-ng --cpu 2` on the Zen 3 and on the Zen 4 (there twice in a row, so a repeat was no cure).
SCHEMATHESIS = """
import ast, functools, sys, threading
parse, lock = ast.parse, threading.Lock()

@functools.wraps(parse)
def one_at_a_time(*args, **kwargs):
    with lock:
        return parse(*args, **kwargs)

ast.parse = one_at_a_time
import schemathesis.cli
sys.exit(schemathesis.cli.schemathesis())
"""


def test_fuzzing_finds_no_server_errors_and_no_schema_violations(capped_server: tuple[str, str]) -> None:
    """Run as a user would run it: straight at the served document (OpenAPI 3.1, tests/test_openapi.py)."""
    server, _ = capped_server
    document = httpx.get(f"{server}/docs.json", timeout=LONG).json()
    command = [
        *(
            sys.executable,
            "-c",
            SCHEMATHESIS,
            "--config-file",
            str(CONFIG),
            "run",
            f"{server}/docs.json",
        ),
        *("--phases", "examples,coverage,fuzzing", "--max-examples", str(CASES_PER_OPERATION)),
        *("--seed", "20261128", "--workers", str(FUZZ_WORKERS), "--request-timeout", "120", "--no-color"),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    report = run.stdout[-20000:] + run.stderr[-5000:]
    assert run.returncode == 0, report
    assert "Schema Error" not in report, report
    operations = sum(len(methods) for methods in document["paths"].values())
    assert f"Tested: {operations}" in report, report  # every operation was exercised
