"""The embedding function: all-MiniLM-L6-v2 with mean pooling, batching concurrent requests.

It runs in the entry process (a hop to a process of its own cost more than half the throughput on short
inputs, README), and every protocol calls the same instance: their texts share forward passes and the
response cache."""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import bentoml
import numpy as np

from models.catalog import CATALOG
from services.config import Settings, pick_device
from services.functions.batching import GreedyBatcher, WaitTarget, answered_by, passes
from services.functions.cache import cache_key, response_cache, through_cache
from services.functions.hardware import Choices, model_status, share_the_gil
from services.functions.lifecycle import ModelSlot, Reloadable
from services.functions.pacing import encoder_turns
from services.functions.types import Refused

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("bentoml.fnserve.embedding")  # under "bentoml": the server only logs that tree

BATCH_SIZE = bentoml.metrics.Histogram(
    name="fnserve_embedding_batch_size",
    documentation="Texts per forward pass of the embedding model",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
BATCH_TOKENS = bentoml.metrics.Histogram(
    name="fnserve_embedding_batch_tokens",
    documentation="Padded tokens per forward pass of the embedding model (its texts times the longest)",
    buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768),
)
QUEUE_SECONDS = bentoml.metrics.Histogram(
    name="fnserve_embedding_queue_seconds",
    documentation="Time the oldest request of each batch waited for the model",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
QUEUE_TEXTS = bentoml.metrics.Gauge(
    name="fnserve_embedding_queue_texts",
    documentation="Texts of online requests waiting for the embedding model",
    multiprocess_mode="livesum",
)


# Texts tokenized on the event loop up to this many characters in a request (where that costs the loop
# about what a hop to a thread does), in a thread past it.
INLINE_CHARS = 100
# Padded tokens in a pass on a GPU, text-embeddings-inference's default (--max-batch-tokens).
GPU_BATCH_TOKENS = 16_384

Embedded = tuple[np.ndarray, int]
"""One input's unit vector (float32) and the number of tokens the model read for it."""


@dataclass
class Embeddings:
    vectors: np.ndarray
    """[inputs, dimensions] float32 unit vectors"""
    tokens: list[int]
    """tokens the model read per input"""
    hits: int | None
    """inputs answered from the response cache; None with the cache off"""


def pack(embedded: Embedded) -> bytes:
    vector, tokens = embedded
    return struct.pack("<I", tokens) + vector.astype(np.float32).tobytes()


def unpack(value: bytes) -> Embedded:
    return np.frombuffer(value, dtype=np.float32, offset=4), struct.unpack_from("<I", value)[0]


class TextEncoder:
    """Texts to token ids, cut to `max_tokens` (None: uncut, for counting), and ids to unit vectors
    (mean pooling over real tokens, as sentence-transformers does). One path for the function's passes,
    BentoML's `/encode` and the benchmarks' raw model, so "raw model" there is exactly the work the
    service does."""

    def __init__(self, tokenizer: Any, max_tokens: int | None) -> None:
        """From a transformers fast tokenizer: its tokenizers-library encoder is copied and set once,
        then only read, so threads share it. (Transformers' call rewrites a shared encoder's settings
        whenever a call's differ, which a call in another thread can meet halfway, and costs twice the
        time: 58 against 35 microseconds for one sentence on the Xeon 6/207, paid on the event loop
        here.)"""
        from tokenizers import Tokenizer

        self._encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        self._encoder.no_padding()  # passes are padded together in `embed`
        if max_tokens is None:
            self._encoder.no_truncation()
        else:
            self._encoder.enable_truncation(max_tokens)
        self._pad = tokenizer.pad

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self._encoder.encode_batch(texts)]

    def embed(self, model: Any, ids: list[list[int]], device: str) -> tuple[np.ndarray, list[int]]:
        """Unit vectors and token counts for tokenized texts, in one padded pass."""
        import torch

        batch = self._pad({"input_ids": ids}, return_tensors="pt").to(device)
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return vectors.cpu().numpy(), [len(each) for each in ids]

    def encode(self, model: Any, texts: list[str], device: str = "cpu") -> tuple[np.ndarray, list[int]]:
        return self.embed(model, self.tokenize(texts), device)


class EmbeddingFunction:
    """Owns the model (loaded, released when idle, woken on use), its batcher and its cache."""

    def __init__(self, settings: Settings, model_path: str) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        entry = CATALOG[settings.embedding_model]
        self.settings = settings
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
        share_the_gil(self.choices, settings.gil_switch_microseconds)
        self.model_id = entry.name
        self.device = pick_device(settings)
        self.max_tokens = settings.embedding_max_tokens
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.encoder = TextEncoder(tokenizer, self.max_tokens)
        self._counter = TextEncoder(tokenizer, None)  # the overflow check counts uncut
        self._forward_lock = threading.Lock()
        stored = AutoModel.from_pretrained(model_path).to(self.device).eval()
        probe = [f"a short sentence of about a dozen tokens, number {i}" for i in range(128)]
        self.dtype: torch.dtype = self.choices.dtype(
            settings.embedding_dtype,
            "FNSERVE_EMBEDDING_DTYPE",
            stored,
            lambda model: self.encoder.encode(model, probe[:32], self.device),
            key=str(entry.tag),
        )
        served = stored.to(self.dtype)
        batch_size = self.choices.batch_size(
            settings.embedding_max_batch_size, "FNSERVE_EMBEDDING_MAX_BATCH_SIZE", self.device,
            settings.embedding_batch_size, (8, 32, 128),
            lambda size: self.encoder.encode(served, probe[:size], self.device),
            f"{entry.tag}-{self.dtype}",
        )  # fmt: skip
        # Sized in short texts, a pass of the longest ones took 8 s on one thread of the Xeon 6/207 (128
        # of 256 tokens), and ran slower per text than passes of 8. Its matmuls grow with its padded
        # tokens, so the same pass in tokens bounds every pass, whatever its texts' length.
        if self.device == "cuda":
            auto_tokens, why = GPU_BATCH_TOKENS, "text-embeddings-inference's default for a GPU"
        else:
            short = max(map(len, self.encoder.tokenize(probe[:batch_size])))
            auto_tokens = batch_size * short
            why = f"max_batch_size in tokens: {batch_size} short texts of {short}"
        batch_tokens = self.choices.setting_or(
            "max_batch_tokens", "FNSERVE_EMBEDDING_MAX_BATCH_TOKENS", settings.embedding_max_batch_tokens,
            auto_tokens, why,
        )  # fmt: skip
        weights = Reloadable(lambda: served, model_path, self.dtype, self.device)
        self.slot = ModelSlot(
            entry.name, weights.load, lambda model: self._release(weights), settings.idle_release_seconds
        )
        self.slot.load_now()
        self.dimensions: int = self.slot.model.config.hidden_size
        turns = encoder_turns("embedding", settings.encoder_cpu_share, self.device, self.choices)
        logger.info("embedding model %s on %s", entry.tag, self.device)
        # Every protocol but BentoML's /encode calls the model through this batcher; see
        # services/functions/batching.py for why it is not BentoML's.
        self._batcher = GreedyBatcher(
            self._embed_batch,
            max_batch_size=batch_size,
            max_queue_seconds=settings.embedding_max_latency_ms / 1000,
            max_queue=settings.embedding_max_queue,
            on_batch=lambda size, wait: QUEUE_SECONDS.observe(wait),
            on_queue=QUEUE_TEXTS.set,
            wait_target=WaitTarget(
                "embedding", settings.embedding_max_wait_seconds, "FNSERVE_EMBEDDING_MAX_WAIT_SECONDS"
            ),
            turns=turns,
            max_batch_tokens=batch_tokens,
            tokens=len,
        )
        self._cache = response_cache(settings.redis_url, settings.embedding_cache_size)
        self._cache_scope = (entry.tag, str(self.dtype), self.max_tokens)

    def status(self) -> dict[str, Any]:
        entry = model_status(self.slot.state, self.device, self.choices)
        return {self.model_id: {**entry, "load": self._batcher.load()}}

    async def check(self, texts: list[str], field: str = "input", truncate: bool = False) -> None:
        """Refuses (invalid) what the model cannot take; `field` is the caller's name for the texts.
        `truncate`: the caller asked for inputs over the window to be cut to it."""
        limits = self.settings
        if not texts:
            raise Refused("invalid", f"{field} must not be empty", field)
        if len(texts) > limits.embedding_max_inputs:
            raise Refused("invalid", f"at most {limits.embedding_max_inputs} inputs per request", field)
        for i, text in enumerate(texts):
            if not text:
                raise Refused("invalid", f"{field}[{i}] is an empty string", field)
            if len(text) > limits.embedding_max_input_chars:
                message = f"{field}[{i}] is over {limits.embedding_max_input_chars} characters"
                raise Refused("invalid", message, field)
        if limits.embedding_overflow == "reject" and not truncate:
            for i, count in enumerate(await self.token_counts(texts)):
                if count > self.max_tokens:
                    message = f"{field}[{i}] is {count} tokens, over the model's window of {self.max_tokens}"
                    raise Refused("invalid", message, field)

    async def embed(self, texts: list[str], deadline: float | None = None) -> Embeddings:
        """Unit vectors for checked texts. Those not in the cache are batched with other requests'
        texts; texts still queued when the deadline (time.monotonic()) passes are dropped."""
        async with answered_by(deadline):
            results, hits = await self._embed(texts, deadline)
        vectors = np.stack([vector for vector, _ in results]) if results else np.zeros((0, self.dimensions))
        return Embeddings(vectors.astype(np.float32, copy=False), [n for _, n in results], hits)

    async def _embed(self, texts: list[str], deadline: float | None) -> tuple[list[Embedded], int | None]:
        async def compute(missing: list[int]) -> list[Embedded]:
            self._batcher.check(len(missing), deadline)  # a refusal costs no tokenizing
            ids = await self._tokenize([texts[i] for i in missing])
            async with self.slot.use():
                return await self._batcher.submit(ids, deadline)

        def keys() -> list[str]:
            return [cache_key("embedding", *self._cache_scope, text) for text in texts]

        return await through_cache(self._cache, "embedding", keys, compute, pack, unpack, len(texts))

    async def encode_unbatched(self, texts: list[str]) -> np.ndarray:
        """These texts outside the batcher and the cache, for a caller that batches on its own (BentoML's
        batchable endpoint, sized in texts): in passes under the batcher's bounds, so that long texts
        are not one pass of its whole batch size."""
        ids = await self._tokenize(texts)
        vectors = np.zeros((len(ids), self.dimensions), np.float32)
        async with self.slot.use():
            for group in passes([len(each) for each in ids], *self._batcher.bounds):
                embedded = await self._batcher.forward([ids[i] for i in group])
                vectors[group] = [vector for vector, _ in embedded]
        return vectors

    async def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids, which the batcher sizes passes by: on the event loop up to INLINE_CHARS, in a thread
        past it. Measured on the Xeon 6/207, a hop to a thread cost the loop 49 microseconds, and
        tokenizing about half a microsecond a character (35 for 52 characters, 265 for 500, 1,077 for
        2,000)."""
        if sum(map(len, texts)) <= INLINE_CHARS:
            return self.encoder.tokenize(texts)
        return await asyncio.to_thread(self.encoder.tokenize, texts)

    async def token_counts(self, texts: list[str]) -> list[int]:
        """Untruncated token counts, for rejecting inputs over the window (off the event loop)."""
        return [len(ids) for ids in await asyncio.to_thread(self._counter.tokenize, texts)]

    def _release(self, weights: Reloadable) -> None:
        """After any forward still running: a cancelled request's thread runs on after it gave up."""
        with self._forward_lock:
            weights.release()

    def _embed_batch(self, ids: list[list[int]]) -> list[Embedded]:
        BATCH_SIZE.observe(len(ids))
        BATCH_TOKENS.observe(len(ids) * max(map(len, ids)))
        with self._forward_lock:
            vectors, tokens = self.encoder.embed(self.slot.model, ids, self.device)
        return list(zip(vectors, tokens, strict=True))
