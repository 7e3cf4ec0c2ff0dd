"""The text-generation function: SmolLM2-135M-Instruct with continuous batching and token streaming."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Annotated, Any, Literal

import bentoml
from pydantic import BaseModel, Field

from models.catalog import CATALOG
from services.config import get_settings
from services.embedding import pick_device
from services.engine import Engine, TransformersEngine
from services.protocol import Text

logger = logging.getLogger("bentoml.fnserve.generation")  # under "bentoml": the server only logs that tree
settings = get_settings()
MODEL = CATALOG[settings.generation_model]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class IncrementalDecoder:
    """Text deltas from a growing token list. Decoding the whole list each step keeps merges across token
    boundaries right; a trailing U+FFFD means a multi-byte character is still incomplete, so it waits."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self.text = ""

    def push(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta


@bentoml.service(
    name="generation", workers=1, traffic={"timeout": 600}, logging={"access": {"enabled": False}}
)
class Generator:
    """Owns the chat model and its engine loop (one per process)."""

    model_ref = bentoml.models.BentoModel(MODEL.tag)

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = MODEL.name
        device = pick_device(settings.device)
        path = self.model_ref.path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, settings.generation_dtype))
        model = model.to(device).eval()
        self.context_window: int = model.config.max_position_embeddings
        self.engine: Engine = TransformersEngine(
            model,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            cache_blocks=settings.generation_cache_blocks,
        )
        logger.info("generation model %s on %s, %s", MODEL.tag, device, settings.generation_dtype)

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                [m.model_dump() for m in messages], add_generation_prompt=True, return_dict=False
            )
        )

    @bentoml.api
    async def chat(
        self,
        messages: Annotated[list[ChatMessage], Field(min_length=1)],
        max_tokens: Annotated[int, Field(ge=1, le=settings.generation_max_tokens)] = 128,
    ) -> AsyncGenerator[str, None]:
        """Native streaming endpoint: greedy text deltas as the model produces them."""
        decoder = IncrementalDecoder(self.tokenizer)
        async for step in self.engine.stream(self.chat_prompt(messages), max_tokens):
            if delta := decoder.push(step.token_ids):
                yield delta

    @bentoml.api
    def stats(self) -> dict[str, float]:
        """Engine occupancy: running and waiting requests, free share of the KV cache."""
        stats = self.engine.stats()
        return {"running": stats.running, "waiting": stats.waiting, "free_cache": stats.free_cache}

    @bentoml.on_shutdown
    def stop_engine(self) -> None:
        self.engine.shutdown()
