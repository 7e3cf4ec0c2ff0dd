"""All fnserve settings, read once from ``FNSERVE_*`` environment variables."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from collections.abc import Mapping
from functools import cache, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger("bentoml.fnserve.config")
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_HELP = (
    "auto: bf16 on a GPU that has it (else fp16); on CPU the faster of fp32 and bf16, timed on the real "
    "model at start-up where the CPU computes bf16 natively (AVX-512 bf16 or AMX), else fp32"
)
TIMEOUT_GRACE_SECONDS = 10  # BentoML's own timeouts fire this long after fnserve's deadline has answered


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FNSERVE_")

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when present")
    embedding_workers: int = Field(
        0, ge=0, description="worker processes, each with its own model; 0 = one per core on CPU, 1 on GPU"
    )
    torch_threads: int = Field(
        0, ge=0, description="intra-op threads per embedding worker; 0 = cores / workers"
    )
    generation_threads: int = Field(
        0, ge=0, description="intra-op threads of the generation engine; 0 = every core"
    )
    trace_requests: bool = Field(
        False,
        description="an OpenTelemetry span for every HTTP request and response message, as BentoML "
        "records by default even with no exporter; they cost about a fifth of a busy entry worker's "
        "event loop (README, Benchmark). On: configure BentoML's tracing exporter too",
    )
    http_socket_per_worker: bool = Field(
        True,
        description="each entry worker listens on the HTTP port with a socket of its own (SO_REUSEPORT), "
        "so the kernel spreads connections over the workers; off: one shared socket, where a free worker "
        "can take a whole burst (services/listener.py)",
    )
    hold_early_retries: bool = Field(
        True,
        description="a 429 to a connection that asked again before its last 429's Retry-After passed is "
        "answered when that Retry-After has passed (at most 1 s later): a client retrying at once costs "
        "one refusal a second, not a busy event loop (services/protocols/guard.py)",
    )
    gil_switch_microseconds: int = Field(
        0,
        ge=0,
        description="how long a thread may hold Python's GIL while another waits: a worker's event loop "
        "and its model's thread share it; 0 = 500 (Python's own is 5,000)",
    )

    @field_validator("embedding_model", "generation_model", "image_model")
    @classmethod
    def in_catalogue(cls, name: str, info: ValidationInfo) -> str:
        from models.catalog import CATALOG

        task = {"embedding_model": "embedding", "image_model": "image-classification"}.get(
            str(info.field_name), "chat"
        )
        names = sorted(n for n, entry in CATALOG.items() if entry.task == task)
        if name not in names:
            raise ValueError(f"{name!r} is not a {task} model of the catalogue; choose one of {names}")
        return name

    @property
    def keys(self) -> list[str]:
        return split_keys(self.api_keys.get_secret_value() if self.api_keys else "")

    @property
    def workers(self) -> int:
        return self.embedding_workers or (1 if self.cuda_present else usable_cores())

    @property
    def workers_reason(self) -> str:
        if self.cuda_present:
            return "one process owns the GPU"
        # Measured on a 2-core Xeon: 1.4x one worker with all cores on short inputs (README).
        return "one single-threaded worker per core: torch's threads and the event loop do not share a core"

    @property
    def threads_per_worker(self) -> int:
        return self.torch_threads or max(1, usable_cores() // self.workers)

    @property
    def autoscale_target(self) -> int:
        """Requests in flight per replica that a cluster's autoscaler aims for: half the bound."""
        return max(1, self.max_concurrency // 2)

    @property
    def embedding_batch_size(self) -> int:
        """The setting, or a GPU's default; on a CPU, 0 is timed at start-up (services/functions/
        embedding.py), except for BentoML's batchable `/encode`, sized at import: 32 there."""
        return self.embedding_max_batch_size or (128 if self.cuda_present else 32)

    @property
    def image_batch_size(self) -> int:
        """The setting, or a GPU's default; on a CPU, 0 is timed at start-up (services/functions/image.py)."""
        return self.image_max_batch_size or 64

    @property
    def cache_blocks(self) -> int:
        return self.generation_cache_blocks or (512 if self.cuda_present else 64)

    @property
    def tracing(self) -> dict[str, object]:
        """BentoML's tracing section of a service: every URL excluded unless requests are traced."""
        return {} if self.trace_requests else {"excluded_urls": [".*"]}

    @property
    def cuda_present(self) -> bool:
        """Whether the models will run on CUDA, which the per-device sizes follow."""
        return self.device == "cuda" or (self.device == "auto" and cuda_usable())

    embedding_model: str = Field("all-minilm-l6-v2", description="catalogue name of an embedding model")
    embedding_dtype: Dtype = Field("auto", description=DTYPE_HELP)
    embedding_max_batch_size: int = Field(
        0,
        ge=0,
        description="largest batch one forward pass takes; 0 = timed at start-up on CPU (8, 32 or 128: the "
        "smallest within 5% of the fastest per short text), 128 on a GPU",
    )
    embedding_max_batch_tokens: int = Field(
        0,
        ge=0,
        description="most padded tokens one forward pass takes (its texts times the longest, at least one "
        "text); 0 = the batch size in short texts' tokens on CPU, 16,384 on a GPU",
    )
    embedding_max_latency_ms: int = Field(
        10_000, ge=1, description="queue deadline: a request waiting longer is shed with 503"
    )
    embedding_max_queue: int = Field(
        1024,
        ge=1,
        description="texts waiting for the model per worker (about 1 s of work at full batches); "
        "a request that would pass it gets 429",
    )
    embedding_max_wait_seconds: float = Field(
        2.0,
        gt=0,
        description="an embedding request expected to wait longer than this to start (the texts "
        "queued ahead at the recent rate) gets 429 with Retry-After at once",
    )
    encoder_cpu_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="on a CPU, the share of each entry worker's time the embedding and image models "
        "take for forward passes while the chat engine has work; 1 = they never yield",
    )
    embedding_max_inputs: int = Field(512, ge=1, description="inputs per request")
    embedding_max_input_chars: int = Field(8192, ge=1, description="characters per input")
    embedding_max_tokens: int = Field(256, ge=8, le=512, description="the model's window, in tokens")
    embedding_cache_size: int = Field(
        10_000,
        ge=0,
        description="inputs whose vectors each worker keeps for repeats (about 1.5 kB each); 0 = off",
    )
    embedding_overflow: Literal["truncate", "reject"] = Field(
        "truncate", description="inputs over the token window: cut to it, or answer 400"
    )

    image_model: str = Field("efficientnet-lite0", description="catalogue name of an image classifier")
    image_dtype: Dtype = Field("auto", description=DTYPE_HELP)
    image_max_batch_size: int = Field(
        0,
        ge=0,
        description="images per forward pass; 0 = timed at start-up on CPU (1, 4, 8 or 16: the smallest "
        "within 5% of the fastest per image), 64 on a GPU",
    )
    image_max_inputs: int = Field(64, ge=1, description="images per request")
    image_max_wait_seconds: float = Field(
        2.0, gt=0, description="as FNSERVE_EMBEDDING_MAX_WAIT_SECONDS, for images"
    )
    image_max_latency_ms: int = Field(
        10_000, ge=1, description="queue deadline: an image request waiting longer is shed with 503"
    )
    image_max_bytes: int = Field(8 * 2**20, ge=1, description="largest encoded image (400 above)")
    image_max_pixels: int = Field(
        40_000_000,
        ge=1,
        description="largest decoded image, width x height: above it a file is refused as a "
        "decompression bomb",
    )
    image_cache_size: int = Field(2_000, ge=0, description="images whose scores each worker keeps; 0 = off")
    image_top_k: int = Field(5, ge=1, le=1000, description="labels answered per image unless a request asks")

    generation_model: str = "smollm2-135m-instruct"
    generation_dtype: Dtype = Field(
        "auto",
        description=DTYPE_HELP
        + "; fp32 greedy output does not depend on what else is in the batch, bf16's can",
    )
    generation_max_tokens: int = Field(512, ge=1, description="cap on max_tokens per request")
    speculation: Literal["auto", "off"] = Field(
        "auto",
        description="n-gram speculative decoding in the chat engine: auto drafts while steps are small "
        "(CPU engine), off never",
    )
    generation_max_queue: int = Field(
        64, ge=1, description="chat requests admitted but not yet generating; one more gets 429"
    )
    generation_max_wait_seconds: float = Field(
        5.0,
        gt=0,
        description="a chat request expected to wait longer than this for its first token (the "
        "requests waiting ahead at the recent rate) gets 429 with Retry-After at once, unless none waits "
        "ahead of it",
    )
    generation_cache_blocks: int = Field(
        0,
        description="KV-cache blocks of 64 tokens shared by all running requests (at least 4); 0 = 64 on "
        "CPU, 512 on a GPU",
    )

    @field_validator("generation_cache_blocks")
    @classmethod
    def enough_blocks(cls, blocks: int) -> int:
        if blocks and blocks < 4:
            raise ValueError("at least 4 blocks, or 0 for the per-device default")
        return blocks

    api_keys: SecretStr | None = Field(
        None, description="comma-separated keys; when set, every route but the probes needs `Bearer <key>`"
    )

    @field_validator("api_keys")
    @classmethod
    def keys_that_can_match(cls, value: SecretStr | None) -> SecretStr | None:
        """Fails closed: a setting that holds no key (`FNSERVE_API_KEYS="$KEY"` with KEY unset) had left
        every route open, and a key no HTTP header can carry as it is written had refused every call."""
        if value is None:
            return None
        keys = split_keys(value.get_secret_value())
        if not keys:
            raise ValueError("FNSERVE_API_KEYS is set but holds no key; unset it to serve without keys")
        if not all(key.isascii() and key.isprintable() and " " not in key for key in keys):
            raise ValueError("API keys must be printable ASCII without spaces: HTTP headers carry them")
        return value

    max_body_bytes: int = Field(
        16 * 2**20, ge=1, description="largest request body (413 above); uploads excepted"
    )
    max_concurrency: int = Field(
        256, ge=1, description="requests one server takes at once (429 above); also the cluster manifests'"
    )
    request_timeout_seconds: int = Field(
        600,
        ge=1,
        description="a request's deadline, streams included: it is dropped from the queue or cancelled "
        "after it (504, or an error event on a stream). A request may ask for less with the "
        "x-fnserve-timeout header (seconds); also the manifests'",
    )
    grpc_port: int = Field(
        3001,
        ge=0,
        le=65535,
        description="the Open Inference Protocol's gRPC port, served by every entry worker; 0 = off",
    )
    grpc_host: str = Field(
        "127.0.0.1", description="the address the gRPC port binds (0.0.0.0 for every interface)"
    )
    redis_url: str | None = Field(
        None, description="redis://host:port/db: the response cache lives there, shared by every worker"
    )
    generation_cache_size: int = Field(
        1000, ge=0, description="greedy answers each worker keeps (without Redis); 0 = off"
    )
    remeasure: bool = Field(
        False,
        description="measure at start-up again (dtype, batch sizes, step cost) instead of reusing what "
        "this machine measured before for the same model, torch and threads",
    )
    idle_release_seconds: float = Field(
        600, ge=0, description="a model unused this long is released, and loaded again on use; 0 = never"
    )

    @field_validator("idle_release_seconds", mode="before")
    @classmethod
    def never(cls, value: object) -> object:
        return 0 if value == "never" else value

    batch_dir: Path = Field(
        Path(".fnserve"), description="the batch store (SQLite, WAL), when no database URL"
    )
    batch_database_url: str | None = Field(
        None,
        description="postgresql://...: the batch store every replica shares (files included); unset = SQLite",
    )
    batch_max_file_bytes: int = Field(200 * 2**20, ge=1, description="largest uploaded file (413 above)")
    batch_max_lines: int = Field(100_000, ge=1, description="most lines in one batch input file")
    batch_concurrency: int = Field(64, ge=1, description="batch lines in flight per worker process")
    batch_generation_concurrency: int = Field(
        4, ge=1, description="of those, chat and completion lines: online chats share the same engine"
    )
    batch_lease_seconds: float = Field(
        120, gt=0, description="a worker renews its claims; a line whose claim is older is run again"
    )
    batch_retention_seconds: float = Field(
        7 * 24 * 3600, gt=0, description="finished batches and their files are deleted after this long"
    )


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may run on: its CPU affinity (taskset, a cpuset), capped by a cgroup v2 CPU
    quota (a pod's `cpu: 2000m` on a 32-core node is 2). os.cpu_count() counts the host's, which would
    start a worker and a torch thread per host core in a container allowed two."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 CPU controller here: the affinity is the bound
        pass
    return cores


def split_keys(raw: str) -> list[str]:
    """FNSERVE_API_KEYS as its keys: comma-separated, blanks around them and empty ones left out."""
    return [key.strip() for key in raw.split(",") if key.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


# Device files only: /proc/driver/nvidia is the host kernel's, and a container given no GPU on a GPU
# node sees it too, while its torch finds no device.
CUDA_NODES = (Path("/dev/nvidiactl"), Path("/dev/nvidia0"))


def cuda_usable(
    nodes: tuple[Path, ...] = CUDA_NODES,
    environ: Mapping[str, str] = os.environ,
    torch_lib: Path | None = None,
) -> bool:
    """What `torch.cuda.is_available()` will answer in the workers, told without importing torch, so the
    manager process stays small: a driver's device files, GPUs that CUDA_VISIBLE_DEVICES does not hide
    (CUDA stops at its first entry that is not an index or a UUID, so "" and "-1" hide them all), and
    a torch built with CUDA (torch's CPU wheel has no libtorch_cuda in torch/lib)."""
    if not any(node.exists() for node in nodes):
        return False
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        first = visible.split(",")[0].strip()
        if not (first.isdigit() or first.startswith(("GPU-", "MIG-"))):
            return False
    return any((torch_lib or torch_library()).glob("libtorch_cuda*.so"))


def torch_library() -> Path:
    """torch's shared libraries, found without importing torch."""
    spec = importlib.util.find_spec("torch")
    assert spec is not None and spec.origin is not None, "torch is not installed"
    return Path(spec.origin).parent / "lib"


def pick_device(settings: Settings) -> str:
    """The device a worker's model runs on. Its sizes (workers, threads, batch sizes, cache blocks) were
    chosen by `cuda_present`, told without torch; where torch answers otherwise (a GPU that shows no
    NVIDIA device files, as on WSL2 or ROCm; a driver too old for torch's CUDA), the worker says so, as
    those sizes are the other device's."""
    import torch

    if settings.device != "auto":
        return settings.device
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if (device == "cuda") != settings.cuda_present:
        warn_sized_for_other_device(device)
    return device


@cache  # once per worker: each of its functions picks the device
def warn_sized_for_other_device(device: str) -> None:
    sized = "a CPU" if device == "cuda" else "a GPU"
    logger.warning(
        "torch runs this worker on %s, but the server sized its workers, threads and batches for %s: "
        "set FNSERVE_DEVICE=%s so that both agree",
        device, sized, device,
    )  # fmt: skip
