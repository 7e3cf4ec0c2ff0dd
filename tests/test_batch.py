"""Batch jobs against a real server with a real SQLite store: results, crash recovery, cancel, bad input,
the openai client and the CLI."""

from __future__ import annotations

import asyncio
import http.server
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import psutil
import pytest

from deploy.cluster.parts import Postgres
from services import cli
from services.config import Settings
from services.jobs.db import Breaker, StoreUnavailable
from services.jobs.runner import BatchRunner
from services.jobs.store import CHUNK, MIGRATIONS, BatchStore, Line, Outcome, created_in, parse_line
from tests.reference import reference
from tests.server import (
    BATCH_MAX_FILE_BYTES,
    LONG,
    ONE_WORKER,
    free_port,
    http_client,
    serve,
    server_processes,
)

EMBEDDER = "all-minilm-l6-v2"
CHAT = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def api(client: httpx.Client) -> httpx.Client:
    """The session server (conftest), whose store is in its own BentoML home."""
    return client


def embedding_line(i: int) -> dict[str, Any]:
    text = f"Document {i}: batch jobs run through the same batcher as online traffic."
    return {
        "custom_id": f"e{i}",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": EMBEDDER, "input": text},
    }


def chat_line(i: int, max_tokens: int = 16) -> dict[str, Any]:
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": f"What is {i} plus {i}?"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list[Any]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def submit(client: httpx.Client, content: bytes, endpoint: str) -> dict[str, Any]:
    uploaded = client.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.text
    batch = client.post("/v1/batches", json={"input_file_id": uploaded.json()["id"], "endpoint": endpoint})
    assert batch.status_code == 200, batch.text
    return batch.json()


def wait_until(client: httpx.Client, batch_id: str, done: Any, timeout: float = LONG) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not done(batch := client.get(f"/v1/batches/{batch_id}").json()):
        assert time.monotonic() < deadline, batch
        time.sleep(0.3)
    return batch


def final(batch: dict[str, Any]) -> bool:
    return batch["status"] in ("completed", "failed", "expired", "cancelled")


def lines_of(client: httpx.Client, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    response = client.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200
    return [json.loads(line) for line in response.text.splitlines()]


def test_embedding_batch_matches_the_online_endpoint(api: httpx.Client) -> None:
    good = [embedding_line(i) for i in range(300)]
    bad = [
        '{"custom_id": "broken", "method": "POST", "url": "/v1/embeddings", "body": {',
        {**embedding_line(900), "custom_id": "empty-input", "body": {"model": EMBEDDER, "input": ""}},
        {**embedding_line(901), "custom_id": "wrong-url", "url": "/v1/completions"},
    ]
    batch = submit(api, jsonl(good[:150] + bad + good[150:]), "/v1/embeddings")
    batch = wait_until(api, batch["id"], final)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 303, "completed": 300, "failed": 3}

    outputs = {line["custom_id"]: line for line in lines_of(api, batch["output_file_id"])}
    assert sorted(outputs) == sorted(line["custom_id"] for line in good)
    for i in (0, 149, 299):
        online = api.post("/v1/embeddings", json=good[i]["body"]).json()["data"][0]["embedding"]
        response = outputs[f"e{i}"]["response"]
        assert response["status_code"] == 200
        batched = response["body"]["data"][0]["embedding"]
        assert np.dot(online, batched) > 0.999  # unit vectors; bf16 results move slightly with the batch

    errors = {line["custom_id"]: line["error"] for line in lines_of(api, batch["error_file_id"])}
    assert errors["broken"]["code"] == "invalid_json"
    assert errors["wrong-url"]["code"] == "invalid_url"
    assert errors["empty-input"]["param"] == "input"


def test_openai_client_drives_a_chat_batch(api: httpx.Client) -> None:
    client = openai.OpenAI(base_url=f"{api.base_url}/v1", api_key="unused")
    uploaded = client.files.create(
        file=("chat.jsonl", jsonl([chat_line(i) for i in range(6)])), purpose="batch"
    )
    assert client.files.retrieve(uploaded.id).bytes == uploaded.bytes
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 180
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert batch.status == "completed" and batch.request_counts.completed == 6
    assert batch.id in [b.id for b in client.batches.list(limit=100).data]
    outputs = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    answers = {
        line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"] for line in outputs
    }
    assert answers == {f"c{i}": reference(f"What is {i} plus {i}?", 16) for i in range(6)}
    # The client's iterator asks for pages after the last id for as long as the server says there are
    # more; a list without `has_more` had it ask for the same files for ever (bounded here to fail).
    stored = api.get("/v1/files").json()["data"]
    walked = list(itertools.islice(client.files.list(limit=2), 10 * len(stored)))
    assert [file.id for file in walked] == [file["id"] for file in stored]
    outputs_first = client.files.list(purpose="batch_output", order="asc")
    assert batch.output_file_id in [file.id for file in outputs_first]


def test_cancel_settles_every_line_and_keeps_what_finished(api: httpx.Client) -> None:
    lines = [chat_line(i, max_tokens=48) for i in range(30)]
    batch = submit(api, jsonl(lines), "/v1/chat/completions")
    wait_until(api, batch["id"], lambda b: b["request_counts"]["completed"] >= 1)
    cancelled = api.post(f"/v1/batches/{batch['id']}/cancel")
    assert cancelled.json()["status"] in ("cancelling", "cancelled")
    batch = wait_until(api, batch["id"], final)
    assert batch["status"] == "cancelled"
    outputs = lines_of(api, batch["output_file_id"])
    errors = lines_of(api, batch["error_file_id"])
    assert outputs and errors
    assert sorted(line["custom_id"] for line in outputs + errors) == sorted(
        line["custom_id"] for line in lines
    )
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}


@pytest.mark.parametrize(
    ("content", "endpoint", "status"),
    [
        (b"\xff\xfe not utf-8", "/v1/embeddings", 400),
        (b"\n\n", "/v1/embeddings", 400),
        (b"no json here\nnor here\n", "/v1/embeddings", 400),
        (jsonl([embedding_line(0)]), "/v1/images", 400),
    ],
    ids=["not-utf8", "empty", "not-jsonl", "wrong-endpoint"],
)
def test_bad_batches_are_refused_at_creation(
    api: httpx.Client, content: bytes, endpoint: str, status: int
) -> None:
    uploaded = api.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}).json()
    response = api.post("/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": endpoint})
    assert response.status_code == status, response.text
    assert response.json()["error"]["message"]


def test_bad_uploads_and_unknown_ids(api: httpx.Client) -> None:
    big = ("big.jsonl", b"x" * (BATCH_MAX_FILE_BYTES + 1))
    too_big = api.post("/v1/files", files={"file": big}, data={"purpose": "batch"})
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "file_too_large"
    wrong_purpose = api.post("/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "fine-tune"})
    assert wrong_purpose.status_code == 400
    assert (
        api.post("/v1/batches", json={"input_file_id": "file_nope", "endpoint": "/v1/embeddings"}).status_code
        == 404
    )
    assert api.get("/v1/batches/batch_nope").status_code == 404
    assert api.get("/v1/files/file_nope/content").status_code == 404
    assert api.post("/v1/embeddings", json={"model": EMBEDDER, "input": "still serving"}).status_code == 200


def fnserve_cli(url: str) -> list[str]:
    """`fnserve batch` as a user runs it, from the venv's script."""
    return [str(Path(sys.executable).with_name("fnserve")), "--url", url, "batch"]


def test_cli_submits_waits_and_downloads(api: httpx.Client, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([embedding_line(i) for i in range(40)]))
    fnserve = fnserve_cli(str(api.base_url))
    submitted = subprocess.run(
        [*fnserve, "submit", str(source), "--endpoint", "/v1/embeddings", "--wait"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.split()[0]
    assert "completed" in submitted.stdout and "40/40" in submitted.stderr  # the progress bar's last state
    output, errors = tmp_path / "out.jsonl", tmp_path / "errors.jsonl"
    errors.write_text('{"custom_id": "an earlier batch"}\n')
    fetched = subprocess.run(
        [*fnserve, "download", batch_id, "--output", str(output), "--errors", str(errors)],
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert len(output.read_text().splitlines()) == 40
    assert errors.read_text() == "" and "no error lines" in fetched.stderr  # not the earlier batch's
    # Into a pipe: written through (a rename onto /dev/stdout would replace the device's link).
    piped = subprocess.run(
        [*fnserve, "download", batch_id, "--output", "/dev/stdout", "--errors", ""],
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.startswith(output.read_text()) and Path("/dev/stdout").is_symlink()
    nowhere = tmp_path / "no such folder" / "out.jsonl"
    refused = subprocess.run(
        [*fnserve, "download", batch_id, "--output", str(nowhere), "--errors", ""],
        capture_output=True,
        text=True,
        timeout=LONG,
    )
    assert refused.returncode == 1 and "No such file or directory" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert not list(tmp_path.glob("*.partial"))


def test_a_busy_or_away_server_is_asked_again_and_a_wrong_request_is_not() -> None:
    """What `fnserve batch wait` rides out (admission's 429 with its Retry-After, 502/503/504) and what
    ends it at once (a request the server will never accept)."""
    busy = httpx.Response(429, headers={"Retry-After": "2"}, json={"error": {"message": "overloaded"}})
    with pytest.raises(cli.Unavailable, match="error 429: overloaded") as raised:
        cli.checked(busy)
    assert raised.value.retry_after == 2.0
    for status in (502, 503, 504):
        with pytest.raises(cli.Unavailable):
            cli.checked(httpx.Response(status, text="away"))
    with pytest.raises(SystemExit, match="error 404: no such batch"):
        cli.checked(httpx.Response(404, json={"error": {"message": "no such batch"}}))


def test_an_upload_a_balancer_answered_502_is_not_sent_again(tmp_path: Path) -> None:
    """A balancer's 502 (its server died with the request) may follow an upload the server took: the
    CLI says so and stops, where sending it again could make a second file and batch."""
    posts: list[str] = []

    class Balancer(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            posts.append(self.path)
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    source = tmp_path / "in.jsonl"
    source.write_bytes(jsonl([embedding_line(0)]))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Balancer) as balancer:
        threading.Thread(target=balancer.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{balancer.server_address[1]}"
        command = [*fnserve_cli(url), "submit", str(source), "--endpoint", "/v1/embeddings", "--wait"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=LONG)
        balancer.shutdown()
    assert done.returncode == 1 and "error 502" in done.stderr and "may have taken it" in done.stderr
    assert posts == ["/v1/files"]


def test_bad_paths_and_urls_end_the_cli_with_one_line(tmp_path: Path) -> None:
    """What a user mistypes: a message, never a traceback, and nothing sent."""
    missing = tmp_path / "missing.jsonl"
    for url, arguments, message in (
        ("http://127.0.0.1:9", ["submit", str(missing), "--endpoint", "/v1/embeddings"], "No such file"),
        ("http://127.0.0.1:9", ["submit", str(tmp_path), "--endpoint", "/v1/embeddings"], "Is a directory"),
        ("localhost:3000", ["status", "batch_x"], "is not an http:// or https:// URL"),
        ("http://localhost:30O0", ["status", "batch_x"], "Invalid port"),
    ):
        done = subprocess.run([*fnserve_cli(url), *arguments], capture_output=True, text=True, timeout=LONG)
        assert done.returncode in (1, 2) and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_bentoml_task_endpoint_with_bentoml_client(api: httpx.Client) -> None:
    import asyncio

    import bentoml

    async def run() -> str:
        async with bentoml.AsyncHTTPClient(str(api.base_url)) as client:
            question = [{"role": "user", "content": "What is the capital of France?"}]
            task = await client.write.submit(messages=question, max_tokens=16)
            deadline = time.monotonic() + 120
            while (await task.get_status()).value not in ("completed", "failed", "canceled"):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
            return await task.get()

    assert asyncio.run(run()) == reference("What is the capital of France?", 16)


def kill_server(url: str) -> None:
    """kill -9 the whole `bentoml serve` tree listening at `url`: no shutdown hook runs."""
    family = server_processes(url)
    for process in family:
        os.kill(process.pid, signal.SIGKILL)
    psutil.wait_procs(family, timeout=10)


def test_kill_9_mid_job_then_restart_resumes_with_exact_accounting(tmp_path: Path) -> None:
    lines = [chat_line(i, max_tokens=24) for i in range(16)]
    # A store that both server runs find; in one worker, as many lines at once as two would run.
    env = {**ONE_WORKER, "FNSERVE_BATCH_DIR": str(tmp_path), "FNSERVE_BATCH_GENERATION_CONCURRENCY": "8"}
    port, progress = free_port(), tmp_path / "follower.log"
    with progress.open("w") as log, ExitStack() as stopping:
        with serve(env=env, port=port) as url, http_client(url) as client:
            batch = submit(client, jsonl(lines), "/v1/chat/completions")
            # A user following the job from the command line: it must ride out the restart below.
            command = [*fnserve_cli(url), "wait", batch["id"]]
            follower = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
            stopping.callback(follower.kill)
            before = wait_until(client, batch["id"], lambda b: b["request_counts"]["completed"] >= 4)
            deadline = time.monotonic() + LONG
            while not progress.read_text():  # its progress bar is up: it follows the job
                assert time.monotonic() < deadline and follower.poll() is None
                time.sleep(0.2)
            kill_server(url)
        assert before["request_counts"]["completed"] < 16, "the job finished before the kill: make it longer"
        with serve(env=env, port=port) as url, http_client(url) as client:
            batch = wait_until(client, batch["id"], final)
            outputs = lines_of(client, batch["output_file_id"])
            errors = lines_of(client, batch["error_file_id"])
            followed, _ = follower.communicate(timeout=LONG)
    shown = progress.read_text()
    assert follower.returncode == 0, shown
    assert followed.startswith("completed:") and "asking again" in shown and "16/16" in shown
    assert batch["status"] == "completed" and not errors
    assert batch["request_counts"] == {"total": 16, "completed": 16, "failed": 0}
    assert sorted(line["custom_id"] for line in outputs) == sorted(line["custom_id"] for line in lines)
    assert all(line["response"]["status_code"] == 200 for line in outputs)


BACKENDS = pytest.mark.parametrize("store_at", ["sqlite", "postgres"], indirect=True)


def stored_batch(store: BatchStore, lines: list[Any], endpoint: str = "/v1/embeddings") -> dict[str, Any]:
    """A batch of `lines` created in `store` directly, as the route does after the upload."""
    file_id = store.add_file(jsonl(lines), "in.jsonl", "batch")["id"]
    return store.create_batch(file_id, endpoint, 3600, "1h", None, max_lines=10)


def file_lines(store: BatchStore, file_id: str) -> list[str]:
    return b"".join(store.read_file(file_id)).decode().splitlines()


@BACKENDS
def test_expiry_and_retention_in_the_store(store_at: Callable[..., BatchStore]) -> None:
    store = store_at("test")
    batch = stored_batch(store, [embedding_line(i) for i in range(5)])
    [running] = store.claim(1, lease_seconds=60, max_attempts=5)
    assert store.expire_overdue(now=time.time() + 7200) == [batch["id"]]
    assert store.finalize_ready(lease_seconds=60) == []  # one line is still running
    store.settle([Outcome(running, True, '{"status_code": 200, "body": {}}')])
    assert store.finalize_ready(lease_seconds=60) == [batch["id"]]
    ended = store.get_batch(batch["id"])
    assert ended["status"] == "expired" and ended["request_counts"] == {
        "total": 5,
        "completed": 1,
        "failed": 4,
    }
    error_lines = file_lines(store, ended["error_file_id"])
    assert {json.loads(line)["error"]["code"] for line in error_lines} == {"batch_expired"}

    later = time.time() + 7200  # the expiry above happened at this (simulated) time
    assert store.clean_up(retention_seconds=3600, now=later + 60) == 0  # not old enough yet
    assert store.clean_up(retention_seconds=3600, now=later + 3700) == 1
    assert store.get_batch(batch["id"]) is None
    assert store.list_files() == [] and store.db.rows("SELECT file_id FROM file_chunks") == []


def test_lines_the_json_module_takes_but_no_request_can_carry_are_bad_lines() -> None:
    """Nesting past Python's recursion limit (a RecursionError, in reading or in storing the line, failed
    the whole batch with a 500), NaN and a lone surrogate: each line is refused as not JSON, by its
    custom_id where it has one."""
    line = '{"custom_id": "%s", "method": "POST", "url": "/v1/embeddings", "body": {"input": %s}}'
    for raw, custom_id in (
        ("[" * 2000, ""),
        ("[" * 1020 + "]" * 1020, ""),  # JSON to orjson (1,024 levels), but past what the store writes
        (line % ("nan", "NaN"), "nan"),
        (line % ("surrogate", '"\\ud800"'), "surrogate"),
    ):
        named, body, error = parse_line(raw, "/v1/embeddings")
        assert (named, body) == (custom_id, None) and error and error["code"] == "invalid_json", raw
    assert parse_line(line % ("fine", '"text"'), "/v1/embeddings") == ("fine", {"input": "text"}, None)


@BACKENDS
def test_store_gives_up_on_a_line_that_keeps_failing_and_keeps_unicode_lines_whole(
    store_at: Callable[..., BatchStore],
) -> None:
    store = store_at("first")
    # A server that is gone: on a store of its own, a new server run claims its lines at once; on a
    # shared one, only a lease that ran out hands them over (here at once: a lease of 0 s).
    lease = 0 if store.db.shared else 600
    line = embedding_line(0)
    line["body"]["input"] = "a line separator \u2028 inside a JSON string"
    batch = stored_batch(store, [line])
    assert store.get_batch(batch["id"])["request_counts"] == {"total": 1, "completed": 0, "failed": 0}
    for attempt in (1, 2):  # each time claimed, then its server "dies": a new server claims it again
        store = store_at(f"server-{attempt}")
        [claimed] = store.claim(10, lease_seconds=lease, max_attempts=2)
        assert claimed.attempts == attempt and claimed.body["input"] == line["body"]["input"]
    store = store_at("server-3")
    assert store.claim(10, lease_seconds=lease, max_attempts=2) == []
    assert store.finalize_ready(lease_seconds=lease) == [batch["id"]]
    [error] = file_lines(store, store.get_batch(batch["id"])["error_file_id"])
    assert json.loads(error)["error"]["code"] == "server_error"


@BACKENDS
def test_replicas_share_a_store_and_never_run_a_line_twice(store_at: Callable[..., BatchStore]) -> None:
    """Two servers claim from one store at once; on a shared store a live one's claims are left alone
    until their lease runs out, and a result is recorded only by the claim that holds the line."""
    first = store_at("one", "1")
    # On SQLite, two workers of one server: a second server would mean the first one is gone.
    second = store_at("two" if first.db.shared else "one", "2")
    content = jsonl([embedding_line(i) for i in range(300)]) + b"\xc3\xa9" * CHUNK  # spans chunks
    file_id = first.add_file(content, "in.jsonl", "batch")["id"]
    assert b"".join(second.read_file(file_id)) == content and second.get_file(file_id)["bytes"] == len(
        content
    )
    first.delete_file(file_id)
    assert second.get_file(file_id) is None and list(second.read_file(file_id)) == []

    file_id = first.add_file(jsonl([embedding_line(i) for i in range(300)]), "in.jsonl", "batch")["id"]
    batch = second.create_batch(file_id, "/v1/embeddings", 3600, "1h", None, max_lines=1000)
    with ThreadPoolExecutor(8) as pool:
        claims = list(pool.map(lambda store: store.claim(20, 600, 5), [first, second] * 10))
    claimed = [(line.batch_id, line.idx) for lines in claims for line in lines]
    assert len(claimed) == len(set(claimed)) == 300  # each line to exactly one claim
    mine = [
        line
        for store, lines in zip([first, second] * 10, claims, strict=True)
        if store is first
        for line in lines
    ]
    assert second.claim(300, lease_seconds=600, max_attempts=5) == []  # the first one's are still held
    taken = second.claim(300, lease_seconds=0, max_attempts=5)  # every lease has run out
    assert len(taken) == 300
    first.settle([Outcome(line, True, '{"status_code": 200, "body": {"late": true}}') for line in mine])
    second.settle([Outcome(line, True, '{"status_code": 200, "body": {}}') for line in taken])
    assert first.finalize_ready(lease_seconds=600) == [batch["id"]]
    ended = second.get_batch(batch["id"])
    assert ended["status"] == "completed" and ended["request_counts"]["completed"] == 300
    outputs = [json.loads(line) for line in file_lines(second, ended["output_file_id"])]
    assert sorted(line["custom_id"] for line in outputs) == sorted(f"e{i}" for i in range(300))
    assert all(line["response"]["body"] == {} for line in outputs)  # the late claim's results were refused


def test_a_second_server_on_the_same_folder_leaves_the_first_ones_lines_while_it_runs(tmp_path: Path) -> None:
    """Two `make serve` on one checkout share its SQLite store. The second took the first's running
    lines at once, as if it were gone, and back and forth until both were given up after five attempts.
    They are taken once that server has stopped (here, the process its name points to)."""
    arbiter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        first = BatchStore(tmp_path, f"{arbiter.pid}-{psutil.Process(arbiter.pid).create_time():.3f}")
        second = BatchStore(tmp_path, f"{os.getpid()}-{psutil.Process().create_time():.3f}")
        stored_batch(first, [embedding_line(i) for i in range(4)])
        held = [line.idx for line in first.claim(2, lease_seconds=600, max_attempts=5)]
        assert [line.idx for line in second.claim(10, lease_seconds=600, max_attempts=5)] == [2, 3]
        assert second.claim(10, lease_seconds=600, max_attempts=5) == []  # its own, and the first's
        arbiter.kill()
        arbiter.wait()
        taken = second.claim(10, lease_seconds=600, max_attempts=5)
        assert [(line.idx, line.attempts) for line in taken] == [(idx, 2) for idx in held]
    finally:
        arbiter.kill()
        arbiter.wait()


def test_a_database_found_away_is_refused_at_once_until_a_call_reaches_it_again(tmp_path: Path) -> None:
    """PostgreSQL stopped under a store: the call that finds it away waits for the pool and its probe
    fails, the calls after it are refused without trying (even once it is back, until the next probe is
    due), and then a probe connects and that very call is served: the pool does not hold it back while
    it backs off its own reconnection."""
    database = Postgres(Path(tempfile.mkdtemp(prefix="fnserve-pg-")), free_port(), tmp_path / "pg.log")
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, database.data, ignore_errors=True)
        database.init()
        part = database.start()
        stack.callback(lambda: part.stop())  # the part running at the end
        store = BatchStore(tmp_path, "test", database.url)
        stack.callback(store.close)
        breaker = store.db.breaker  # type: ignore[attr-defined]
        breaker.retry_seconds = 3600  # so that nothing tries the database again until the test says so
        file_id = store.add_file(jsonl([embedding_line(0)]), "in.jsonl", "batch")["id"]
        part.stop()
        with pytest.raises(StoreUnavailable, match="did not answer|failed"):
            store.get_file(file_id)
        part = database.start()
        with pytest.raises(StoreUnavailable, match=r"unreachable for \d+ s \(tried again every 3600 s\)"):
            store.get_file(file_id)
        breaker.retry_seconds = 0
        assert store.get_file(file_id)["id"] == file_id


def test_only_a_failed_probe_opens_the_breaker_and_one_call_at_a_time_probes_again() -> None:
    """The breaker alone, its probe held open by an event rather than by a database's timing: a call
    that fails as if the database were away opens it only if the probe cannot connect either (a pool
    still backing off after the database came back must not); while one call probes, the others are
    refused; an interrupted probe lets the next call probe; a probe that connects closes it."""
    up, interrupt = threading.Event(), threading.Event()
    inside, release = threading.Event(), threading.Event()

    def reachable() -> bool:
        inside.set()
        assert release.wait(LONG)
        if interrupt.is_set():
            raise KeyboardInterrupt
        return up.is_set()

    release.set()
    breaker = Breaker(retry_seconds=3600, reachable=reachable)
    gone = ConnectionError("the pool timed out")

    def away(exc: Exception) -> bool:
        return exc is gone

    def fails(exc: BaseException) -> None:
        with pytest.raises(type(exc)), breaker.guard(away):
            raise exc

    def refused() -> None:
        with pytest.raises(StoreUnavailable, match="unreachable"), breaker.guard(away):
            pytest.fail("a call ran while the database was away")

    def runs() -> None:
        with breaker.guard(away):
            pass

    up.set()
    fails(gone)  # the probe connects: still closed
    runs()
    up.clear()
    fails(gone)  # the probe cannot connect either: open, and nothing probes for an hour
    refused()
    breaker.retry_seconds = 0
    inside.clear()
    release.clear()
    with ThreadPoolExecutor(1) as pool:
        probing = pool.submit(refused)  # its own probe fails
        assert inside.wait(LONG)
        refused()  # without probing: another call is
        release.set()
        probing.result()

    interrupt.set()
    fails(KeyboardInterrupt())
    interrupt.clear()
    up.set()
    runs()  # its probe connects: closed
    breaker.retry_seconds = 3600
    runs()


def test_a_store_from_before_files_moved_into_the_database_is_migrated(tmp_path: Path) -> None:
    """Version 1 kept file bodies in `files/` beside batches.db, and had no schema_version table."""
    body = jsonl([embedding_line(0)])
    with sqlite3.connect(tmp_path / "batches.db") as old:
        for statement in MIGRATIONS[0].split(";"):
            old.execute(statement)
        old.execute("INSERT INTO files VALUES ('file_old', 'batch', 'in.jsonl', ?, 1)", (len(body),))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "file_old").write_bytes(body)
    store = BatchStore(tmp_path, instance="upgraded")
    assert b"".join(store.read_file("file_old")) == body and not (tmp_path / "files" / "file_old").exists()
    assert store.db.rows("SELECT max(version) AS v FROM schema_version") == [{"v": len(MIGRATIONS)}]
    batch = store.create_batch("file_old", "/v1/embeddings", 3600, "1h", None, max_lines=10)
    assert batch["request_counts"]["total"] == 1
    again = BatchStore(tmp_path, instance="again")
    assert again.get_file("file_old")["bytes"] == len(body) and b"".join(again.read_file("file_old")) == body
    assert len(again.db.rows("SELECT version FROM schema_version")) == len(MIGRATIONS)  # each ran once


@BACKENDS
def test_a_custom_id_no_database_can_hold_is_a_bad_line(store_at: Callable[..., BatchStore]) -> None:
    store = store_at("test")
    raws = [
        '{"custom_id": "nul\\u0000inside", "url": "/v1/embeddings", "body": {"input": "a"}}',
        '{"custom_id": "lone \\ud800 surrogate", "url": "/v1/embeddings", "body": {"input": "b"}}',
        json.dumps(embedding_line(1)),
    ]
    batch = stored_batch(store, raws)
    assert batch["request_counts"] == {"total": 3, "completed": 0, "failed": 2}
    assert store.get_batch(batch["id"])["request_counts"] == batch["request_counts"]
    [good] = store.claim(10, lease_seconds=600, max_attempts=5)
    assert good.custom_id == "e1"


@BACKENDS
def test_files_are_listed_in_pages_either_way(store_at: Callable[..., BatchStore]) -> None:
    """Most of these are made within one second: ties in time are ordered by id, on both backends."""
    store = store_at("test")
    made = [store.add_file(b"{}", f"{i}.jsonl", "batch")["id"] for i in range(5)]
    newest_first = [file["id"] for file in store.list_files()]
    assert sorted(newest_first) == sorted(made)
    for ascending in (False, True):
        walked: list[str] = []
        while page := store.list_files(limit=2, after=walked[-1] if walked else None, ascending=ascending):
            walked += [file["id"] for file in page]
        assert walked == (newest_first[::-1] if ascending else newest_first)
    assert store.list_files("batch_output") == [] and len(store.list_files("batch", limit=3)) == 3


@BACKENDS
def test_a_listing_goes_on_past_a_cursor_deleted_meanwhile(store_at: Callable[..., BatchStore]) -> None:
    """The openai client's iterator, deleting each file as it goes, asks for the page after an id that
    is gone: that page had been empty, and the listing ended with files left. A page's `has_more` is
    the first read's: a batch deleted between the two reads had ended the listing too."""
    store = store_at("test")
    made = [store.add_file(b"{}", f"{i}.jsonl", "batch")["id"] for i in range(5)]
    seen: list[str] = []
    while page := store.list_files(limit=2, after=seen[-1] if seen else None):
        seen += [file["id"] for file in page]
        for file in page:
            assert store.delete_file(file["id"])
    assert sorted(seen) == sorted(made) and store.list_files() == []
    lines = jsonl([json.dumps(embedding_line(1))])
    batches = [
        store.create_batch(
            store.add_file(lines, "in.jsonl", "batch")["id"], "/v1/embeddings", 3600, "1h", None, 10
        )
        for _ in range(3)
    ]
    newest, middle, oldest = [row["id"] for row in store.list_batches(3, None)[0]]
    assert {newest, middle, oldest} == {batch["id"] for batch in batches}
    read = store.get_batch
    # The retention deletes the middle one between the page's two reads.
    store.get_batch = lambda batch_id: None if batch_id == middle else read(batch_id)  # type: ignore[method-assign]
    page, more = store.list_batches(2, None)
    assert [row["id"] for row in page] == [newest] and more
    rest, more = store.list_batches(2, newest)  # the client's next page, after the last id it got
    assert [row["id"] for row in rest] == [oldest] and not more
    assert created_in("file_" + "0" * 24) is None and created_in(made[0]) is not None


def test_a_batch_is_not_made_from_part_of_a_file_deleted_while_it_is_read(tmp_path: Path) -> None:
    """The input is read a few chunks per query: a file deleted meanwhile (DELETE, the retention) had
    become a batch of the lines before the cut, the rest missing without a word."""
    store = BatchStore(tmp_path, "test")
    line = json.dumps(embedding_line(0)).encode() + b"\n"
    file_id = store.add_file(line * (9 * CHUNK // len(line) + 1), "in.jsonl", "batch")["id"]  # 10 chunks
    read = store.read_file

    def deleted_after_the_first_query(file: str) -> Iterator[bytes]:
        for n, chunk in enumerate(read(file)):
            yield chunk
            if n == 0:
                store.delete_file(file)

    store.read_file = deleted_after_the_first_query  # type: ignore[method-assign]
    with pytest.raises(FileNotFoundError):
        store.create_batch(file_id, "/v1/embeddings", 3600, "1h", None, max_lines=10**6)
    assert store.list_batches(10, None) == ([], False)
    store.close()


def test_a_file_that_starts_with_a_byte_order_mark_is_read_from_its_first_line(tmp_path: Path) -> None:
    store = BatchStore(tmp_path, "test")
    content = b"\xef\xbb\xbf" + jsonl([embedding_line(0), embedding_line(1)])  # UTF-8's byte-order mark
    file_id = store.add_file(content, "in.jsonl", "batch")["id"]
    batch = store.create_batch(file_id, "/v1/embeddings", 3600, "1h", None, max_lines=10)
    assert store.get_batch(batch["id"])["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
    assert [line.custom_id for line in store.claim(10, lease_seconds=600, max_attempts=5)] == ["e0", "e1"]
    store.close()


@BACKENDS
def test_ids_no_database_can_hold_are_found_nowhere(store_at: Callable[..., BatchStore]) -> None:
    """A NUL or a lone surrogate in an id a caller sent (a path, `after`, `purpose`): PostgreSQL refuses
    such text in a query, which answered 500 for a lookup that can only be a 404 or an empty list."""
    store = store_at("test")
    file_id = store.add_file(jsonl([json.dumps(embedding_line(1))]), "in.jsonl", "batch")["id"]
    batch = store.create_batch(file_id, "/v1/embeddings", 3600, "1h", None, max_lines=10)
    for bad in (f"{file_id}\x00", "\ud800", f"{batch['id']}\x00"):
        assert store.get_file(bad) is None and store.get_batch(bad) is None
        assert not store.delete_file(bad) and not store.end_batch(bad, "cancelled")
        assert store.list_files(bad) == [] and store.list_batches(10, bad) == ([], False)
    assert [row["id"] for row in store.list_batches(10, None)[0]] == [batch["id"]]
    assert store.get_file(file_id) is not None


async def until(
    runner: asyncio.Task[None], condition: Callable[[], bool], describe: Callable[[], object] = lambda: None
) -> None:
    """Polls `condition` while the runner's task runs, for LONG at most: a runner that dies fails at once."""
    deadline = time.monotonic() + LONG
    while not condition():
        assert time.monotonic() < deadline and not runner.done(), describe()
        await asyncio.sleep(0.05)


def taken_next(tmp_path: Path) -> list[Line]:
    """Every line another server sharing the store would claim now."""
    following = BatchStore(tmp_path, "next")
    try:
        return following.claim(10, lease_seconds=600, max_attempts=5)
    finally:
        following.close()


def line_states(store: BatchStore, batch_id: str) -> dict[int, str]:
    rows = store.db.rows("SELECT idx, state FROM lines WHERE batch_id = ?", batch_id)
    return {row["idx"]: row["state"] for row in rows}


def test_a_stopping_runner_records_its_lines_in_flight_and_claims_no_more(tmp_path: Path) -> None:
    """At the stop signal a worker takes no new lines (another server gets them at once, not after this
    one's drain) and still records the ones it is running (they are not left to their lease)."""
    store = BatchStore(tmp_path, "stopping")
    batch = stored_batch(store, [embedding_line(i) for i in range(10)])

    async def stop_with_four_in_flight() -> None:
        four_running, release = asyncio.Event(), asyncio.Event()
        running = 0

        async def execute(endpoint: str, body: dict[str, Any]) -> tuple[bool, str]:
            nonlocal running
            running += 1
            if running == 4:
                four_running.set()
            await release.wait()
            return True, json.dumps({"status_code": 200, "body": {}})

        runner = BatchRunner(store, execute, Settings(batch_concurrency=4))
        task = asyncio.create_task(runner.run())
        try:
            await asyncio.wait_for(four_running.wait(), LONG)
            runner.stop_claiming()
            release.set()
            await until(task, lambda: store.get_batch(batch["id"])["request_counts"]["completed"] >= 4)
            await asyncio.sleep(1)  # room for a claim that should not happen
        finally:
            task.cancel()
        assert running == 4

    asyncio.run(stop_with_four_in_flight())
    assert store.get_batch(batch["id"])["request_counts"] == {"total": 10, "completed": 4, "failed": 0}
    left = taken_next(tmp_path)
    assert sorted(line.idx for line in left) == list(range(4, 10))
    assert {line.attempts for line in left} == {1}
    store.close()


def test_a_stopped_runner_hands_back_the_lines_it_had_not_finished(tmp_path: Path) -> None:
    """At the end of the drain, a line still running and one waiting for a generation slot are handed
    back at once, with no attempt counted; the one that finished is recorded. Another server (a
    replica, on PostgreSQL) takes them now, not once their lease runs out."""
    store = BatchStore(tmp_path, "stopping")
    lines = [chat_line(i) for i in range(3)]
    batch = stored_batch(store, lines, "/v1/chat/completions")

    async def stop_with_one_running_and_one_waiting() -> None:
        started: list[str] = []
        two_started = asyncio.Event()

        async def execute(endpoint: str, body: dict[str, Any]) -> tuple[bool, str]:
            started.append(body["messages"][0]["content"])
            if len(started) == 1:
                return True, json.dumps({"status_code": 200, "body": {}})
            two_started.set()
            await asyncio.Event().wait()  # runs until stopped
            raise AssertionError("not stopped")

        def states() -> dict[int, str]:
            return line_states(store, batch["id"])

        runner = BatchRunner(store, execute, Settings(batch_generation_concurrency=1))
        task = asyncio.create_task(runner.run())
        try:
            await asyncio.wait_for(two_started.wait(), LONG)
            # The first recorded, the second running and the third claimed, waiting for the one slot.
            await until(task, lambda: states() == {0: "done", 1: "running", 2: "running"}, states)
            runner.stop_claiming()
            task.cancel()
            await runner.stop()
        finally:
            task.cancel()
        assert len(started) == 2  # the third never started

    asyncio.run(stop_with_one_running_and_one_waiting())
    assert store.get_batch(batch["id"])["request_counts"]["completed"] == 1
    left = taken_next(tmp_path)
    assert len(left) == 2 and {line.attempts for line in left} == {1}  # their first attempt, again
    store.close()


def test_lines_a_claim_in_progress_takes_as_the_worker_stops_are_handed_back(tmp_path: Path) -> None:
    """The stop can come while a claim is in the store's thread (a store slow under load, a stop that
    came without the signal): the lines it takes are handed back with the others, not left running
    here until their lease runs out, an attempt charged to each. The step ends without the store's
    clean-up and finalizing, which other workers do: the stop waits for the step."""
    store = BatchStore(tmp_path, "stopping")
    batch = stored_batch(store, [embedding_line(i) for i in range(4)])
    claimed, hold, stopping_began = threading.Event(), threading.Event(), threading.Event()
    claim = store.claim
    chores: list[str] = []
    for chore in ("expire_overdue", "clean_up", "finalize_ready"):
        done = getattr(store, chore)

        def recorded(*args: Any, chore: str = chore, done: Any = done) -> Any:
            if stopping_began.is_set():
                chores.append(chore)
            return done(*args)

        setattr(store, chore, recorded)

    def held_claim(limit: int, *args: Any, **kwargs: Any) -> list[Any]:
        lines = claim(limit, *args, **kwargs)
        if lines:  # committed: the store's thread returns them once the stop has begun
            claimed.set()
            hold.wait(LONG)
        return lines

    store.claim = held_claim  # type: ignore[method-assign]

    async def stop_mid_claim() -> None:
        async def execute(endpoint: str, body: dict[str, Any]) -> tuple[bool, str]:
            await asyncio.Event().wait()  # runs until stopped
            raise AssertionError("not stopped")

        runner = BatchRunner(store, execute, Settings(batch_concurrency=4))
        task = asyncio.create_task(runner.run())
        try:
            await asyncio.to_thread(claimed.wait, LONG)
            stopping_began.set()
            stopping = asyncio.create_task(runner.stop())
            await asyncio.sleep(0.1)  # the stop has begun (a longer sleep cannot change the outcome)
            hold.set()
            await asyncio.wait_for(stopping, LONG)
        finally:
            hold.set()
            task.cancel()

    asyncio.run(stop_mid_claim())
    assert chores == []
    assert line_states(store, batch["id"]) == dict.fromkeys(range(4), "pending")
    left = taken_next(tmp_path)
    assert len(left) == 4 and {line.attempts for line in left} == {1}  # their first attempt, again
    store.close()


def test_lines_in_flight_at_two_crashes_run_one_at_a_time_beside_the_others(tmp_path: Path) -> None:
    """Claims go oldest first, so the lines in flight beside one that kills its worker are claimed with
    it again each time, and were given up with it after five crashes. Lines in flight at two crashes
    run one at a time, beside the others; a line that failed twice (a 5xx) is not one of them."""
    store = BatchStore(tmp_path, "crashed-1")
    lines = [embedding_line(i) for i in range(7)]
    batch = stored_batch(store, lines)
    for crashed in ("crashed-1", "crashed-2"):  # lines 0-3 in flight at two crashes
        assert [line.idx for line in BatchStore(tmp_path, crashed).claim(4, 600, 5)] == [0, 1, 2, 3]
    failing = BatchStore(tmp_path, "failing")
    for _ in range(2):  # line 4 fails twice and is put back
        [line] = failing.claim(1, 600, 5, suspects=False)
        assert line.idx == 4
        failing.release(line)
    suspects = {line["body"]["input"] for line in lines[:4]}
    failed_twice = lines[4]["body"]["input"]
    live = BatchStore(tmp_path, "live")

    async def run() -> tuple[int, bool]:
        running: set[str] = set()
        most_suspects, beside = 0, False
        failed_started = asyncio.Event()

        async def execute(endpoint: str, body: dict[str, Any]) -> tuple[bool, str]:
            nonlocal most_suspects, beside
            text = body["input"]
            running.add(text)
            most_suspects = max(most_suspects, len(running & suspects))
            if text == failed_twice:
                beside = bool(running & suspects)
                failed_started.set()
            elif text in suspects:  # held until the line that failed twice has started
                await asyncio.wait_for(failed_started.wait(), LONG)
            await asyncio.sleep(0)
            running.discard(text)
            return True, json.dumps({"status_code": 200, "body": {}})

        runner = BatchRunner(live, execute, Settings(batch_concurrency=8))
        task = asyncio.create_task(runner.run())
        try:
            await until(task, lambda: live.get_batch(batch["id"])["request_counts"]["completed"] >= 7)
        finally:
            task.cancel()
        return most_suspects, beside

    most_suspects, beside = asyncio.run(run())
    assert most_suspects == 1 and beside  # the line that failed twice ran beside a suspect
    assert live.get_batch(batch["id"])["request_counts"] == {"total": 7, "completed": 7, "failed": 0}
    for each in (live, failing):
        each.close()


def test_claims_are_renewed_while_a_step_writes_a_large_batchs_files(tmp_path: Path) -> None:
    """A step that finalizes a large batch (or cleans up old ones) can outlast a lease; the lines the
    worker holds meanwhile must keep their claims, or another worker takes them and runs them again.
    Here the step is held inside `finalize_ready` until a running line's claim has been renewed."""
    in_step, renewed = threading.Event(), threading.Event()

    class HeldInFinalizing(BatchStore):
        def finalize_ready(self, lease_seconds: float) -> list[str]:
            in_step.set()
            assert renewed.wait(LONG), "no renewal while the step ran"
            return super().finalize_ready(lease_seconds)

    store = HeldInFinalizing(tmp_path, "one", worker="1")
    batch = stored_batch(store, [embedding_line(0)])

    def claimed_at() -> float:
        return store.db.rows("SELECT claimed_at FROM lines WHERE batch_id = ?", batch["id"])[0]["claimed_at"]

    async def hold_a_step() -> None:
        running, finish = asyncio.Event(), asyncio.Event()

        async def execute(endpoint: str, body: dict[str, Any]) -> tuple[bool, str]:
            running.set()
            await finish.wait()
            return True, json.dumps({"status_code": 200, "body": {}})

        runner = BatchRunner(store, execute, Settings(batch_lease_seconds=0.4))
        task = asyncio.create_task(runner.run())
        try:
            await asyncio.wait_for(running.wait(), LONG)
            await asyncio.to_thread(in_step.wait, LONG)
            first = claimed_at()
            await until(task, lambda: claimed_at() != first)
            renewed.set()
            finish.set()
            await until(task, lambda: store.get_batch(batch["id"])["status"] == "completed")
        finally:
            renewed.set()
            task.cancel()

    asyncio.run(hold_a_step())
    store.close()
