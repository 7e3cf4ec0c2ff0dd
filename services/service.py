"""The entry service: the one BentoML service callers reach. It holds this worker's functions (the
embedding model in-process, the chat relay, the batch runner) and mounts every protocol on them: OpenAI
REST, the Open Inference Protocol over REST and gRPC, BentoML's native endpoints, and batch lines."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator
from contextlib import suppress
from pathlib import Path
from typing import Annotated

import bentoml
from bentoml.exceptions import BentoMLException
from pydantic import BaseModel, Field

from models.catalog import CATALOG
from services.admission import DEADLINE, Admission
from services.config import TIMEOUT_GRACE_SECONDS, get_settings, usable_cores
from services.functions.api import Functions
from services.functions.cache import response_cache
from services.functions.chat import ChatFunction, Delta, GenerationRequest
from services.functions.embedding import EmbeddingFunction
from services.functions.generation import CHAT_DEFAULT_TOKENS, ChatMaxTokens, ChatMessages, Generator
from services.functions.hardware import server_instance
from services.functions.image import ImageFunction
from services.functions.types import Refused, Text
from services.jobs.db import StoreUnavailable
from services.jobs.runner import BatchRunner
from services.jobs.store import BatchStore
from services.listener import spread_connections
from services.protocols import openapi
from services.protocols.guard import EarlyRetries, Guard
from services.protocols.oip import grpc as oip_grpc
from services.protocols.oip import rest as oip_rest
from services.protocols.oip.models import repository_of
from services.protocols.openai import serving as openai
from services.protocols.status import HTTP_STATUS
from services.stopping import on_stop_signal

logger = logging.getLogger("bentoml.fnserve.service")  # under "bentoml": the server only logs that tree
settings = get_settings()
openapi.install()  # /docs.json as valid OpenAPI 3.1 (services/protocols/openapi.py)

Texts = Annotated[
    list[Annotated[Text, Field(min_length=1, max_length=settings.embedding_max_input_chars)]],
    Field(min_length=1, max_length=settings.embedding_max_inputs),
]
# A 2-D array in the OpenAPI document. Not `np.ndarray` with `Shape((-1, -1))`: BentoML 1.4.40's own
# client reshapes the answer to that shape and fails on two unknown dimensions.
Vectors = list[list[float]]


class Label(BaseModel):
    class_id: int
    label: str
    score: float


# One per worker process, shared by the HTTP middleware and the gRPC server: one bound covers both.
ADMISSION = Admission(
    settings.keys,
    max_concurrency=math.ceil(settings.max_concurrency / settings.workers),  # BentoML's split, too
    timeout_seconds=settings.request_timeout_seconds,
)


@bentoml.service(
    name="fnserve",
    resources={"cpu": str(usable_cores())},
    # Admission (services/admission.py) enforces max_concurrency and the request deadline in each
    # protocol's error shape; BentoML's own bounds sit above them as a backstop (its 429 and 504 are
    # plain). `concurrency` is the autoscaling target on a cluster (as in deploy/), stated because a
    # task endpoint would otherwise set it to 1 (BentoML does that for services with tasks).
    traffic={
        "timeout": settings.request_timeout_seconds + TIMEOUT_GRACE_SECONDS,
        "max_concurrency": settings.max_concurrency * 2,
        "concurrency": settings.autoscale_target,
    },
    logging={"access": {"enabled": False}},
    tracing=settings.tracing,
    workers=settings.workers,
)
@bentoml.asgi_app(openai.app, path="/")
@bentoml.asgi_app(oip_rest.app, path="/")
class Frontend:
    """The embedding model runs here, in the entry process, not behind a hop: a hop to its own process
    cost more than half the throughput on short inputs (README, benchmarks)."""

    embedding_model = bentoml.models.BentoModel(CATALOG[settings.embedding_model].tag)
    image_model = bentoml.models.BentoModel(CATALOG[settings.image_model].tag)
    generator = bentoml.depends(Generator)

    def __init__(self) -> None:
        embedding = EmbeddingFunction(settings, self.embedding_model.path)
        image = ImageFunction(settings, self.image_model.path)
        chat = ChatFunction(
            self.generator, settings, response_cache(settings.redis_url, settings.generation_cache_size)
        )
        store = BatchStore(settings.batch_dir, server_instance(), settings.batch_database_url)
        jobs = BatchRunner(store, openai.run_line, settings)
        self.functions = Functions(embedding, image, chat, jobs)
        if ADMISSION.open:
            logger.warning(
                "no API keys configured (FNSERVE_API_KEYS): every route and the gRPC port are open to "
                "whoever reaches them; keep them on loopback (`make serve` binds 127.0.0.1 unless HOST "
                "is set)"
            )
        self._tasks: list[asyncio.Task[None]] = []
        self._grpc: oip_grpc.Running | None = None
        self._grpc_stopped: asyncio.Task[None] | None = None
        spread_connections(settings.workers, settings.http_socket_per_worker)  # last: now it can serve

    async def __is_ready__(self) -> bool:
        """`/readyz`: ready once the generation service answers too."""
        return await self.functions.ready()

    @bentoml.on_startup
    async def start_background_tasks(self) -> None:
        """The batch runner, the idle release, and the gRPC server, on this worker's event loop."""
        fns = self.functions
        self._tasks = [
            asyncio.create_task(fns.jobs.run()),
            asyncio.create_task(fns.embedding.slot.release_when_idle()),
            asyncio.create_task(fns.image.slot.release_when_idle()),
        ]
        if settings.grpc_port:
            address = f"{settings.grpc_host}:{settings.grpc_port}"
            self._grpc = await oip_grpc.start(repository_of(fns), ADMISSION, address, settings.max_body_bytes)
        on_stop_signal(self._begin_stopping)

    def _begin_stopping(self) -> None:
        """At the stop signal, while HTTP drains (services/stopping.py): gRPC refuses new calls and the
        batch runner claims no more lines. gRPC calls in flight get as long to finish as HTTP ones (each
        has its deadline): a fixed few seconds would cut a long stream mid-answer."""
        self.functions.jobs.stop_claiming()
        if self._grpc is not None and self._grpc_stopped is None:
            grace = settings.request_timeout_seconds + TIMEOUT_GRACE_SECONDS
            self._grpc_stopped = asyncio.create_task(self._grpc.stop(grace))

    @bentoml.on_shutdown
    async def stop_background_tasks(self) -> None:
        """After the HTTP drain: what the signal began (or begins now, if it came another way) ends, the
        batch lines that finished are recorded, and the others are handed back."""
        self._begin_stopping()
        if self._grpc_stopped is not None:
            await self._grpc_stopped
        try:
            with suppress(StoreUnavailable):  # what is not recorded runs again once its lease runs out
                await self.functions.jobs.stop()  # before its loop's task is cancelled below: it ends it
        finally:
            for task in self._tasks:
                task.cancel()

    @bentoml.api
    async def chat(
        self,
        messages: ChatMessages,
        max_tokens: ChatMaxTokens = CHAT_DEFAULT_TOKENS,
    ) -> AsyncGenerator[str, None]:
        """Native BentoML streaming chat: greedy text deltas."""
        async for text in self._greedy(messages, max_tokens, DEADLINE.get()):
            yield text

    @bentoml.task
    async def write(self, messages: ChatMessages, max_tokens: ChatMaxTokens = CHAT_DEFAULT_TOKENS) -> str:
        """BentoML task: one long greedy answer, submitted and collected later by BentoML's clients.
        BentoML keeps task state in a file that `bentoml serve` deletes at start, and cannot cancel
        locally: durable, resumable or bulk work belongs in /v1/batches. No deadline: nobody waits on
        the call that submitted it."""
        return "".join([text async for text in self._greedy(messages, max_tokens, None)])

    async def _greedy(
        self, messages: ChatMessages, max_tokens: int, deadline: float | None
    ) -> AsyncGenerator[str, None]:
        """A greedy answer's text through the chat function, as every protocol's: a caller that goes
        away cancels it in the engine, and one past its `deadline` (time.monotonic()) ends. (The
        generator's own proxy method did neither: BentoML 1.4.40's stream wrapper leaves the call open
        when closed early, and the engine generated on.)"""
        request = GenerationRequest(
            messages=[m.model_dump() for m in messages], max_tokens=max_tokens, temperature=0
        )
        try:
            generation = await self.functions.chat.start(request, deadline)
        except Refused as exc:
            raise native_error(exc) from exc
        async with generation:
            async for item in generation:
                if isinstance(item, Delta) and item.text:
                    yield item.text

    @bentoml.api(
        batchable=True,
        max_batch_size=settings.embedding_batch_size,
        max_latency_ms=settings.embedding_max_latency_ms,
    )
    async def encode(self, texts: Texts) -> Vectors:
        """Native BentoML endpoint: unit vectors for a list of texts, truncated to the model window."""
        return (await self.functions.embedding.encode_unbatched(texts)).tolist()

    @bentoml.api
    async def classify(
        self, image: Path, top_k: Annotated[int, Field(ge=1, le=1000)] = settings.image_top_k
    ) -> list[Label]:
        """Native BentoML endpoint: the top-k ImageNet labels of one uploaded image, best first. The
        upload is taken as a file, not as BentoML's `PIL.Image`: BentoML decodes that itself, answers a
        file that is not an image with a 500, and decodes a decompression bomb in full."""
        fn = self.functions.image
        try:
            data = await asyncio.to_thread(image.read_bytes)
            deadline = DEADLINE.get()
            scores = (await fn.classify(await fn.preprocess([data], deadline=deadline), deadline)).scores
        except Refused as exc:
            raise native_error(exc) from exc
        return [Label(class_id=i, label=name, score=p) for i, name, p in fn.top(scores, top_k)[0]]


def native_error(exc: Refused) -> BentoMLException:
    """A function's refusal as BentoML's native endpoints answer errors: its status, and its message."""
    return BentoMLException(exc.message, error_code=HTTP_STATUS[exc.kind])


Frontend.add_asgi_middleware(
    Guard,
    admission=ADMISSION,
    max_body_bytes=settings.max_body_bytes,
    upload_bytes=settings.batch_max_file_bytes + 2**20,  # room for multipart framing: the route checks it
    early_retries=EarlyRetries(max_held=ADMISSION.max_concurrency) if settings.hold_early_retries else None,
)
