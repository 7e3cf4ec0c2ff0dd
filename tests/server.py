"""Start and stop real servers: used by the tests and by the benchmarks in loadtests/."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil

from deploy.cluster.parts import free_port, kill_all, shared_home

ROOT = Path(__file__).resolve().parents[1]
BENTOML = [sys.executable, "-m", "bentoml"]
# A request's outer limit in tests: generous, so that a slow or busy machine makes a test slower, never
# failing; what a test asserts is exact.
LONG = 600
# The server (uvicorn, under BentoML) closes a connection idle for 5 s, and httpx's pool keeps one for 5 s
# too: a request sent on a pooled connection just as the server closed it failed with "Server
# disconnected without sending a response" (seen once in a clean-clone run on the Zen 4). A client has
# to let idle connections go first.
KEEP_ALIVE = httpx.Limits(keepalive_expiry=2)


def http_client(base_url: str = "", **options: object) -> httpx.Client:
    """The tests' HTTP client: the outer limit LONG, and idle connections let go before the server's."""
    return httpx.Client(base_url=base_url, timeout=LONG, limits=KEEP_ALIVE, **options)  # type: ignore[arg-type]


# For measurements and tests that must reach the model: a cached answer is served without it.
CACHES_OFF = {"FNSERVE_EMBEDDING_CACHE_SIZE": "0", "FNSERVE_GENERATION_CACHE_SIZE": "0"}
# For servers whose tests are not about the entry workers: each worker imports torch and loads the
# encoders, and a second one made a server's start-up 16 s instead of 10 s on the 2-core Zen 3 here.
ONE_WORKER = {"FNSERVE_EMBEDDING_WORKERS": "1"}
# The session server's cap on batch input files (tests/test_batch.py uploads one past it).
BATCH_MAX_FILE_BYTES = 2_000_000
# The capped server's image limits (tests/test_images.py sends images past each).
IMAGE_MAX_PIXELS, IMAGE_MAX_BYTES = 4_000_000, 2_000_000
# The keyed server's API keys and body cap (tests/test_admission.py, tests/test_oip.py).
KEYS = ("first-key", "second-key")
MAX_BODY = 100_000


def stop_tree(proc: subprocess.Popen[bytes]) -> None:
    """bentoml's workers run in their own sessions: signal the arbiter, then kill what is left."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    kill_all(family)


@contextmanager
def serve(
    target: str = "services.service:Frontend",
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    port: int | None = None,
) -> Iterator[str]:
    """Serve `target` (an import string or a Bento tag) and yield its base URL once /readyz answers,
    on `port` (a restarted server's) or a free one. Its gRPC port and its batch store are its own too,
    unless `env` names them (FNSERVE_GRPC_PORT, FNSERVE_BATCH_DIR): servers on one store would run each
    other's batch lines."""
    port = port or free_port()
    command = [*BENTOML, "serve", target, "--host", "127.0.0.1", "--port", str(port)]
    with private_home() as home:
        own = {"FNSERVE_GRPC_PORT": str(free_port()), "FNSERVE_BATCH_DIR": str(Path(home) / "batches")}
        with run_server(command, port, env={**own, **(env or {}), "BENTOML_HOME": home}, cwd=cwd) as url:
            yield url


@contextmanager
def private_home() -> Iterator[str]:
    """A BENTOML_HOME of the server's own that shares the model and Bento stores (see `shared_home`)."""
    with tempfile.TemporaryDirectory(prefix="fnserve-home-") as folder:
        yield str(shared_home(Path(folder)))


@contextmanager
def run_server(
    command: list[str],
    port: int,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    ready_path: str = "/readyz",
) -> Iterator[str]:
    """Run a server process listening on `port` and yield its URL once `ready_path` answers 200;
    always stop it."""
    log = open(log_path(port), "w+b")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited: {log.read().decode(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{url}{ready_path}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready in 180 s")
            time.sleep(0.5)
        yield url
    finally:
        stop_tree(proc)
        log.close()
        Path(log.name).unlink(missing_ok=True)


def log_path(port: int | str) -> Path:
    """Where `run_server` keeps what the server on `port` prints (removed when it stops)."""
    return ROOT / f".pytest-server-{port}.log"


def server_log(url: str) -> Path:
    """What a server started by `run_server` at `url` has printed so far."""
    return log_path(url.rsplit(":", 1)[1])


def server_processes(url: str) -> list[psutil.Process]:
    """The `bentoml serve` started by this test process that listens at `url`, and all its workers."""
    port = url.rsplit(":", 1)[1]
    arbiter = next(
        p for p in psutil.Process().children(recursive=True) if "serve" in p.cmdline() and port in p.cmdline()
    )
    return [arbiter, *arbiter.children(recursive=True)]


def served_dtypes(url: str) -> dict[str, str]:
    """The dtype each model of a running server chose at start-up (its `/models/status`)."""
    status = httpx.get(f"{url}/models/status", timeout=LONG).json()
    return {name: model["choices"]["dtype"]["value"] for name, model in status.items()}


def counter(url: str, name: str, headers: dict[str, str] | None = None, **labels: str) -> float:
    """A Prometheus series of a running server, summed over its workers and over the labels not given;
    `headers` for a server that wants a key."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    lines = httpx.get(f"{url}/metrics", headers=headers, timeout=LONG).text.splitlines()
    return sum(
        float(line.split()[-1])
        for line in lines
        if line.startswith(name) and all(label in line for label in wanted)
    )


def histogram(metrics: str, name: str) -> tuple[float, float]:
    """Observation count and mean of a Prometheus histogram, summed over all its series (workers)."""
    lines = metrics.splitlines()
    total = sum(float(line.split()[-1]) for line in lines if line.startswith(f"{name}_sum"))
    count = sum(float(line.split()[-1]) for line in lines if line.startswith(f"{name}_count"))
    return count, total / count if count else 0.0  # none yet: a labelled metric has no series
