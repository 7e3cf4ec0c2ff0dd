"""The embedding function: all-MiniLM-L6-v2 with mean pooling, batched adaptively."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import bentoml
import numpy as np
from bentoml._internal.marshal.dispatcher import CorkDispatcher
from bentoml.exceptions import ServiceUnavailable
from pydantic import Field

from models.catalog import CATALOG
from services import gateway
from services.config import get_settings

if TYPE_CHECKING:
    import torch

settings = get_settings()
MODEL = CATALOG[settings.embedding_model]

Texts = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=settings.embedding_max_input_chars)]],
    Field(min_length=1, max_length=settings.embedding_max_inputs),
]
Embedded = tuple[np.ndarray, int]
"""One input's unit vector (float32) and the number of tokens the model read for it."""


BATCH_SIZE = bentoml.metrics.Histogram(
    name="fnserve_embedding_batch_size",
    documentation="Texts per forward pass of the embedding model (OpenAI route)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _overloaded() -> Embedded:
    raise ServiceUnavailable("the embedding queue is over its deadline; retry shortly")


@bentoml.service(
    name="embedding",
    resources={"cpu": str(os.cpu_count() or 1)},
    traffic={"timeout": 60},
    logging={"access": {"enabled": False}},
    workers=1,
)
@bentoml.asgi_app(gateway.app, path="/")
class Embedder:
    """Owns the model. The OpenAI routes are mounted here, in the model's process: a gateway hop cost
    more than half the throughput on short inputs (README, benchmarks)."""

    model_ref = bentoml.models.BentoModel(MODEL.tag)

    def __init__(self) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.model_id = MODEL.name
        self.device = pick_device(settings.device)
        self.dtype: torch.dtype = getattr(torch, settings.embedding_dtype)
        path = self.model_ref.path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.dimensions: int = self.model.config.hidden_size
        self.max_tokens = settings.embedding_max_tokens
        # The OpenAI route calls the model in-process, so it cannot reach the HTTP-level batcher that
        # BentoML puts in front of `encode`; it gets its own instance of the same adaptive batcher.
        self._batcher = CorkDispatcher(
            max_latency_in_ms=settings.embedding_max_latency_ms,
            max_batch_size=settings.embedding_max_batch_size,
            fallback=_overloaded,
            get_batch_size=len,
        )(self._embed_jobs)

    def _forward(self, texts: list[str]) -> tuple[np.ndarray, list[int]]:
        import torch

        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            vectors = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return vectors.cpu().numpy(), batch["attention_mask"].sum(dim=1).tolist()

    def _embed_jobs(self, jobs: tuple[list[str], ...]) -> list[list[Embedded]]:
        texts = [text for job in jobs for text in job]
        BATCH_SIZE.observe(len(texts))
        vectors, tokens = self._forward(texts)
        pairs = list(zip(vectors, tokens, strict=True))
        results: list[list[Embedded]] = []
        for job in jobs:
            results.append(pairs[: len(job)])
            pairs = pairs[len(job) :]
        return results

    async def embed(self, texts: list[str]) -> list[Embedded]:
        """Vectors and token counts for one request's texts, batched with other requests' texts."""
        return await self._batcher(texts)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Untruncated token counts, for rejecting inputs over the window."""
        return [len(ids) for ids in self.tokenizer(texts, truncation=False)["input_ids"]]

    @bentoml.api(
        batchable=True,
        max_batch_size=settings.embedding_max_batch_size,
        max_latency_ms=settings.embedding_max_latency_ms,
    )
    def encode(self, texts: Texts) -> np.ndarray:
        """Native BentoML endpoint: unit vectors for a list of texts, truncated to the model window."""
        return self._forward(texts)[0]
