"""A 10x load spike against the embedding and the chat functions, with locust's LoadTestShape.

    make bench-spike     # or: .venv/bin/python loadtests/spike.py [--base-embed 4] [--base-chat 2]

For each function in turn, on one server: a base load for 40 s, ten times the users for 60 s, the base
load again for 40 s. Embedding users send one short input every 0.2 s each (a paced client, so the
spike is ten times the offered load, not a closed loop that would slow itself down); chat users stream
answers of up to 32 tokens back to back. Reported per phase: requests, p50/p99 latency (time to the
last byte, for chat the whole stream), failures by kind (429s are deliberate shedding and counted
apart; timeouts and 5xx are the bar: zero), and recovery: how long after the spike ends p50 over a
5 s window is back within 1.5x of the base phase's. Writes loadtests/results/spike.json and spike.png.
"""

from __future__ import annotations

import gevent.monkey

gevent.monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
from locust import LoadTestShape, constant_pacing  # noqa: E402
from locust.env import Environment  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.locustfile import ChatUser, EmbeddingUser  # noqa: E402
from services.functions.hardware import describe  # noqa: E402
from tests.server import serve, served_dtypes  # noqa: E402

RESULTS = ROOT / "loadtests" / "results"
PHASES = (("before", 40), ("spike", 60), ("after", 40))


class PacedEmbeddingUser(EmbeddingUser):
    wait_time = constant_pacing(0.2)


class SpikeChatUser(ChatUser):
    max_tokens = 32

    def wait_time(self) -> float:
        return 0.0


class Spike(LoadTestShape):
    def __init__(self, base: int) -> None:
        super().__init__()
        self.base = base

    def tick(self) -> tuple[int, float] | None:
        elapsed = self.get_run_time()
        end = 0
        for name, seconds in PHASES:
            end += seconds
            if elapsed < end:
                users = self.base * (10 if name == "spike" else 1)
                return users, users  # reach the level within a second
        return None


def phase_of(offset: float) -> str:
    end = 0
    for name, seconds in PHASES:
        end += seconds
        if offset < end:
            return name
    return PHASES[-1][0]


def run(url: str, user: type, base: int) -> dict[str, Any]:
    env = Environment(user_classes=[user], shape_class=Spike(base), host=url)
    samples: list[tuple[float, float, str | None]] = []

    def on_request(response_time: float, exception: Exception | None, **_: Any) -> None:
        samples.append((time.monotonic(), response_time, None if exception is None else str(exception)))

    env.events.request.add_listener(on_request)
    runner = env.create_local_runner()
    start = time.monotonic()
    runner.start_shape()
    runner.shape_greenlet.join()  # the shape stops the users when its last phase ends
    runner.quit()
    return summarize(samples, start)


def summarize(samples: list[tuple[float, float, str | None]], start: float) -> dict[str, Any]:
    by_phase: dict[str, dict[str, Any]] = {}
    for name, _ in PHASES:
        rows = [(t, ms, err) for t, ms, err in samples if phase_of(t - start) == name]
        ok = [ms for _, ms, err in rows if err is None]
        errors = [err for _, _, err in rows if err is not None]
        rejected = [err for err in errors if err.startswith("429")]
        by_phase[name] = {
            "requests": len(rows),
            "p50_ms": statistics.median(ok) if ok else None,
            "p99_ms": statistics.quantiles(ok, n=100)[98] if len(ok) > 1 else None,
            "rejected_429": len(rejected),
            "timeouts": sum("timeout" in err.lower() or err.startswith("504") for err in errors),
            "server_errors": sum(err[:1] == "5" for err in errors),
            "other_failures": len(errors) - len(rejected),
            "failure_examples": sorted(set(errors))[:5],
        }
    spike_end = start + PHASES[0][1] + PHASES[1][1]
    base_p50 = by_phase["before"]["p50_ms"] or 0
    recovery = None
    for offset in range(0, PHASES[2][1] - 4):
        window = [ms for t, ms, err in samples if err is None and 0 <= t - spike_end - offset < 5]
        if window and statistics.median(window) <= 1.5 * base_p50:
            recovery = offset
            break
    series = [(round(t - start, 2), round(ms, 1), err is None) for t, ms, err in samples]
    return {"phases": by_phase, "recovery_s": recovery, "series": series}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, name in zip(axes, ("embeddings", "chat"), strict=True):
        series = result[name]["series"]
        ax.scatter([s[0] for s in series if s[2]], [s[1] for s in series if s[2]], s=2, label="ok")
        failed = [s for s in series if not s[2]]
        if failed:
            ax.scatter([s[0] for s in failed], [s[1] for s in failed], s=4, color="red", label="failed")
        edge = 0
        for _, seconds in PHASES[:-1]:
            edge += seconds
            ax.axvline(edge, color="gray", linestyle=":")
        ax.set_yscale("log")
        ax.set_title(f"{name}: base {result[name]['base_users']} users, spike x10")
        ax.set_xlabel("seconds")
        ax.set_ylabel("latency ms")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-embed", type=int, default=4)
    parser.add_argument("--base-chat", type=int, default=2)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": describe(), "phases_s": dict(PHASES)}
    with serve() as url:
        result["served_dtypes"] = served_dtypes(url)
        for name, user, base in (
            ("embeddings", PacedEmbeddingUser, args.base_embed),
            ("chat", SpikeChatUser, args.base_chat),
        ):
            result[name] = {"base_users": base, **run(url, user, base)}
            phases = result[name]["phases"]
            print(name, json.dumps(phases, indent=1), f"recovery {result[name]['recovery_s']} s", flush=True)
            gevent.sleep(5)
    bars = {
        name: all(p["timeouts"] == 0 and p["server_errors"] == 0 for p in result[name]["phases"].values())
        for name in ("embeddings", "chat")
    }
    result["bars_met"] = bars
    (RESULTS / "spike.json").write_text(json.dumps(result))
    plot(result, RESULTS / "spike.png")
    print("zero timeouts and zero 5xx:", bars)


if __name__ == "__main__":
    main()
