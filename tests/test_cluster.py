"""The local cluster, as `make cluster` starts it (deploy/cluster): two replicas behind a real HAProxy,
sharing a real PostgreSQL (batches and files) and a real Redis (the response caches)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import psycopg
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import serialize_byte_tensor

from deploy.cluster.cluster import Cluster
from deploy.cluster.parts import free_port, haproxy_stats
from tests.oip_client import Stream, generation_inputs
from tests.server import LONG, ONE_WORKER, ROOT, http_client
from tests.test_batch import CHAT, EMBEDDER, chat_line, embedding_line, final, jsonl, lines_of, wait_until

IDLE_SECONDS = 8
MAX_TOKENS = 512  # a chat's longest answer, the replicas' default (FNSERVE_GENERATION_MAX_TOKENS)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("cluster")
    env = {
        **os.environ,
        # Short leases: a killed replica's lines go to the other one within seconds.
        "FNSERVE_BATCH_LEASE_SECONDS": "6",
        "FNSERVE_IDLE_RELEASE_SECONDS": str(IDLE_SECONDS),
        # One dtype on both replicas: answers are cached per dtype, and the caching test crosses them.
        "FNSERVE_EMBEDDING_DTYPE": "float32",
        "FNSERVE_GENERATION_DTYPE": "float32",
        **ONE_WORKER,
    }
    port = free_port()
    command = [sys.executable, "-m", "deploy.cluster", "--dir", str(folder), "--replicas", "2"]
    try:
        up = [*command, "up", "--port", str(port), "--grpc-port", str(free_port())]
        started = subprocess.run(up, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"fnserve cluster: http://127.0.0.1:{port}" in started.stdout
        running = Cluster.load(folder)
        assert running is not None
        yield running
    finally:
        # Past the replicas' drain (the request deadline and its margins) and the stores' stop.
        subprocess.run([*command, "down"], env=env, cwd=ROOT, timeout=2 * LONG, check=True)
    assert Cluster.load(folder) is None


@pytest.fixture(scope="module")
def balancer(cluster: Cluster) -> Iterator[httpx.Client]:
    with http_client(cluster.url) as client:
        yield client


def replica_client(cluster: Cluster, index: int) -> httpx.Client:
    return http_client(cluster.replicas[index].url)


def embed(client: httpx.Client, text: str) -> httpx.Response:
    response = client.post("/v1/embeddings", json={"model": EMBEDDER, "input": text})
    assert response.status_code == 200, response.text
    return response


def start_batch(client: httpx.Client, lines: list[dict], endpoint: str) -> dict:
    upload = client.post("/v1/files", files={"file": ("in.jsonl", jsonl(lines))}, data={"purpose": "batch"})
    assert upload.status_code == 200, upload.text
    body = {"input_file_id": upload.json()["id"], "endpoint": endpoint, "completion_window": "24h"}
    created = client.post("/v1/batches", json=body)
    assert created.status_code == 200, created.text
    return created.json()


def every_line_once(client: httpx.Client, batch: dict, lines: list[dict]) -> list[dict]:
    """The output and error lines of a final batch: one for each input line, none twice."""
    results = lines_of(client, batch["output_file_id"]) + lines_of(client, batch["error_file_id"])
    assert sorted(r["custom_id"] for r in results) == sorted(line["custom_id"] for line in lines)
    return results


def test_the_balancer_spreads_requests_and_grpc_calls_over_both_replicas(
    cluster: Cluster, balancer: httpx.Client
) -> None:
    names = {r.name for r in cluster.replicas}
    served = {embed(balancer, f"spread {i}").headers["x-fnserve-replica"] for i in range(8)}
    assert served == names
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
    }
    with balancer.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert stream.status_code == 200 and events[-1] == "data: [DONE]" and len(events) > 3

    text = pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])
    request = pb.ModelInferRequest(model_name=EMBEDDER, inputs=[text])
    request.raw_input_contents.append(serialize_byte_tensor(np.array([b"over gRPC"], dtype=object)).item())
    answered = set()
    # One channel: HAProxy balances each call, where the kernel would pin a connection to one server.
    with grpc.insecure_channel(f"127.0.0.1:{cluster.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(8):
            response, call = stub.ModelInfer.with_call(request, timeout=LONG)
            assert np.frombuffer(response.raw_output_contents[0], dtype=np.float32).shape == (384,)
            answered.add(dict(call.initial_metadata())["x-fnserve-replica"])
    assert answered == names

    # A streamed generation through the balancer: its tokens arrive while the client's stream stays open.
    client = tg.InferenceServerClient(f"127.0.0.1:{cluster.grpc_port}")
    try:
        stream = Stream(client, {})
        stream.send("through-haproxy", generation_inputs("Hi", 8))
        texts, order = stream.collect({"through-haproxy"})
    finally:
        client.stop_stream()
        client.close()
    assert texts["through-haproxy"] and len(order) > 3


def test_an_embedding_cached_by_one_replica_is_a_hit_on_the_other(cluster: Cluster) -> None:
    text = f"cached across replicas {uuid.uuid4()}"
    with replica_client(cluster, 0) as first, replica_client(cluster, 1) as second:
        computed, cached = embed(first, text), embed(second, text)
    assert computed.headers["x-fnserve-cache"] == "miss" and cached.headers["x-fnserve-cache"] == "hit"
    assert cached.json()["data"] == computed.json()["data"]


def test_a_batch_job_is_created_read_listed_cancelled_and_downloaded_on_different_replicas(
    cluster: Cluster,
) -> None:
    lines = [chat_line(i, max_tokens=32) for i in range(40)]
    with replica_client(cluster, 0) as one, replica_client(cluster, 1) as other:
        batch = start_batch(one, lines, "/v1/chat/completions")
        assert other.get(f"/v1/files/{batch['input_file_id']}/content").content == jsonl(lines)
        assert other.get(f"/v1/batches/{batch['id']}").json()["input_file_id"] == batch["input_file_id"]
        assert batch["id"] in [
            b["id"] for b in other.get("/v1/batches", params={"limit": 100}).json()["data"]
        ]
        wait_until(other, batch["id"], lambda b: b["request_counts"]["completed"] >= 1)
        cancelled = one.post(f"/v1/batches/{batch['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] in ("cancelling", "cancelled")
        ended = wait_until(other, batch["id"], final)
        results = every_line_once(other, ended, lines)
    assert ended["status"] == "cancelled"
    codes = {r["error"]["code"] for r in results if r["error"]}
    assert codes == {"batch_cancelled"} and 1 <= ended["request_counts"]["completed"] < 40


def test_replicas_that_released_their_models_are_still_routed_to_and_wake(
    cluster: Cluster, balancer: httpx.Client
) -> None:
    for index in range(2):
        with replica_client(cluster, index) as replica:
            deadline = time.monotonic() + LONG
            while {m["state"] for m in replica.get("/models/status").json().values()} != {"sleeping"}:
                assert time.monotonic() < deadline, "the replica never released its models"
                time.sleep(1)
    served = {embed(balancer, f"wake {i}").headers["x-fnserve-replica"] for i in range(4)}
    assert served == {r.name for r in cluster.replicas}
    for i in range(2):  # each replica's generation service, asleep too
        answer = balancer.post("/v1/chat/completions", json=chat_line(i, max_tokens=8)["body"])
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]


def test_the_database_going_away_answers_503_and_loses_nothing(
    cluster: Cluster, balancer: httpx.Client
) -> None:
    done = wait_until(
        balancer, start_batch(balancer, [embedding_line(i) for i in range(20)], "/v1/embeddings")["id"], final
    )
    content = balancer.get(f"/v1/files/{done['output_file_id']}/content").content
    lines = [chat_line(i, max_tokens=24) for i in range(16)]
    running = start_batch(balancer, lines, "/v1/chat/completions")
    wait_until(balancer, running["id"], lambda b: b["request_counts"]["completed"] >= 1)
    cluster.stop_database()
    try:
        # Each route on one replica, all at once: each waits its few seconds for the pool and probes,
        # unless the replica's runner already found the database away (then the store's breaker
        # refuses them at once). Through the balancer a refused read is tried three times over.
        routes = [
            ("GET", f"/v1/batches/{done['id']}"),
            ("GET", "/v1/batches"),
            ("GET", f"/v1/files/{done['output_file_id']}/content"),
            ("POST", f"/v1/batches/{running['id']}/cancel"),
        ]
        with replica_client(cluster, 0) as replica, ThreadPoolExecutor(len(routes)) as pool:
            responses = list(pool.map(lambda route: replica.request(*route), routes))
            for (_, path), response in zip(routes, responses, strict=True):
                assert response.status_code == 503, (path, response.text)
                error = response.json()["error"]
                assert error["code"] == "batch_store_unavailable" and "database" in error["message"]
                assert int(response.headers["retry-after"]) > 0
        embed(balancer, "online requests do not need the database")
        # A refused upload was not sent to the other replica: a copy that went through would be a
        # second file. A read is (retried reads are harmless), and its 503 reaches the caller whole.
        before = retries(cluster)
        upload = balancer.post("/v1/files", files={"file": ("in.jsonl", b"{}")}, data={"purpose": "batch"})
        assert upload.status_code == 503 and retries(cluster) == before
        listed = balancer.get("/v1/batches")
        assert listed.status_code == 503 and retries(cluster) > before
        assert listed.json()["error"]["code"] == "batch_store_unavailable"
    finally:
        cluster.start_database()
    # Each replica in turn, not whichever the balancer picks: one whose last probe failed just before the
    # database came back refuses for up to a second more, and the next test's first call may land there.
    deadline = time.monotonic() + LONG
    for index in range(len(cluster.replicas)):
        with replica_client(cluster, index) as replica:
            while (back := replica.get(f"/v1/batches/{done['id']}")).status_code != 200:
                assert back.status_code == 503 and time.monotonic() < deadline, back.text
                time.sleep(0.25)
        assert back.json() == done
    assert balancer.get(f"/v1/files/{done['output_file_id']}/content").content == content
    ended = wait_until(balancer, running["id"], final)  # the cancel above was refused: it runs on
    assert ended["status"] == "completed" and ended["request_counts"]["completed"] == 16
    every_line_once(balancer, ended, lines)


def retries(cluster: Cluster) -> int:
    """HAProxy's count of requests it sent again (to the same replica, or to another)."""
    backend = haproxy_stats(cluster.stats)[("replicas", "BACKEND")]
    return int(backend["wretr"] or 0) + int(backend["wredis"] or 0)


def held_by(cluster: Cluster, batch_id: str, pids: set[int]) -> set[int]:
    """The lines of the batch that the workers with these PIDs are running (owners are `instance/pid`)."""
    with psycopg.connect(cluster.database_url) as db:
        rows = db.execute(
            "SELECT idx, owner FROM lines WHERE batch_id = %s AND state = 'running'", (batch_id,)
        ).fetchall()
    return {idx for idx, owner in rows if int(owner.rsplit("/", 1)[1]) in pids}


def test_a_replica_killed_mid_job_hands_its_lines_to_the_other_and_rejoins_when_started(
    cluster: Cluster, balancer: httpx.Client
) -> None:
    dead, alive = cluster.replicas
    part = cluster.parts[dead.name]
    pids = {proc.pid for proc in part.tree()}
    # Lines of 32 tokens past the end of text, 32 decode steps each, so that a line seen running is still
    # running when the kill lands a few milliseconds later: a short answer could finish in between. (At
    # 48 tokens the survivor's share was this test's longest step: 23 s of its 38, measured alone.)
    # Twice the lines that both replicas run at once (FNSERVE_BATCH_GENERATION_CONCURRENCY), so that
    # some wait for a claim.
    lines = [chat_line(i, max_tokens=32) for i in range(16)]
    for line in lines:
        line["body"]["ignore_eos"] = True
    batch = start_batch(balancer, lines, "/v1/chat/completions")
    deadline = time.monotonic() + LONG
    while not held_by(cluster, batch["id"], pids):
        assert time.monotonic() < deadline, "the replica to kill never claimed a line"
        time.sleep(0.2)
    part.kill()  # SIGKILL to its whole process tree: no shutdown hook runs
    held = held_by(cluster, batch["id"], pids)  # what it held as it died: it cannot settle them now
    assert held
    with http_client(alive.url) as survivor:
        ended = wait_until(survivor, batch["id"], final)
        results = every_line_once(survivor, ended, lines)
    assert not part.running()
    assert ended["status"] == "completed" and ended["request_counts"] == {
        "total": 16,
        "completed": 16,
        "failed": 0,
    }
    assert all(r["response"]["status_code"] == 200 for r in results)
    with psycopg.connect(cluster.database_url) as db:
        attempts = dict(
            db.execute("SELECT idx, attempts FROM lines WHERE batch_id = %s", (batch["id"],)).fetchall()
        )
    assert all(attempts[idx] >= 2 for idx in held)  # run again by the survivor, and recorded once
    for i in range(6):  # the balancer routes around the dead replica
        assert embed(balancer, f"after the kill {i}").headers["x-fnserve-replica"] == alive.name

    # Started again: while it loads, callers are answered by the survivor, never with a 5xx.
    cluster.start_replica(dead.name)
    answered: list[tuple[int, str]] = []
    deadline = time.monotonic() + LONG
    while dead.name not in {replica for _, replica in answered}:
        assert time.monotonic() < deadline, "the restarted replica never served"
        body = {"model": EMBEDDER, "input": f"while it loads {len(answered)}"}
        response = balancer.post("/v1/embeddings", json=body)
        answered.append((response.status_code, response.headers.get("x-fnserve-replica", "")))
    assert {status for status, _ in answered} == {200}, answered
    # With the settings the cluster was started with, not those of the process that started it again.
    with replica_client(cluster, 0) as restarted, replica_client(cluster, 1) as other:
        assert choices(restarted) == choices(other)


def choices(replica: httpx.Client) -> dict[str, dict[str, str]]:
    """Each model's choices that a setting made (measured ones may differ from run to run)."""
    status = replica.get("/models/status").json()
    return {
        model: {name: made["value"] for name, made in entry["choices"].items() if made["source"] == "setting"}
        for model, entry in status.items()
    }


def test_the_cluster_state_is_its_owners_alone(cluster: Cluster) -> None:
    """It holds the settings the replicas started with, which may be API keys."""
    state = cluster.folder / "cluster.json"
    assert state.stat().st_mode & 0o077 == 0
    assert json.loads(state.read_text())["settings"]["FNSERVE_IDLE_RELEASE_SECONDS"] == str(IDLE_SECONDS)


def accepts(url: str) -> bool:
    address = httpx.URL(url)
    try:
        socket.create_connection((address.host, address.port), timeout=2).close()
    except OSError:
        return False
    return True


def test_cluster_down_answers_the_stream_in_flight_then_stops_everything(cluster: Cluster) -> None:
    """`make cluster-down` while a chat streams through the balancer: HAProxy closes its port at once
    but keeps the connection it has (its soft stop), the replica answers to the last token, then
    every part stops. (The balancer's hard stop cut such a stream mid-answer.) The stream is sized from
    this machine's speed. Last in this module: it stops the cluster."""
    body = {
        "model": CHAT, "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 16, "ignore_eos": True, "speculation": "off",
    }  # fmt: skip
    for index in range(2):  # awake on both replicas: a model load in the timing would shorten the stream
        with replica_client(cluster, index) as replica:
            woken = replica.post("/v1/chat/completions", json={**body, "max_tokens": 1})
            assert woken.status_code == 200, woken.text
    start = time.monotonic()
    assert httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=LONG).status_code == 200
    # About 10 s of stream on this machine: far longer than `down` takes to reach the balancer.
    tokens = min(math.ceil(10 / ((time.monotonic() - start) / 16)), MAX_TOKENS)
    body |= {"max_tokens": tokens, "stream": True, "stream_options": {"include_usage": True}}
    arrived: list[tuple[float, str]] = []
    command = [sys.executable, "-m", "deploy.cluster", "--dir", str(cluster.folder), "down"]
    with (
        http_client() as client,
        client.stream("POST", f"{cluster.url}/v1/chat/completions", json=body) as stream,
    ):
        assert stream.status_code == 200
        reader = threading.Thread(
            target=lambda: arrived.extend((time.monotonic(), line) for line in stream.iter_lines())
        )
        reader.start()
        down = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + LONG
        while accepts(cluster.url):
            assert time.monotonic() < deadline, "the balancer never closed its port"
            time.sleep(0.05)
        closed = time.monotonic()
        reader.join(LONG)
    events = [line.removeprefix("data: ") for _, line in arrived if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == tokens
    assert any(at > closed for at, _ in arrived), "the stream ended before the balancer stopped"
    said, _ = down.communicate(timeout=LONG)
    assert down.returncode == 0 and "cluster stopped" in said, said
    assert not any(part.running() for part in cluster.parts.values())
