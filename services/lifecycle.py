"""Scale to zero inside the process: a model is released after an idle time and loaded again on use.

A request that finds its model asleep waits while it loads (within the request's own timeout), so no
request fails because the model was asleep. `/readyz` stays ready while a model sleeps, since the next
request wakes it.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from typing import Generic, Literal, TypeVar

import bentoml

logger = logging.getLogger("bentoml.fnserve.lifecycle")
M = TypeVar("M")
State = Literal["loaded", "sleeping", "loading"]

LOADS = bentoml.metrics.Counter(
    name="fnserve_model_loads", documentation="Model loads, the first included", labelnames=["model"]
)
UNLOADS = bentoml.metrics.Counter(
    name="fnserve_model_unloads", documentation="Models released after their idle time", labelnames=["model"]
)
COLD_START = bentoml.metrics.Histogram(
    name="fnserve_model_cold_start_seconds",
    documentation="Time to load a sleeping model for the request that woke it",
    labelnames=["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)


def release_memory() -> None:
    """Collect, then hand freed memory back: glibc keeps freed heap blocks otherwise (RSS would not show
    the release), and torch keeps freed CUDA blocks cached for reuse."""
    gc.collect()
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelSlot(Generic[M]):
    def __init__(
        self, name: str, load: Callable[[], M], unload: Callable[[M], None], idle_seconds: float
    ) -> None:
        """`load` and `unload` run in a worker thread; `idle_seconds` 0 keeps the model resident."""
        self.name = name
        self._load, self._unload = load, unload
        self.idle_seconds = idle_seconds
        self._model: M | None = None
        self._lock = asyncio.Lock()
        self._in_use = 0
        self._last_used = time.monotonic()
        self._releasing = False
        self._pending: asyncio.Future[None] | None = None

    @property
    def state(self) -> State:
        """`sleeping` only once its memory is released; `loaded` while it is being released."""
        if self._pending is not None:
            return "loading"
        return "sleeping" if self._model is None and not self._releasing else "loaded"

    @property
    def model(self) -> M:
        """The model, for code that runs inside `use()` (a batcher thread, for example)."""
        if self._model is None:
            raise RuntimeError(f"{self.name} is not loaded; call it inside `use()`")
        return self._model

    @property
    def current(self) -> M | None:
        """The model if it is in memory now, for looks that must not wake it (stats, shutdown)."""
        return self._model

    def load_now(self) -> None:
        """Loads at start-up, so the first request is warm."""
        self._model = self._load()
        LOADS.labels(model=self.name).inc()

    @asynccontextmanager
    async def use(self) -> AsyncIterator[M]:
        async with self._lock:
            if self._model is None:
                self._pending = self._pending or asyncio.ensure_future(self._wake())
                # Shielded: a caller that gives up (timeout, disconnect) does not abandon the load
                # halfway, which would leave a started engine that nothing stops; the next caller
                # waits for the same load.
                await asyncio.shield(self._pending)
            self._in_use += 1
        try:
            yield self.model
        finally:
            self._in_use -= 1
            self._last_used = time.monotonic()

    async def _wake(self) -> None:
        start = time.perf_counter()
        try:
            self._model = await asyncio.to_thread(self._load)
        finally:
            self._pending = None
        seconds = time.perf_counter() - start
        LOADS.labels(model=self.name).inc()
        COLD_START.labels(model=self.name).observe(seconds)
        logger.info("%s loaded again in %.2f s", self.name, seconds)

    async def release_when_idle(self) -> None:
        """Runs for the life of the worker."""
        if not self.idle_seconds:
            return
        while True:
            await asyncio.sleep(min(self.idle_seconds / 4, 5))
            idle = time.monotonic() - self._last_used
            if self._model is None or self._in_use or idle < self.idle_seconds:
                continue
            async with self._lock:  # requests that come meanwhile wait, then load it again
                if self._in_use or self._model is None:
                    continue
                self._releasing = True
                try:
                    await asyncio.to_thread(self._unload, self._model)
                    self._model = None  # the last reference: its memory is freed here
                    await asyncio.to_thread(release_memory)
                finally:
                    self._releasing = False
            UNLOADS.labels(model=self.name).inc()
            logger.info("%s released after %.0f s idle", self.name, idle)
