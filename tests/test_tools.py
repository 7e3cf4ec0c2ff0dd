"""Tools no one here wrote, pointed at the server unchanged: inference-perf (kubernetes-sigs' LLM load
generator) streams chat completions and completions, at a small scale, and no request may fail. Its own
venv (Python 3.12) comes from `make test`; it needs the chat model's tokenizer, which the model store has,
and nothing from a hub."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import bentoml
import pytest

from tests.server import LONG, ROOT

PERF = ROOT / ".venv-perf" / "bin" / "inference-perf"
MODEL = "smollm2-135m-instruct"
# Completions take random prompts; chat has no random generator in inference-perf, so it gets system
# prompts shared by groups of questions (its shared-prefix generator).
DATA: dict[str, dict[str, Any]] = {
    "completion": {
        "type": "random",
        "input_distribution": {"min": 16, "max": 64, "mean": 32, "std_dev": 8},
        "output_distribution": {"min": 8, "max": 24, "mean": 16, "std_dev": 4},
    },
    "chat": {
        "type": "shared_prefix",
        "shared_prefix": {
            "num_groups": 2,
            "num_prompts_per_group": 4,
            "system_prompt_len": 32,
            "question_len": 16,
            "output_len": 16,
        },
    },
}


def inference_perf(url: str, api: str, out: Path) -> dict[str, Any]:
    """Four requests a second for 4 s, streamed, `ignore_eos` as the tool sends it; its summary report."""
    config = {
        "load": {"type": "constant", "stages": [{"rate": 4, "duration": 4}], "num_workers": 1},
        "api": {"type": api, "streaming": True},
        "server": {"type": "vllm", "model_name": MODEL, "base_url": url, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": bentoml.models.get(MODEL).path},
        "data": DATA[api],
        "storage": {"local_storage": {"path": str(out)}},
    }
    path = out.with_suffix(".yml")
    path.write_text(json.dumps(config))  # JSON is YAML
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run([str(PERF), "-c", str(path)], capture_output=True, text=True, timeout=LONG, env=env)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-5000:]
    return json.loads((out / "summary_lifecycle_metrics.json").read_text())


@pytest.mark.parametrize("api", ["completion", "chat"])
def test_inference_perf_streams_with_no_failed_request(server: str, api: str, tmp_path: Path) -> None:
    summary = inference_perf(server, api, tmp_path / api)
    assert summary["failures"]["count"] == 0, summary["failures"]
    assert summary["successes"]["count"] == summary["load_summary"]["count"] == 16
    latency = summary["successes"]["latency"]
    assert latency["time_to_first_token"]["mean"] > 0 and latency["inter_token_latency"]["mean"] > 0
