"""The function layer as the protocols see it: one object per entry worker, holding each function."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import bentoml

from services.functions.chat import ChatFunction
from services.functions.embedding import EmbeddingFunction
from services.functions.image import ImageFunction
from services.jobs.runner import BatchRunner


@dataclass(eq=False)  # hashed by identity: protocols keep per-worker views of it
class Functions:
    embedding: EmbeddingFunction
    image: ImageFunction
    chat: ChatFunction
    jobs: BatchRunner

    async def status(self) -> dict[str, object]:
        """Each model's state, device and start-up choices. The embedding model's is this worker's: every
        worker process holds its own copy."""
        return {**self.embedding.status(), **self.image.status(), **await self.chat.status()}

    async def ready(self) -> bool:
        """Ready once the generation service answers too. It starts on its own (timing its model takes
        seconds on a busy CPU), and a chat sent before would wait on a socket that nobody serves yet,
        or that a shutdown then leaves unserved."""
        try:
            async with asyncio.timeout(2):
                await self.chat.scope()  # asked once: later calls return at once
        except Exception:  # whatever the failure, the answer is "not yet"
            return False
        return True

    @property
    def model_ids(self) -> list[str]:
        return [self.embedding.model_id, self.image.model_id, self.chat.model_id]


def current() -> Functions:
    """This worker's functions (the entry service holds them)."""
    return bentoml.get_current_service().functions
