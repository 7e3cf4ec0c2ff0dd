"""inference-perf against a server with `make serve`'s defaults: the TTFT, ITL and tokens/s that an
independent tool measures, for the README beside fnserve's own chat benchmark.

    .venv/bin/python loadtests/bench_tools.py     # ~2 minutes; writes loadtests/results/tools.json

The same small load as the test (tests/test_tools.py): two requests a second for 8 s, streamed, with
`ignore_eos`, on /v1/completions (random prompts) and /v1/chat/completions (shared-prefix prompts).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.functions.hardware import describe  # noqa: E402
from tests.server import serve, served_dtypes  # noqa: E402
from tests.test_tools import inference_perf  # noqa: E402


def main() -> None:
    result: dict[str, object] = {"machine": describe(), "tool": "inference-perf 0.7.0", "rate_per_s": 2}
    with serve() as url, tempfile.TemporaryDirectory() as tmp:
        result["served_dtypes"] = served_dtypes(url)
        for api in ("completion", "chat"):
            summary = inference_perf(url, api, Path(tmp) / api)
            ok = summary["successes"]
            latency = ok["latency"]
            result[api] = {
                "requests": summary["load_summary"]["count"],
                "failed": summary["failures"]["count"],
                "ttft_ms": {k: 1000 * latency["time_to_first_token"][k] for k in ("mean", "median", "p90")},
                "itl_ms": {k: 1000 * latency["inter_token_latency"][k] for k in ("mean", "median", "p90")},
                "output_tokens_per_s": ok["throughput"]["output_tokens_per_sec"],
                "requests_per_s": ok["throughput"]["requests_per_sec"],
            }
            print(api, json.dumps(result[api]), flush=True)
    (ROOT / "loadtests" / "results" / "tools.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
