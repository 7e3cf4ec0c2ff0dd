"""Batch jobs: throughput against the raw model, and what a running job does to online latency.

    make bench-batch     # or: .venv/bin/python loadtests/bench_batch.py [--lines 10000]

In one run, on one server (`bentoml serve`, its own batch store in a temporary folder):
1. online p50/p99 of one-input /v1/embeddings requests with nothing else running (wrk, 4 connections);
2. a batch of N one-input embedding lines alone: lines/s from its creation to its completion, as the
   server records them, against the raw model's best batch on short inputs (bar: >= 0.6);
3. the same batch again, with the same wrk load running beside it: online p50 against step 1 (bar: <= 2x).
Writes loadtests/results/batch.json and batch.png; with `--store postgres` the batch store is a real
PostgreSQL (deploy/cluster's, in a temp dir) and the files are batch-postgres.*.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.cluster.parts import temporary_postgres  # noqa: E402
from loadtests.bench_embeddings import TEXTS, measure_raw, run_wrk  # noqa: E402
from services.functions.hardware import describe  # noqa: E402
from services.jobs.store import FINAL  # noqa: E402
from tests.server import serve  # noqa: E402

RESULTS = ROOT / "loadtests" / "results"
BARS = {"batch_over_raw": 0.6, "online_p50_under_batch_over_idle": 2.0}
CONNECTIONS = 4


def run_batch(client: httpx.Client, lines: int, first: int) -> dict[str, Any]:
    """Submits `lines` one-input embedding lines and waits for the batch; its rate is taken from the
    server's own timestamps (created_at to completed_at, whole seconds), so polling costs it nothing.
    Inputs are numbered from `first`: a second job must not repeat the first's, which the embedding
    cache would answer."""
    body = "".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "all-minilm-l6-v2", "input": TEXTS["short"] % (first + i)},
            }
        )
        + "\n"
        for i in range(lines)
    )
    file = client.post("/v1/files", files={"file": ("in.jsonl", body)}, data={"purpose": "batch"}).json()
    start = time.perf_counter()
    batch = client.post(
        "/v1/batches", json={"input_file_id": file["id"], "endpoint": "/v1/embeddings"}
    ).json()
    while batch["status"] not in FINAL:
        time.sleep(1)
        batch = client.get(f"/v1/batches/{batch['id']}").json()
    elapsed = time.perf_counter() - start
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == lines, batch
    return {"lines": lines, "seconds": elapsed, "lines_per_s": lines / elapsed}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.5))
    rates = {
        "raw model\n(best batch)": result["raw_per_s"],
        "batch job": result["batch_alone"]["lines_per_s"],
    }
    ax_rate.bar(list(rates), list(rates.values()), color=["tab:gray", "tab:blue"])
    ax_rate.set_title(f"{result['batch_alone']['lines']} one-input embedding lines")
    ax_rate.set_ylabel("inputs/s")
    labels = ["idle", "batch job running"]
    points = [result["online_idle"], result["online_under_batch"]]
    for offset, key, color in ((-0.2, "p50_ms", "tab:blue"), (0.2, "p99_ms", "tab:orange")):
        ax_lat.bar([i + offset for i in range(2)], [p[key] for p in points], 0.4, label=key, color=color)
    ax_lat.set_xticks(range(2), labels)
    ax_lat.set_title(f"online /v1/embeddings latency, {CONNECTIONS} connections")
    ax_lat.set_ylabel("ms")
    ax_lat.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@contextmanager
def database(store: str, folder: Path) -> Iterator[dict[str, str]]:
    """The server's environment for the store: nothing for SQLite; a PostgreSQL's URL, and the server."""
    if store == "sqlite":
        yield {}
        return
    with temporary_postgres(folder / "postgres.log") as postgres:
        yield {"FNSERVE_BATCH_DATABASE_URL": postgres.url}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=10, help="seconds of online load per wrk point")
    parser.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    name = "batch" if args.store == "sqlite" else f"batch-{args.store}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": describe(), "store": args.store}
    raw = measure_raw(1.5)["short"]
    result["raw_per_s"], result["raw_best"] = raw["per_s"], raw["best"]

    with (
        tempfile.TemporaryDirectory() as store,
        database(args.store, Path(store)) as env,
        # Cache off: each wrk run numbers its inputs from 1 again, and online requests must reach the model.
        serve(env={**env, "FNSERVE_BATCH_DIR": store, "FNSERVE_EMBEDDING_CACHE_SIZE": "0"}) as url,
        httpx.Client(base_url=url, timeout=120) as client,
    ):
        run_wrk(url, TEXTS["short"], CONNECTIONS, 3)  # warm-up
        result["online_idle"] = run_wrk(url, TEXTS["short"], CONNECTIONS, args.duration)
        result["batch_alone"] = run_batch(client, args.lines, first=10**6)
        print(f"idle online: {result['online_idle']}\nbatch alone: {result['batch_alone']}", flush=True)

        under: dict[str, Any] = {}
        job = threading.Thread(target=lambda: under.update(run_batch(client, args.lines, first=2 * 10**6)))
        job.start()
        time.sleep(2)  # the job is created and running
        result["online_under_batch"] = run_wrk(url, TEXTS["short"], CONNECTIONS, args.duration)
        job.join()
        result["batch_with_online_load"] = under
        print(f"online under batch: {result['online_under_batch']}\nbatch beside it: {under}", flush=True)

    ratios = {
        "batch_over_raw": result["batch_alone"]["lines_per_s"] / result["raw_per_s"],
        "online_p50_under_batch_over_idle": result["online_under_batch"]["p50_ms"]
        / result["online_idle"]["p50_ms"],
    }
    result["ratios"] = ratios
    result["bars_met"] = {
        "batch_over_raw": ratios["batch_over_raw"] >= BARS["batch_over_raw"],
        "online_p50_under_batch_over_idle": ratios["online_p50_under_batch_over_idle"]
        <= BARS["online_p50_under_batch_over_idle"],
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{name}.png")
    for key, value in ratios.items():
        print(f"{key}: {value:.2f} (bar {BARS[key]}) {'MET' if result['bars_met'][key] else 'MISSED'}")


if __name__ == "__main__":
    main()
