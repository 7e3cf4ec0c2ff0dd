"""A server's life: models are released after the idle time and come back on the next request (scale to
zero in the process), and SIGTERM lets streams in flight, HTTP and gRPC, finish before the server exits."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import bentoml
import httpx
import pytest
import torch
import tritonclient.grpc as tg
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM
from tritonclient.utils import InferenceServerException

from models.catalog import CATALOG
from services.functions.lifecycle import ModelSlot, Reloadable
from services.protocols.oip.grpc import QUIET_SECONDS, REFUSING_SECONDS, closing_in
from tests.oip_client import Stream, generation_inputs
from tests.server import CACHES_OFF, LONG, counter, free_port, http_client, serve, server_processes

IDLE_SECONDS = 3
EMBEDDER, CHAT = "all-minilm-l6-v2", "smollm2-135m-instruct"
STORY = "Once upon a time, in a land far away, there lived a dragon who"
LONGEST_ANSWER = 2048  # tokens: the shutdown test's gRPC stream, in the KV cache's 4,096


@pytest.fixture(scope="module")
def idle_server() -> Iterator[tuple[str, str]]:
    """Models released after IDLE_SECONDS, and no caches; the last test here stops it with SIGTERM.
    Its URL and its gRPC address."""
    grpc_port = free_port()
    env = {
        "FNSERVE_IDLE_RELEASE_SECONDS": str(IDLE_SECONDS),
        "FNSERVE_GRPC_PORT": str(grpc_port),
        "FNSERVE_GENERATION_MAX_TOKENS": str(LONGEST_ANSWER),
        **CACHES_OFF,
    }
    with serve(env=env) as url:
        yield url, f"127.0.0.1:{grpc_port}"


def generation_rss(url: str) -> int:
    [worker] = [p for p in server_processes(url) if "generation" in p.cmdline()]
    return worker.memory_info().rss


def states(client: httpx.Client) -> dict[str, str]:
    return {name: model["state"] for name, model in client.get("/models/status").json().items()}


def wait_for_metric(url: str, name: str, model: str, at_least: float) -> None:
    deadline = time.monotonic() + LONG
    while counter(url, name, model=model) < at_least:
        assert time.monotonic() < deadline, name
        time.sleep(0.25)


def wait_for_state(client: httpx.Client, state: str, timeout: float = LONG) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while set((status := states(client)).values()) != {state}:
        assert time.monotonic() < deadline, status
        time.sleep(0.25)
    return status


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_released_weights_come_back_the_same(dtype: torch.dtype) -> None:
    """The store holds fp32: served as fp32, a wake reads the store; as bf16, a copy written once."""
    path = bentoml.models.get(CATALOG[EMBEDDER].tag).path
    weights = Reloadable(lambda: AutoModel.from_pretrained(path, dtype=dtype).eval(), path, dtype, "cpu")
    ids = torch.tensor([[101, 7592, 2088, 102]])
    with torch.inference_mode():
        before = weights.load()(ids).last_hidden_state
        for _ in range(2):
            weights.release()
            assert all(param.is_meta for param in weights._tree.parameters())
            after = weights.load()(ids).last_hidden_state
            assert torch.equal(before, after)
    assert (weights._source == weights._store) == (dtype == torch.float32)


def test_a_store_holding_both_tied_weights_is_spilled_and_read_back(tmp_path: Path) -> None:
    """Some checkpoints store the tied output embedding as well; the bf16 spill must still be written."""
    store = Path(bentoml.models.get(CATALOG[CHAT].tag).path)
    for file in ("config.json", "generation_config.json"):
        shutil.copy(store / file, tmp_path / file)
    weights = load_file(store / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, tmp_path / "model.safetensors")
    dtype = torch.bfloat16

    def build() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()

    model = Reloadable(build, str(tmp_path), dtype, "cpu")
    ids = torch.tensor([[1, 4093, 314, 260, 3575, 282, 4649, 47]])
    with torch.inference_mode():
        before = model.load()(ids).logits
        model.release()
        assert model._source != model._store  # read back from the spill
        assert torch.equal(before, model.load()(ids).logits)


def test_a_spill_cut_short_is_written_again_at_the_next_release(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk stops the bf16 spill halfway: that release fails, and the next one must write the spill
    again, not leave the wake to read the part that was written."""
    path = bentoml.models.get(CATALOG[EMBEDDER].tag).path
    dtype = torch.bfloat16
    weights = Reloadable(lambda: AutoModel.from_pretrained(path, dtype=dtype).eval(), path, dtype, "cpu")
    ids = torch.tensor([[101, 7592, 2088, 102]])
    written: list[Path] = []

    def disk_full(tensors: dict[str, torch.Tensor], filename: str) -> None:
        first = next(iter(tensors))
        save_file({first: tensors[first]}, filename)
        written.append(Path(filename))
        raise OSError("No space left on device")

    with torch.inference_mode():
        before = weights.load()(ids).last_hidden_state
        with monkeypatch.context() as patched:
            patched.setattr("safetensors.torch.save_file", disk_full)
            with pytest.raises(OSError, match="No space"):
                weights.release()
        assert not written[0].exists()  # the part written is gone
        assert not any(param.is_meta for param in weights._tree.parameters())  # still served
        weights.release()
        assert torch.equal(before, weights.load()(ids).last_hidden_state)


def test_idle_models_are_released_and_wake_on_the_next_request(idle_server: tuple[str, str]) -> None:
    url, _ = idle_server
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
    }
    with http_client(url) as client:
        # The idle clock starts when a worker is up, so a slow start-up may find models asleep already.
        first = client.post("/v1/chat/completions", json=body)
        assert first.status_code == 200 and "Paris" in first.json()["choices"][0]["message"]["content"]
        embedding = {"model": EMBEDDER, "input": "awake again"}
        vectors = client.post("/v1/embeddings", json=embedding).json()["data"]
        for _ in range(10):
            loaded_rss = generation_rss(url)
            if states(client)[CHAT] == "loaded":  # still, after the measurement
                break
            client.post("/v1/chat/completions", json=body)  # a slow machine released it meanwhile
        wait_for_state(client, "sleeping")
        wait_for_metric(url, "fnserve_model_unloads_total", EMBEDDER, 2)  # each worker releases its own
        released_rss = generation_rss(url)
        assert loaded_rss - released_rss > 150 * 2**20, (loaded_rss, released_rss)  # bf16 weights: 269 MB

        for _ in range(2):  # the first wake after the weights were released, and one more
            loads = counter(url, "fnserve_model_loads_total", model=CHAT)
            answer = client.post("/v1/chat/completions", json=body)
            assert answer.status_code == 200
            assert answer.json()["choices"] == first.json()["choices"]
            assert counter(url, "fnserve_model_loads_total", model=CHAT) == loads + 1
            wait_for_state(client, "sleeping")
        woken = client.post("/v1/embeddings", json=embedding)
        assert woken.status_code == 200 and woken.json()["data"] == vectors

        # At least: a slow machine may already have released them again.
        assert counter(url, "fnserve_model_loads_total", model=CHAT) >= 2  # at start, and on a wake-up
        assert counter(url, "fnserve_model_unloads_total", model=CHAT) >= 1
        assert counter(url, "fnserve_model_cold_start_seconds_count", model=CHAT) >= 1
        assert counter(url, "fnserve_model_unloads_total", model=EMBEDDER) >= 2  # both workers


@pytest.mark.parametrize("stopped", [True, False])
def test_weights_are_released_only_once_the_engine_loop_has_stopped(stopped: bool) -> None:
    """A loop still running after its stop wait would read meta tensors; its weights must stay."""
    from services.functions.generation import Generator

    released: list[bool] = []
    host = SimpleNamespace(weights=SimpleNamespace(release=lambda: released.append(True)))
    engine = SimpleNamespace(shutdown=lambda: stopped)
    Generator.inner.stop_engine(host, engine)
    assert released == ([True] if stopped else [])


def held_request(url: str, body: bytes) -> socket.socket:
    """An embedding request whose body is not sent yet: the server has taken it (it answered 100
    Continue) and waits for the rest, so its HTTP drain cannot end before the test lets it."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    connection = socket.create_connection((host, port), timeout=LONG)
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    )
    connection.sendall(head.encode())
    assert connection.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
    return connection


def refused_by_grpc(address: str) -> str:
    """The status of the first gRPC call the server refuses, each from a new connection."""
    deadline = time.monotonic() + LONG
    while time.monotonic() < deadline:
        client = tg.InferenceServerClient(address)
        try:
            client.is_server_live(client_timeout=LONG)
        except InferenceServerException as exc:
            return str(exc.status())
        finally:
            client.close()
        time.sleep(0.2)
    raise AssertionError(f"gRPC on {address} still took calls {LONG} s after SIGTERM")


def test_a_stopping_grpc_server_closes_its_port_once_calls_stop_coming() -> None:
    """Idle, it closes QUIET_SECONDS after the signal (not a fixed wait at every scale-down); under
    calls, it refuses each itself for up to REFUSING_SECONDS, where a closing port could cancel them."""
    signalled = 100.0
    assert closing_in(signalled, -math.inf, signalled) == QUIET_SECONDS
    assert closing_in(signalled, -math.inf, signalled + QUIET_SECONDS) == 0
    assert closing_in(signalled, 100.25, 100.5) == 0.25  # a call came: quiet from then on
    assert closing_in(signalled, 101.75, 102.0) == 0  # calls still coming: closed at the bound
    assert closing_in(signalled, 101.75, 101.75) == signalled + REFUSING_SECONDS - 101.75
    assert QUIET_SECONDS < REFUSING_SECONDS


def test_streams_in_flight_complete_after_sigterm(idle_server: tuple[str, str]) -> None:
    """An HTTP stream and a gRPC stream run to their last token, and an HTTP request taken before the
    signal is answered. The gRPC one is sized from this machine's own speed to run about 12 s, well
    past the 5 s its calls once had at shutdown. While HTTP still drains, gRPC refuses new calls (a
    balancer sends them to another replica) instead of taking them until the drain ends."""
    url, address = idle_server
    grpc_client = tg.InferenceServerClient(address)
    grpc_client.infer(CHAT, generation_inputs(STORY, 1, stream=False))  # awake, if it was released
    start = time.monotonic()
    grpc_client.infer(CHAT, generation_inputs(STORY, 16, stream=False))
    tokens = min(math.ceil(12 / ((time.monotonic() - start) / 16)), LONGEST_ANSWER)
    stream = Stream(grpc_client, headers={})
    stream.send("long", generation_inputs(STORY, tokens, ignore_eos=True))
    first, error = stream.next()
    assert error is None and first.as_numpy("finish_reason") is None, error  # running, not finished

    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "Tell me a long story about a fox."}],
        "max_tokens": 48,
        "temperature": 0,
        "stream": True,
    }
    arbiter = server_processes(url)[0]
    embedding = json.dumps({"model": EMBEDDER, "input": "taken before the signal"}).encode()
    held = held_request(url, embedding)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=LONG) as response:
        lines = response.iter_lines()
        events = [next(line for line in lines if line.startswith("data: "))]
        arbiter.send_signal(signal.SIGTERM)
        assert refused_by_grpc(address) == "StatusCode.UNAVAILABLE"
        events += [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    held.sendall(embedding)
    reply = http.client.HTTPResponse(held)
    reply.begin()
    answer = reply.read()
    held.close()
    assert reply.status == 200, answer
    assert len(json.loads(answer)["data"][0]["embedding"]) == 384
    chunks = [json.loads(event[6:]) for event in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # all 48 tokens, not cut short

    while (answer := stream.next())[0] is not None and answer[0].as_numpy("finish_reason") is None:
        pass
    result, error = answer
    assert error is None, error
    assert result.as_numpy("finish_reason")[0] == b"length"
    assert result.as_numpy("num_output_tokens")[0] == tokens  # every token, though the server stopped
    _, ended = stream.next()  # then the server ends the stream, which the client had left open
    assert ended is not None and ended.status() == "StatusCode.UNAVAILABLE", ended
    arbiter.wait(timeout=LONG)  # the open stream was ended by the server, not waited on
    stream.client.stop_stream()


async def abandon_a_load(slot: ModelSlot[str]) -> None:
    """A caller wakes the sleeping model, then gives up (its deadline) while the model loads."""

    async def caller() -> None:
        async with slot.use():
            pass

    waiting = asyncio.create_task(caller())
    while slot.state != "loading":
        await asyncio.sleep(0.01)
    waiting.cancel()


def test_a_model_woken_for_a_caller_who_gave_up_counts_its_idle_time_from_the_load() -> None:
    """The load goes on after its caller leaves (shielded); the model it brings must then stay its idle
    time, not be released at the next check because the last use was long before."""
    finish = threading.Event()

    def load() -> str:
        assert finish.wait(LONG)
        return "model"

    slot = ModelSlot("m", load, lambda model: None, idle_seconds=8)  # checked every 2 s

    async def main() -> str:
        slot._last_used -= 3600  # last used an hour ago
        releasing = asyncio.create_task(slot.release_when_idle())
        await abandon_a_load(slot)
        finish.set()
        while slot.state == "loading":
            await asyncio.sleep(0.01)
        await asyncio.sleep(2.5)  # past a check of the release loop, well within the idle time
        async with slot._lock:  # a release that began holds it to its end (the state says "loaded" then)
            state = slot.state
        releasing.cancel()
        return state

    assert asyncio.run(main()) == "loaded"


def test_shutdown_stops_the_engine_a_load_whose_callers_gave_up_brings() -> None:
    """A load runs on after its callers leave (shielded). The worker's shutdown had looked for an engine
    to stop before that load ended, found none, and the engine's loop thread, started after, kept the
    worker from exiting until it was killed."""
    finish, stopped = threading.Event(), []

    def load() -> str:
        assert finish.wait(LONG)
        return "engine"

    slot = ModelSlot("m", load, lambda model: None, idle_seconds=0)

    async def main() -> None:
        await abandon_a_load(slot)
        closing = asyncio.create_task(slot.close(stopped.append))
        await asyncio.sleep(0)  # the shutdown has begun
        finish.set()
        await asyncio.wait_for(closing, LONG)

    asyncio.run(main())
    assert stopped == ["engine"] and slot.current is None


def test_shutdown_waits_for_an_idle_release_under_way() -> None:
    """The release's thread stops the engine: a shutdown beside it had stopped the same engine at once
    (the engine's own stop is not safe to run twice at a time)."""
    began, finish, unloaded, stopped = threading.Event(), threading.Event(), [], []

    def unload(model: str) -> None:
        began.set()
        assert finish.wait(LONG)
        unloaded.append(model)

    slot = ModelSlot("m", lambda: "engine", unload, idle_seconds=0.4)  # checked every 0.1 s
    slot.load_now()

    async def main() -> bool:
        slot._last_used -= 3600
        releasing = asyncio.create_task(slot.release_when_idle())
        assert await asyncio.to_thread(began.wait, LONG)
        closing = asyncio.create_task(slot.close(stopped.append))
        await asyncio.sleep(0.1)
        waited = not closing.done()
        finish.set()
        await asyncio.wait_for(closing, LONG)
        releasing.cancel()
        return waited

    assert asyncio.run(main())
    assert unloaded == ["engine"] and stopped == [] and slot.current is None


def test_a_release_that_fails_is_tried_again_at_the_next_idle_check() -> None:
    """A failed release (a full disk for the weights' spill, say) had ended the release loop: the model
    then stayed loaded for the life of the worker."""
    unloads: list[str] = []

    def unload(model: str) -> None:
        unloads.append(model)
        if len(unloads) == 1:
            raise OSError("No space left on device")

    slot = ModelSlot("m", lambda: "model", unload, idle_seconds=0.4)  # checked every 0.1 s
    slot.load_now()

    async def main() -> None:
        releasing = asyncio.create_task(slot.release_when_idle())
        deadline = time.monotonic() + LONG
        while slot.current is not None:
            assert time.monotonic() < deadline and not releasing.done(), unloads
            await asyncio.sleep(0.05)
        releasing.cancel()

    asyncio.run(main())
    assert unloads == ["model", "model"]


def test_a_model_stopped_by_a_release_that_failed_is_loaded_again_for_the_next_caller() -> None:
    """The chat engine's release stops its loop, then sets its weights aside; when that fails (a full
    disk for the spill) the slot keeps a stopped engine. The next caller gets a working one, though
    unloading the stopped one fails again: it had failed every caller until the next idle check."""
    engines: list[dict[str, bool]] = []

    def start() -> dict[str, bool]:
        engines.append({"running": True})
        return engines[-1]

    def stop(engine: dict[str, bool]) -> None:
        engine["running"] = False
        raise OSError("No space left on device")  # the weights' spill, after the loop stopped

    slot = ModelSlot("chat", start, stop, idle_seconds=0.4, alive=lambda engine: engine["running"])
    slot.load_now()

    async def main() -> dict[str, bool]:
        releasing = asyncio.create_task(slot.release_when_idle())
        deadline = time.monotonic() + LONG
        while engines[0]["running"]:  # the release stopped it, and failed
            assert time.monotonic() < deadline and not releasing.done()
            await asyncio.sleep(0.05)
        releasing.cancel()
        async with slot.use() as engine:
            return engine

    served = asyncio.run(main())
    assert served is engines[1] and served["running"]
