"""OIP v2 over gRPC against the OpenAI REST route, on one server, in one run.

Embeddings: one short input per request at 1, 16 and 64 concurrent connections, REST driven by wrk and
gRPC by h2load (both C; a unary gRPC call is a POST of the 5-byte length prefix and the serialized
ModelInferRequest, so h2load sends real calls and the server cannot tell). h2load counts a gRPC error as
a 200 (its status is in the trailers), so every run is checked against the server's own counters.
  - cached: the same input repeated with the response cache on: every answer is a cache hit, so the
    figure is the protocol's own cost with the model out of the way.
  - computed: the same input with the cache off: every input goes through the model (batched), the work
    of unique inputs of that length; h2load cannot vary a body, so both protocols repeat one.
Streamed generation: 16 concurrent callers, each with its own connection (channel), asking for 64
tokens at a time, over SSE (/v1/completions, stream) and over gRPC (ModelStreamInfer, stream=true);
tokens/s, the median of rounds in ABBA order.

    .venv/bin/python loadtests/bench_grpc.py [--duration 10] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtests.bench_embeddings import run_wrk  # noqa: E402
from services.functions.hardware import describe, label  # noqa: E402
from tests.server import counter, free_port, serve, served_dtypes  # noqa: E402

RESULTS = ROOT / "loadtests" / "results"
EMBEDDER, CHAT = "all-minilm-l6-v2", "smollm2-135m-instruct"
TEXT = "the quick brown fox jumps over the lazy dog near the river"
PROMPT = "Once upon a time, in a land far away, there lived a dragon who"
CONCURRENCY = [1, 16, 64]
STREAMS, STREAM_TOKENS = 16, 64
BARS = {"cached_grpc_over_rest": 1.3, "computed_grpc_over_rest": 1.0, "streamed_grpc_over_sse": 0.95}


def grpc_body(path: Path) -> None:
    from tritonclient.grpc import service_pb2 as pb

    text = TEXT.encode()
    request = pb.ModelInferRequest(
        model_name=EMBEDDER,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="text", datatype="BYTES", shape=[1])],
        raw_input_contents=[struct.pack("<I", len(text)) + text],
    )
    message = request.SerializeToString()
    path.write_bytes(b"\0" + struct.pack(">I", len(message)) + message)


def run_h2load(address: str, body: Path, connections: int, seconds: float) -> dict[str, float]:
    done = subprocess.run(
        [
            "h2load",
            f"-c{connections}",
            "-m1",  # one call in flight per connection, as wrk has one request per connection
            f"-t{min(2, connections)}",
            f"-D{round(seconds)}",
            "--warm-up-time=1",
            "-d",
            str(body),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            f"http://{address}/inference.GRPCInferenceService/ModelInfer",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    out = done.stdout
    succeeded = int(re.search(r"(\d+) succeeded", out).group(1))
    failed = sum(int(n) for n in re.findall(r"(\d+) (?:failed|errored|timeout)", out))
    finished = float(re.search(r"finished in ([\d.]+)s", out).group(1))
    mean = re.search(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[mean.group(2)]
    return {
        "connections": connections,
        "requests": succeeded,
        "per_s": succeeded / finished,
        "mean_ms": float(mean.group(1)) * scale,
        "errors": failed,
    }


def served_texts(url: str, cached: bool) -> float:
    """Texts the server answered: cache hits, or texts through the model."""
    if cached:
        return counter(url, "fnserve_cache_lookups_total", function="embedding", result="hit")
    return counter(url, "fnserve_embedding_batch_size_sum")


def embedding_sweep(
    url: str, address: str, cached: bool, seconds: float
) -> dict[str, list[dict[str, float]]]:
    name = "cached" if cached else "computed"
    out: dict[str, list[dict[str, float]]] = {"rest": [], "grpc": []}
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "infer.bin"
        grpc_body(body)
        run_wrk(url, TEXT, 16, 3)  # warm-up, and the first answer fills the cache
        run_h2load(address, body, 16, 3)
        for connections in CONCURRENCY:
            for protocol in ("rest", "grpc"):
                before = served_texts(url, cached)
                if protocol == "rest":
                    point = run_wrk(url, TEXT, connections, seconds)
                else:
                    point = run_h2load(address, body, connections, seconds)
                served = served_texts(url, cached) - before
                # Every answer counted by the load generator was served by the server (warm-up included).
                assert served >= point["requests"], (protocol, served, point)
                point["server_counted"] = served
                out[protocol].append(point)
                rate, errors = round(point["per_s"]), point["errors"]
                print(f"{name} {protocol} c={connections}: {rate} req/s, errors {errors}", flush=True)
    return out


async def sse_caller(client: object, deadline: float) -> int:
    body = {"model": CHAT, "prompt": PROMPT, "max_tokens": STREAM_TOKENS, "temperature": 0.8, "stream": True}
    body["stream_options"] = {"include_usage": True}
    tokens = 0
    while time.monotonic() < deadline:
        async with client.stream("POST", "/v1/completions", json=body) as response:  # type: ignore[attr-defined]
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"usage":{' in line:
                    tokens += json.loads(line[6:])["usage"]["completion_tokens"]
    return tokens


async def grpc_caller(stub: object, deadline: float) -> int:
    from tritonclient.grpc import service_pb2 as pb

    def tensor(name: str, datatype: str, raw: bytes) -> tuple[object, bytes]:
        return pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=[1]), raw

    def text(value: str) -> bytes:
        return struct.pack("<I", len(value.encode())) + value.encode()

    sampling = json.dumps({"max_tokens": STREAM_TOKENS, "temperature": 0.8})
    parts = [
        tensor("text_input", "BYTES", text(PROMPT)),
        tensor("stream", "BOOL", b"\1"),
        tensor("sampling_parameters", "BYTES", text(sampling)),
    ]
    request = pb.ModelInferRequest(
        model_name=CHAT, inputs=[t for t, _ in parts], raw_input_contents=[r for _, r in parts]
    )
    tokens = 0
    while time.monotonic() < deadline:
        async for answer in stub.ModelStreamInfer(iter([request])):  # type: ignore[attr-defined]
            assert not answer.error_message, answer.error_message
            response = answer.infer_response
            if response.parameters["triton_final_response"].bool_param:
                names = [o.name for o in response.outputs]
                raw = response.raw_output_contents[names.index("num_output_tokens")]
                tokens += struct.unpack("<i", raw)[0]
    return tokens


async def streamed(protocol: str, url: str, address: str, seconds: float) -> float:
    """Tokens/s over `seconds` of STREAMS callers (answers in flight at the end count when done)."""
    import grpc
    import httpx
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    start = time.monotonic()
    deadline = start + seconds
    if protocol == "sse":
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as c:
            totals = await asyncio.gather(*(sse_caller(c, deadline) for _ in range(STREAMS)))
    else:  # a channel per caller, as httpx gives each concurrent SSE caller a connection of its own
        channels = [grpc.aio.insecure_channel(address) for _ in range(STREAMS)]
        try:
            stubs = [pb_grpc.GRPCInferenceServiceStub(channel) for channel in channels]
            totals = await asyncio.gather(*(grpc_caller(stub, deadline) for stub in stubs))
        finally:
            for channel in channels:
                await channel.close()
    return sum(totals) / (time.monotonic() - start)


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, name in zip(axes[:2], ("cached", "computed"), strict=True):
        for protocol, style in (("rest", "s--"), ("grpc", "o-")):
            points = result["embeddings"][name][protocol]
            label_ = "OpenAI REST (wrk)" if protocol == "rest" else "OIP gRPC (h2load)"
            ax.plot([p["connections"] for p in points], [p["per_s"] for p in points], style, label=label_)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent connections")
        ax.set_ylabel("requests/s")
        ax.set_title(f"embeddings, {name} ({'cache hits' if name == 'cached' else 'through the model'})")
        ax.legend(fontsize=8)
    gen = result["generation"]
    axes[2].bar(["SSE", "gRPC stream"], [gen["sse_tokens_per_s"], gen["grpc_tokens_per_s"]])
    axes[2].set_ylabel("tokens/s")
    axes[2].set_title(f"streamed generation, {STREAMS} callers (median of rounds)")
    fig.suptitle(f"{label(result['machine'])}; served in {result['served_dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=10, help="seconds per load point")
    parser.add_argument("--rounds", type=int, default=4, help="SSE/gRPC rounds of generation, ABBA order")
    parser.add_argument("--name", default="grpc", help="results file name, for runs on another machine")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"machine": describe(), "duration_s": args.duration, "embeddings": {}}
    for cached in (True, False):
        grpc_port = free_port()
        env = {"FNSERVE_GRPC_PORT": str(grpc_port)}
        if not cached:
            env["FNSERVE_EMBEDDING_CACHE_SIZE"] = "0"
        with serve(env=env) as url:
            address = f"127.0.0.1:{grpc_port}"
            result["embeddings"]["cached" if cached else "computed"] = embedding_sweep(
                url, address, cached, args.duration
            )
            if cached:
                continue
            result["served_dtype"] = served_dtypes(url)
            asyncio.run(streamed("grpc", url, address, 5))  # warm-up
            rounds: dict[str, list[float]] = {"sse": [], "grpc": []}
            for round_ in range(args.rounds):  # ABBA: a machine that drifts weighs on both alike
                for protocol in ("sse", "grpc") if round_ % 2 == 0 else ("grpc", "sse"):
                    rate = asyncio.run(streamed(protocol, url, address, args.duration * 2))
                    rounds[protocol].append(rate)
                    print(f"streamed {protocol}: {rate:.0f} tokens/s", flush=True)
    sse, grpc_ = statistics.median(rounds["sse"]), statistics.median(rounds["grpc"])
    result["generation"] = {"rounds": rounds, "sse_tokens_per_s": sse, "grpc_tokens_per_s": grpc_}

    def at(name: str, protocol: str, connections: int) -> float:
        points = result["embeddings"][name][protocol]
        return next(p["per_s"] for p in points if p["connections"] == connections)

    ratios = {
        "cached_grpc_over_rest": at("cached", "grpc", 64) / at("cached", "rest", 64),
        "computed_grpc_over_rest": at("computed", "grpc", 64) / at("computed", "rest", 64),
        "streamed_grpc_over_sse": grpc_ / sse,
    }
    result["ratios_at_64_connections_and_16_streams"] = ratios
    result["bars_met"] = {k: ratios[k] >= bar for k, bar in BARS.items()}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, RESULTS / f"{args.name}.png")
    print(json.dumps({"ratios": ratios, "bars_met": result["bars_met"]}, indent=2))


if __name__ == "__main__":
    main()
