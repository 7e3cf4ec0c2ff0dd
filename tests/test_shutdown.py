"""Graceful shutdown: SIGTERM lets a stream in flight finish, then the server exits."""

from __future__ import annotations

import json
import signal

import httpx

from tests.server import LONG, serve, server_processes


def test_a_stream_in_flight_completes_after_sigterm() -> None:
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": "Tell me a long story about a fox."}],
        "max_tokens": 48,
        "temperature": 0,
        "stream": True,
    }
    with serve() as url:
        arbiter = server_processes(url)[0]
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=LONG) as response:
            lines = response.iter_lines()
            events = [next(line for line in lines if line.startswith("data: "))]
            arbiter.send_signal(signal.SIGTERM)
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(event[6:]) for event in events[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # all 48 tokens, not cut short
        arbiter.wait(timeout=LONG)
