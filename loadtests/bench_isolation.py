"""Embedding latency beside a flood of large images, in one run: how well one server's functions keep out
of each other's way.

(a) alone: wrk at 1 connection posting one short text to /v1/embeddings;
(b) beside images: the same, while a second wrk at 4 connections posts 8 photos of 2400x1800 each to
    /v1/images/classifications.
One `bentoml serve services.service:Frontend` (one entry worker, caches off), of this checkout or of
`--checkout`, to compare code. Reported: p50 and p99 of (a) and (b), and images/s. No bar: the figures
compare code on one machine (README, Images).

    .venv/bin/python loadtests/bench_isolation.py [--duration 20] [--checkout PATH] [--name NAME]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.bench_embeddings import run_wrk  # noqa: E402
from services.functions.hardware import describe  # noqa: E402
from tests.server import CACHES_OFF, ONE_WORKER, serve  # noqa: E402

RESULTS = ROOT / "loadtests" / "results"
IMAGES_LUA = ROOT / "loadtests" / "images.lua"
PHOTOS, FLOODERS = 8, 4
TEXT = "a short probe sentence about the weather"


def photos(count: int) -> list[str]:
    """Noise compresses badly, so each file is as large as a photo this size gets (about 2.5 MB)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (1800, 2400, 3), dtype=np.uint8)).save(
            buffer, "JPEG", quality=85
        )
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    return encoded


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=20, help="seconds per wrk point")
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the code to serve")
    parser.add_argument("--name", default="isolation", help="results file name")
    args = parser.parse_args()
    result: dict[str, object] = {
        "machine": describe(),
        "duration_s": args.duration,
        "checkout": str(args.checkout),
    }
    env = {
        **CACHES_OFF,
        **ONE_WORKER,
        "FNSERVE_IMAGE_CACHE_SIZE": "0",
        "FNSERVE_MAX_BODY_BYTES": str(64 * 2**20),
    }
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body.json"
        body.write_text(json.dumps({"model": "efficientnet-lite0", "image": photos(PHOTOS), "top_k": 1}))
        flood = {"WRK_BODY_FILE": str(body)}
        with serve(env=env, cwd=args.checkout) as url:
            run_wrk(url, TEXT, 1, 5)  # warm-up
            result["alone"] = run_wrk(url, TEXT, 1, args.duration)
            with ThreadPoolExecutor(2) as both:
                images = both.submit(run_wrk, url, "", FLOODERS, args.duration, IMAGES_LUA, flood)
                result["beside_images"] = run_wrk(url, TEXT, 1, args.duration)
                result["images"] = images.result()
    alone, beside, images = result["alone"], result["beside_images"], result["images"]
    for name, point in (("alone", alone), ("beside images", beside)):
        latency = f"p50 {point['p50_ms']:.0f} ms, p99 {point['p99_ms']:.0f} ms"
        print(f"embedding {name}: {latency}, {point['per_s']:.1f}/s")
    print(f"images: {PHOTOS * images['per_s']:.1f}/s served, {images['errors']} errors")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
