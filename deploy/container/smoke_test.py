"""`make container-test`: run the image on a loopback port, wait for /readyz, check an embedding and a
streamed chat, then stop and remove the container (also when a check fails)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

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
    env, port = docker_env(), free_port()
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
        print("container test passed")
    except BaseException:
        logs = subprocess.run(["docker", "logs", container], env=env, capture_output=True, text=True)
        print((logs.stdout + logs.stderr)[-3000:], file=sys.stderr)
        raise
    finally:
        subprocess.run(["docker", "rm", "-f", container], env=env, capture_output=True)


if __name__ == "__main__":
    main()
