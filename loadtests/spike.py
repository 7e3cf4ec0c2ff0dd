"""A 10x spike of embeddings and chat at once, on one server with its defaults.

    make bench-spike     # or: .venv/bin/python loadtests/spike.py [--base-embed 8] [--base-chat 2]

The shape: 8 embedding clients and 2 chat clients for 15 s, 80 and 20 for 45 s, 8 and 2 again for 15 s.
`--base-images N` adds N image-classification clients (10N in the spike): both encoders of each entry
worker then flood at once, beside the chat.
Every client is closed-loop (its next request when the last one ends) and gives up after 30 s. Chats
stream 16 tokens. Then the same server answers chat alone at the spike's chat concurrency, the base of
the chat bar.

h2load drives it (C, one thread per function, so the load costs the server little). It logs each
request's start, status and duration. A request is a timeout if h2load gave up on it (`-N 30`, no byte
for 30 s) or if it took longer than 30 s. h2load retries a refused request at once and ignores
Retry-After, so the refusals are a worst case. It repeats one body, so the response caches are off;
everything else is the server's defaults.

Bars: zero timeouts and zero 5xx; every refusal a 429 or 503 (Retry-After on each is asserted by the
tests); chats answered during the spike at least half of what chat alone answers.
Writes loadtests/results/spike.json and spike.png (`--name` for another name).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.bench_images import MODEL as IMAGE_MODEL  # noqa: E402
from loadtests.bench_images import photo  # noqa: E402
from services.functions.hardware import describe, label  # noqa: E402
from tests.server import serve, served_dtypes  # noqa: E402

RESULTS = ROOT / "loadtests" / "results"
PHASES = (("before", 15.0), ("spike", 45.0), ("after", 15.0))
CLIENT_TIMEOUT_S = 30
CHAT_TOKENS = 16
BODIES = {
    "embeddings": ("/v1/embeddings", {"model": "all-minilm-l6-v2", "input": "a short sentence to embed"}),
    "chat": (
        "/v1/chat/completions",
        {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": CHAT_TOKENS,
            "stream": True,
        },
    ),
}
ENV = {f"FNSERVE_{name}_CACHE_SIZE": "0" for name in ("EMBEDDING", "IMAGE", "GENERATION")}


def body_of(name: str) -> tuple[str, dict[str, Any]]:
    """The route and the one body a function's clients send."""
    if name == "images":
        image = base64.b64encode(photo()).decode()
        return "/v1/images/classifications", {"model": IMAGE_MODEL, "image": image, "top_k": 5}
    return BODIES[name]


def h2load(url: str, body: Path, clients: int, seconds: float, log: Path) -> dict[str, int]:
    """Closed-loop clients for `seconds`; h2load's own counts of what it gave up on."""
    done = subprocess.run(
        [
            "h2load",
            "--h1",
            f"-c{clients}",
            "-t1",
            "-m1",
            f"-D{round(seconds)}",
            f"-N{CLIENT_TIMEOUT_S}",
            f"--log-file={log}",
            "-d",
            str(body),
            "-H",
            "content-type: application/json",
            url,
        ],  # fmt: skip
        capture_output=True,
        text=True,
        check=False,
    )
    counts = dict.fromkeys(("timeout", "errored"), 0)
    for count, kind in re.findall(r"(\d+) (timeout|errored)", done.stdout):
        counts[kind] = int(count)
    return counts


def drive(url: str, name: str, base: int, tmp: Path, start: float) -> list[dict[str, Any]]:
    """`base` clients for the whole shape and 9x`base` more for the spike, as two h2load runs."""
    path, payload = body_of(name)
    body = tmp / f"{name}.json"
    body.write_text(json.dumps(payload))
    total = sum(seconds for _, seconds in PHASES)
    runs = [(base, 0.0, total), (9 * base, PHASES[0][1], PHASES[1][1])]
    results: list[dict[str, Any]] = []

    def one(clients: int, offset: float, seconds: float) -> None:
        time.sleep(max(0.0, start + offset - time.time()))
        log = tmp / f"{name}-{clients}.log"
        counts = h2load(f"{url}{path}", body, clients, seconds, log)
        results.append({"clients": clients, "gave_up": counts, "rows": read_log(log)})

    threads = [threading.Thread(target=one, args=run) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def read_log(log: Path) -> list[tuple[float, int, float]]:
    """(start in s since the epoch, status, seconds) per request h2load finished."""
    rows = []
    for line in log.read_text().splitlines():
        started, status, micros = line.split("\t")[:3]
        rows.append((int(started) / 1e6, int(status), int(micros) / 1e6))
    return rows


def phase_of(offset: float) -> str:
    end = 0.0
    for name, seconds in PHASES:
        end += seconds
        if offset < end:
            return name
    return PHASES[-1][0]


def summarize(runs: list[dict[str, Any]], start: float) -> dict[str, Any]:
    rows = [row for run in runs for row in run["rows"]]
    phases: dict[str, Any] = {}
    for name, seconds in PHASES:
        mine = [(status, took) for began, status, took in rows if phase_of(began - start) == name]
        late = [took for status, took in mine if took > CLIENT_TIMEOUT_S]
        answered = [took for status, took in mine if 200 <= status < 300 and took <= CLIENT_TIMEOUT_S]
        phases[name] = {
            "answered": len(answered),
            "answered_per_s": len(answered) / seconds,
            "refused_429": sum(status == 429 for status, _ in mine),
            "refused_503": sum(status == 503 for status, _ in mine),
            "timeouts": len(late),
            "server_errors": sum(status >= 500 and status != 503 for status, _ in mine),
            "other": sum(
                not (200 <= status < 300 or status in (429, 503) or status >= 500) for status, _ in mine
            ),
            "p50_ms": 1000 * statistics.median(answered) if answered else None,
            "p99_ms": 1000 * statistics.quantiles(answered, n=100)[98] if len(answered) > 1 else None,
        }
    gave_up = sum(run["gave_up"]["timeout"] + run["gave_up"]["errored"] for run in runs)
    series = [(round(began - start + took, 2), status, round(took, 3)) for began, status, took in rows]
    return {"phases": phases, "gave_up": gave_up, "series": sorted(series)}


def chat_alone(url: str, tmp: Path, clients: int, seconds: float) -> dict[str, Any]:
    path, payload = BODIES["chat"]
    body, log = tmp / "alone.json", tmp / "alone.log"
    body.write_text(json.dumps(payload))
    counts = h2load(f"{url}{path}", body, clients, seconds, log)
    rows = read_log(log)
    answered = [took for _, status, took in rows if status == 200 and took <= CLIENT_TIMEOUT_S]
    return {
        "clients": clients,
        "answered_per_s": len(answered) / seconds,
        "refused": sum(status in (429, 503) for _, status, _ in rows),
        "gave_up": counts,
        "p50_ms": 1000 * statistics.median(answered) if answered else None,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in ("embeddings", "images", "chat") if name in result]
    fig, axes = plt.subplots(2, len(names), figsize=(6.5 * len(names), 7), sharex=True, squeeze=False)
    total = int(sum(seconds for _, seconds in PHASES))
    for column, name in enumerate(names):
        series = result[name]["series"]
        top, bottom = axes[0][column], axes[1][column]
        for kind, keep, color in (
            ("answered", lambda s: 200 <= s < 300, "tab:blue"),
            ("refused (429/503)", lambda s: s in (429, 503), "tab:orange"),
            ("5xx or timed out", lambda s: s >= 500 and s != 503, "tab:red"),
        ):
            per_second = [0] * (total + 5)
            for ended, status, took in series:
                if keep(status) and took <= CLIENT_TIMEOUT_S and int(ended) < len(per_second):
                    per_second[int(ended)] += 1
            if any(per_second):
                top.plot(range(len(per_second)), per_second, label=kind, color=color)
        answered = [(ended, took) for ended, status, took in series if 200 <= status < 300]
        bottom.scatter([a[0] for a in answered], [1000 * a[1] for a in answered], s=2)
        bottom.set_yscale("log")
        bottom.set_ylabel("latency of answered, ms")
        bottom.set_xlabel("seconds")
        top.set_ylabel("per second")
        top.set_title(f"{name}: {result[name]['base_clients']} clients, x10 from 15 to 60 s")
        top.legend(fontsize=8)
        for ax in (top, bottom):
            for edge in (PHASES[0][1], PHASES[0][1] + PHASES[1][1]):
                ax.axvline(edge, color="gray", linestyle=":")
    fig.suptitle(label(result["machine"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def rejections(url: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        matched = re.match(r'fnserve_rejections_total\{.*reason="(\w+)".*\} ([\d.e+]+)', line)
        if matched:
            found[matched.group(1)] = found.get(matched.group(1), 0) + float(matched.group(2))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-embed", type=int, default=8)
    parser.add_argument("--base-chat", type=int, default=2)
    parser.add_argument("--base-images", type=int, default=0)
    parser.add_argument("--name", default="spike", help="results file name, for runs with other settings")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": describe(), "phases_s": dict(PHASES), "env": ENV}
    with tempfile.TemporaryDirectory() as tmp, serve(env=ENV) as url:
        result["served_dtypes"] = served_dtypes(url)
        result["choices"] = httpx.get(f"{url}/models/status", timeout=60).json()
        start = time.time() + 1
        bases = {"embeddings": args.base_embed, "chat": args.base_chat}
        if args.base_images:
            bases["images"] = args.base_images
        runs: dict[str, list[dict[str, Any]]] = {}
        threads = [
            threading.Thread(
                target=lambda n=name: runs.__setitem__(n, drive(url, n, bases[n], Path(tmp), start))
            )
            for name in bases
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name, base in bases.items():
            result[name] = {"base_clients": base, **summarize(runs[name], start)}
        result["rejections"] = rejections(url)
        time.sleep(5)
        result["chat_alone"] = chat_alone(url, Path(tmp), 10 * args.base_chat, PHASES[1][1] / 2)
    spike_chat = result["chat"]["phases"]["spike"]["answered_per_s"]
    result["chat_spike_over_alone"] = spike_chat / max(result["chat_alone"]["answered_per_s"], 1e-9)
    clean = {
        name: result[name]["gave_up"] == 0
        and all(
            p["timeouts"] == 0 and p["server_errors"] == 0 and p["other"] == 0
            for p in result[name]["phases"].values()
        )
        for name in bases
    }
    bars = {f"{name}_no_timeouts_or_5xx": ok for name, ok in clean.items()}
    bars["chat_spike_at_least_half_of_alone"] = result["chat_spike_over_alone"] >= 0.5
    result["bars_met"] = bars
    result["settings"] = {k: v for k, v in os.environ.items() if k.startswith("FNSERVE_")}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result))
    plot(result, RESULTS / f"{args.name}.png")
    for name in bases:
        print(name, json.dumps(result[name]["phases"], indent=1), "gave up:", result[name]["gave_up"])
    print(
        "chat alone:",
        json.dumps(result["chat_alone"]),
        "spike/alone",
        round(result["chat_spike_over_alone"], 3),
    )
    print("rejections:", result["rejections"])
    print("bars:", json.dumps(result["bars_met"]))


if __name__ == "__main__":
    main()
