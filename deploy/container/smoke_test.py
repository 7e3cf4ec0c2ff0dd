"""`make container-test`: run the image on loopback ports, wait for /readyz, check an embedding and a
streamed chat over HTTP, and the same over the OIP gRPC port with tritonclient, then stop and remove the
container (also when a check fails)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import tritonclient.grpc as tg

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from services import __version__  # noqa: E402
from tests.server import free_port  # noqa: E402


def docker_env() -> dict[str, str]:
    """The engine `make container` used: the local one when no other is reachable."""
    env = dict(os.environ)
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        script = ROOT / "deploy" / "container" / "local-engine.sh"
        host = subprocess.run([str(script)], check=True, capture_output=True, text=True).stdout.split()[-1]
        env.update(DOCKER_HOST=host, PATH=f"/usr/bin:/usr/sbin:{env['PATH']}")
    return env


def main() -> None:
    image = os.environ.get("IMAGE", "fnserve:latest")
    env, port, grpc_port = docker_env(), free_port(), free_port()
    run = [
        "docker",
        "run",
        "-d",
        "--network",
        "host",
        "-e",
        f"BENTOML_PORT={port}",
        "-e",
        "BENTOML_HOST=127.0.0.1",
        "-e",
        f"FNSERVE_GRPC_PORT={grpc_port}",
        "-e",
        "FNSERVE_GRPC_HOST=127.0.0.1",
    ]
    container = subprocess.run(
        [*run, image], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.monotonic()
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() - start < 300, "the container did not become ready in 300 s"
            time.sleep(0.5)
        print(f"ready after {time.monotonic() - start:.1f} s", flush=True)

        embedded = httpx.post(
            f"{url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hello"}, timeout=60
        )
        assert embedded.status_code == 200 and len(embedded.json()["data"][0]["embedding"]) == 384, (
            embedded.text
        )
        question = [{"role": "user", "content": "What is the capital of France?"}]
        body = {
            "model": "smollm2-135m-instruct",
            "messages": question,
            "max_tokens": 16,
            "temperature": 0,
            "stream": True,
        }
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events
        text = "".join(json.loads(event)["choices"][0]["delta"].get("content") or "" for event in events[:-1])
        assert "Paris" in text and len(events) > 5, events
        print(f"embedding: 384 dimensions; streamed chat: {len(events) - 1} chunks, {text!r}")
        # The server's metadata names its version, which the image reads from the sources it copied.
        metadata = httpx.get(f"{url}/v2", timeout=60)
        assert metadata.status_code == 200 and metadata.json()["version"] == __version__, metadata.text
        grpc_checks(f"127.0.0.1:{grpc_port}")
        print("container test passed")
    except BaseException:
        logs = subprocess.run(["docker", "logs", container], env=env, capture_output=True, text=True)
        print((logs.stdout + logs.stderr)[-3000:], file=sys.stderr)
        raise
    finally:
        subprocess.run(["docker", "rm", "-f", container], env=env, capture_output=True)


def grpc_checks(address: str) -> None:
    client = tg.InferenceServerClient(address)
    assert client.is_server_ready() and client.get_server_metadata().version == __version__
    texts = tg.InferInput("text", [1], "BYTES")
    texts.set_data_from_numpy(np.array([b"hello"], dtype=object))
    vectors = client.infer("all-minilm-l6-v2", [texts]).as_numpy("embedding")
    assert vectors.shape == (1, 384), vectors.shape
    answers: list[tuple[object, object]] = []
    client.start_stream(callback=lambda result, error: answers.append((result, error)))
    prompt = tg.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"The capital of France is"], dtype=object))
    stream = tg.InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    sampling = tg.InferInput("sampling_parameters", [1], "BYTES")
    sampling.set_data_from_numpy(np.array([b'{"max_tokens": 16}'], dtype=object))
    client.async_stream_infer("smollm2-135m-instruct", [prompt, stream, sampling], request_id="1")
    client.stop_stream()  # waits for the request's responses
    assert answers and all(error is None for _, error in answers), answers
    print(f"gRPC: embedding (1, 384); streamed generation: {len(answers)} responses")


if __name__ == "__main__":
    main()
