"""The local cluster (deploy/cluster) under load: what the balancer's hop costs, and what a replica's
death loses, in one run.

    make bench-cluster    # or: .venv/bin/python loadtests/bench_cluster.py [--duration 15]

wrk posts one unique short embedding input per request at 64 connections (loadtests/embeddings.lua) to:
(a) one fnserve server alone (`bentoml serve`, its default workers), the single-machine baseline;
(b) one replica of the cluster directly; (c) the two replicas through HAProxy; (d) the same through
HAProxy while one replica's whole process tree is killed with SIGKILL a third into the run. The cache
is off, so every request reaches a model. On one machine the replicas share its cores, so (c) against
(b) is the hop through HAProxy, not added capacity; (d) counts what callers saw fail. Writes
loadtests/results/cluster.json and cluster.png (`--name`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deploy.cluster.cluster import Cluster  # noqa: E402
from deploy.cluster.parts import free_port  # noqa: E402
from loadtests.bench_embeddings import LUA, TEXTS, run_wrk  # noqa: E402
from services.functions.hardware import describe, label  # noqa: E402
from tests.server import serve  # noqa: E402

RESULTS = ROOT / "loadtests" / "results"
CONNECTIONS = 64
CACHE_OFF = {"FNSERVE_EMBEDDING_CACHE_SIZE": "0"}


def wrk_while_killing(url: str, seconds: float, cluster: Cluster, victim: str) -> dict[str, float]:
    """wrk through the balancer; the victim dies a third into the run."""
    command = [
        "wrk", "-t2", f"-c{CONNECTIONS}", f"-d{round(seconds)}s", "--timeout", "30s", "-s", str(LUA), url,
    ]  # fmt: skip
    env = {**os.environ, "WRK_TEXT": TEXTS["short"]}
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as wrk:
        time.sleep(seconds / 3)
        cluster.parts[victim].kill()
        out, _ = wrk.communicate()
    stats = json.loads(out.strip().splitlines()[-1])
    errors = {k: stats[k] for k in ("errors_connect", "errors_read", "errors_timeout", "errors_status")}
    return {
        "requests": stats["requests"],
        "per_s": stats["requests"] / (stats["duration_us"] / 1e6),
        **errors,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["alone", "replica", "balanced", "balanced_kill"]
    captions = ["one server", "one replica\n(direct)", "2 replicas\nvia HAProxy", "via HAProxy,\none killed"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bars = ax.bar(captions, [result[name]["per_s"] for name in names], color="tab:blue")
    for bar, name in zip(bars, names, strict=True):
        failed = result[name].get("failed", 0)
        top = (bar.get_x() + bar.get_width() / 2, bar.get_height())
        ax.annotate(
            f"{result[name]['per_s']:.0f}/s, {failed} failed", top, ha="center", va="bottom", fontsize=8
        )
    ax.set_ylabel(f"requests/s at {CONNECTIONS} connections (short embedding input)")
    fig.suptitle(label(result["machine"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def failed(point: dict[str, float]) -> int:
    return int(sum(v for k, v in point.items() if k.startswith("errors")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=15, help="seconds per wrk point")
    parser.add_argument("--name", default="cluster", help="results file name, for runs on another machine")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = TEXTS["short"]
    result: dict = {"machine": describe(), "duration_s": args.duration, "connections": CONNECTIONS}

    with serve(env=CACHE_OFF) as url:
        run_wrk(url, text, CONNECTIONS, 5)  # warm-up
        result["alone"] = run_wrk(url, text, CONNECTIONS, args.duration)

    os.environ.update(CACHE_OFF)  # the replicas inherit it
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="fnserve-bench-cluster-")), free_port(), free_port())
    try:
        cluster.up(2)
        replica = cluster.replicas[0].url
        for url in (replica, cluster.url):
            run_wrk(url, text, CONNECTIONS, 5)
        result["replica"] = run_wrk(replica, text, CONNECTIONS, args.duration)
        result["balanced"] = run_wrk(cluster.url, text, CONNECTIONS, args.duration)
        result["balanced_kill"] = wrk_while_killing(
            cluster.url, args.duration, cluster, cluster.replicas[1].name
        )
    finally:
        cluster.down()
    for name in ("alone", "replica", "balanced", "balanced_kill"):
        result[name]["failed"] = failed(result[name])
    result["ratios"] = {
        "balanced_over_replica": result["balanced"]["per_s"] / result["replica"]["per_s"],
        "balanced_over_alone": result["balanced"]["per_s"] / result["alone"]["per_s"],
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    plot(result, RESULTS / f"{args.name}.png")
    for name in ("alone", "replica", "balanced", "balanced_kill"):
        print(f"{name}: {result[name]['per_s']:.1f}/s, {result[name]['failed']} failed")
    for key, value in result["ratios"].items():
        print(f"{key}: {value:.2f}")


if __name__ == "__main__":
    main()
