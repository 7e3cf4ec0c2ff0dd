"""The embedding function: all-MiniLM-L6-v2 with mean pooling, batching concurrent requests."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import struct
import threading
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Annotated, Any

import bentoml
import numpy as np
from bentoml.validators import Shape
from pydantic import Field

from models.catalog import CATALOG
from services import gateway
from services.admission import Guard
from services.batch import BatchRunner
from services.batch_store import BatchStore
from services.batching import GreedyBatcher
from services.cache import cache_key, count_lookups, response_cache
from services.config import TIMEOUT_GRACE_SECONDS, get_settings, pick_device
from services.generation import CHAT_DEFAULT_TOKENS, ChatMaxTokens, ChatMessages, Generator
from services.hardware import Choices, model_status, server_instance
from services.lifecycle import ModelSlot, Reloadable
from services.protocol import Text

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("bentoml.fnserve.embedding")  # under "bentoml": the server only logs that tree
settings = get_settings()
MODEL = CATALOG[settings.embedding_model]

Texts = Annotated[
    list[Annotated[Text, Field(min_length=1, max_length=settings.embedding_max_input_chars)]],
    Field(min_length=1, max_length=settings.embedding_max_inputs),
]
Vectors = Annotated[np.ndarray, Shape((-1, -1))]  # the shape makes the OpenAPI response a 2-D array
Embedded = tuple[np.ndarray, int]
"""One input's unit vector (float32) and the number of tokens the model read for it."""


BATCH_SIZE = bentoml.metrics.Histogram(
    name="fnserve_embedding_batch_size",
    documentation="Texts per forward pass of the embedding model (OpenAI route)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
QUEUE_SECONDS = bentoml.metrics.Histogram(
    name="fnserve_embedding_queue_seconds",
    documentation="Time the oldest request of each batch waited for the model (OpenAI route)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


QUEUE_TEXTS = bentoml.metrics.Gauge(
    name="fnserve_embedding_queue_texts",
    documentation="Texts of online requests waiting for the embedding model",
    multiprocess_mode="livesum",
)


def observe_batch(size: int, wait: float) -> None:
    BATCH_SIZE.observe(size)
    QUEUE_SECONDS.observe(wait)


def pack(embedded: Embedded) -> bytes:
    vector, tokens = embedded
    return struct.pack("<I", tokens) + vector.astype(np.float32).tobytes()


def unpack(value: bytes) -> Embedded:
    return np.frombuffer(value, dtype=np.float32, offset=4), struct.unpack_from("<I", value)[0]


def encode(
    tokenizer: Any, model: Any, texts: list[str], max_tokens: int, device: str = "cpu"
) -> tuple[np.ndarray, list[int]]:
    """Unit vectors (mean pooling over real tokens, as sentence-transformers does) and token counts.
    Shared with the benchmarks, so "raw model" there is exactly the work the service does."""
    import torch

    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt").to(
        device
    )
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        vectors = torch.nn.functional.normalize(pooled.float(), dim=-1)
    return vectors.cpu().numpy(), batch["attention_mask"].sum(dim=1).tolist()


@bentoml.service(
    name="embedding",
    resources={"cpu": str(os.cpu_count() or 1)},
    # Guard (services/admission.py) enforces max_concurrency and the request deadline in the OpenAI error
    # shape; BentoML's own bounds sit above them as a backstop (its 429 and 504 are plain). `concurrency`
    # is the autoscaling target on a cluster (as in deploy/), stated because a task endpoint would
    # otherwise set it to 1 (BentoML does that for services with tasks).
    traffic={
        "timeout": settings.request_timeout_seconds + TIMEOUT_GRACE_SECONDS,
        "max_concurrency": settings.max_concurrency * 2,
        "concurrency": settings.max_concurrency // 2,
    },
    logging={"access": {"enabled": False}},
    workers=settings.workers,
)
@bentoml.asgi_app(gateway.app, path="/")
class Embedder:
    """Owns the model. The OpenAI routes are mounted here, in the model's process: a gateway hop cost
    more than half the throughput on short inputs (README, benchmarks)."""

    model_ref = bentoml.models.BentoModel(MODEL.tag)
    generator = bentoml.depends(Generator)

    def __init__(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.choices = Choices("embedding")
        self.choices.setting_or(
            "workers", "FNSERVE_EMBEDDING_WORKERS", settings.embedding_workers, settings.workers,
            settings.workers_reason,
        )  # fmt: skip
        threads = self.choices.setting_or(
            "threads", "FNSERVE_TORCH_THREADS", settings.torch_threads, settings.threads_per_worker,
            "the worker's share of the cores",
        )  # fmt: skip
        torch.set_num_threads(threads)
        self.choices.setting_or(
            "max_batch_size", "FNSERVE_EMBEDDING_MAX_BATCH_SIZE", settings.embedding_max_batch_size,
            settings.embedding_batch_size, "texts per forward pass: a GPU keeps gaining past 32, a CPU not",
        )  # fmt: skip
        self.model_id = MODEL.name
        self.device = pick_device(settings.device)
        path = self.model_ref.path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        # A fast tokenizer is not safe to share between threads that set truncation differently: the
        # overflow check gets its own instance, and forward passes (greedy batcher and BentoML's batcher
        # for /encode run in different threads) take turns.
        self._counting_tokenizer = AutoTokenizer.from_pretrained(path)
        self._forward_lock = threading.Lock()
        self.max_tokens = settings.embedding_max_tokens
        stored = AutoModel.from_pretrained(path).to(self.device).eval()
        probe = [f"a short sentence of about a dozen tokens, number {i}" for i in range(32)]
        self.dtype: torch.dtype = self.choices.dtype(
            settings.embedding_dtype,
            "FNSERVE_EMBEDDING_DTYPE",
            stored,
            lambda model: encode(self.tokenizer, model, probe, self.max_tokens, self.device),
            key=MODEL.name,
        )
        served = stored.to(self.dtype)
        weights = Reloadable(lambda: served, path, self.dtype, self.device)
        self.slot = ModelSlot(
            MODEL.name, weights.load, lambda model: self._release(weights), settings.idle_release_seconds
        )
        self.slot.load_now()
        self.dimensions: int = self.slot.model.config.hidden_size
        logger.info("embedding model %s on %s", MODEL.tag, self.device)
        if not settings.keys:
            logger.warning(
                "no API keys configured (FNSERVE_API_KEYS): every route is open to whoever reaches this "
                "port; keep it on loopback (`make serve` binds 127.0.0.1 unless HOST is set)"
            )
        # The OpenAI route calls the model in-process; see services/batching.py for why it does not
        # use the batcher BentoML puts in front of `encode`.
        self._batcher = GreedyBatcher(
            self._embed_batch,
            max_batch_size=settings.embedding_batch_size,
            max_queue_seconds=settings.embedding_max_latency_ms / 1000,
            max_queue=settings.embedding_max_queue,
            on_batch=observe_batch,
            on_queue=QUEUE_TEXTS.set,
        )
        self._cache = response_cache(settings.redis_url, settings.embedding_cache_size)
        self._cache_scope = (MODEL.tag, str(self.dtype), self.max_tokens)
        self.chat_cache = response_cache(settings.redis_url, settings.generation_cache_size)  # the gateway's
        self.batch_runner = BatchRunner(
            BatchStore(settings.batch_dir, server_instance()), gateway.run_line, settings
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._generation_scope: tuple[str, ...] | None = None

    def status(self) -> dict[str, Any]:
        return {self.model_id: model_status(self.slot.state, self.device, self.choices)}

    async def __is_ready__(self) -> bool:
        """`/readyz`: ready once the generation service answers too. It starts on its own (timing its
        model takes seconds on a busy CPU), and a chat sent before would wait on a socket that nobody
        serves yet, or that a shutdown then leaves unserved."""
        try:
            async with asyncio.timeout(2):
                await self.generation_scope()  # asked once: later probes return at once
        except Exception:  # whatever the failure, the answer is "not yet"
            return False
        return True

    async def generation_scope(self) -> tuple[str, ...]:
        """What the generation service chose at start-up that changes its answers (dtype, KV-cache size),
        for the chat cache's keys; asked once."""
        if self._generation_scope is None:
            (status,) = (await self.generator.status()).values()
            choices = status["choices"]
            self._generation_scope = (choices["dtype"]["value"], choices["cache_blocks"]["value"])
        return self._generation_scope

    @bentoml.on_startup
    async def start_background_tasks(self) -> None:
        self._tasks = [
            asyncio.create_task(self.batch_runner.run()),
            asyncio.create_task(self.slot.release_when_idle()),
        ]

    @bentoml.on_shutdown
    async def stop_background_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.batch_runner.settle()  # lines still running are claimed again by the next server

    def _release(self, weights: Reloadable) -> None:
        """After any forward still running: a cancelled request's thread runs on after it gave up."""
        with self._forward_lock:
            weights.release()

    def _forward(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        with self._forward_lock:
            return encode(self.tokenizer, self.slot.model, texts, self.max_tokens, self.device)

    def _embed_batch(self, texts: list[str]) -> list[Embedded]:
        vectors, tokens = self._forward(texts)
        return list(zip(vectors, tokens, strict=True))

    async def embed(self, texts: list[str]) -> tuple[list[Embedded], int]:
        """Vectors and token counts for one request's texts, and how many came from the cache. The rest
        are batched with other requests' texts."""
        cached: dict[int, Embedded] = {}
        if self._cache:  # keys are hashed only when there is a cache to look in
            keys = [cache_key("embedding", *self._cache_scope, text) for text in texts]
            stored = await self._cache.get_many(keys)
            cached = {i: unpack(value) for i, value in enumerate(stored) if value is not None}
        count_lookups("embedding", len(cached), len(texts))
        missing = [i for i in range(len(texts)) if i not in cached]
        computed: list[Embedded] = []
        if missing:
            async with self.slot.use():
                computed = await self._batcher.submit([texts[i] for i in missing])
            if self._cache:
                await self._cache.set_many({keys[i]: pack(e) for i, e in zip(missing, computed, strict=True)})
        fresh = iter(computed)
        return [cached[i] if i in cached else next(fresh) for i in range(len(texts))], len(cached)

    async def token_counts(self, texts: list[str]) -> list[int]:
        """Untruncated token counts, for rejecting inputs over the window (off the event loop)."""
        encoded = await asyncio.to_thread(self._counting_tokenizer, texts, truncation=False)
        return [len(ids) for ids in encoded["input_ids"]]

    @bentoml.api
    async def chat(
        self,
        messages: ChatMessages,
        max_tokens: ChatMaxTokens = CHAT_DEFAULT_TOKENS,
    ) -> AsyncGenerator[str, None]:
        """Native BentoML streaming chat (greedy text deltas), relayed from the generation service, whose
        own port is private to `bentoml serve`."""
        async for delta in self.generator.chat(messages=messages, max_tokens=max_tokens):
            yield delta

    @bentoml.task
    async def write(self, messages: ChatMessages, max_tokens: ChatMaxTokens = CHAT_DEFAULT_TOKENS) -> str:
        """BentoML task: one long greedy answer, submitted and collected later by BentoML's clients.
        BentoML keeps task state in a file that `bentoml serve` deletes at start, and cannot cancel
        locally: durable, resumable or bulk work belongs in /v1/batches."""
        return "".join(
            [delta async for delta in self.generator.chat(messages=messages, max_tokens=max_tokens)]
        )

    @bentoml.api(
        batchable=True,
        max_batch_size=settings.embedding_batch_size,
        max_latency_ms=settings.embedding_max_latency_ms,
    )
    async def encode(self, texts: Texts) -> Vectors:
        """Native BentoML endpoint: unit vectors for a list of texts, truncated to the model window."""
        async with self.slot.use():
            vectors, _ = await asyncio.to_thread(self._forward, texts)
        return vectors


Embedder.add_asgi_middleware(
    Guard,
    keys=settings.keys,
    max_body_bytes=settings.max_body_bytes,
    upload_bytes=settings.batch_max_file_bytes + 2**20,  # room for multipart framing: the route checks it
    max_concurrency=math.ceil(settings.max_concurrency / settings.workers),  # BentoML's split, too
    timeout_seconds=settings.request_timeout_seconds,
)
