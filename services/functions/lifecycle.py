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
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Generic, Literal, TypeVar

import bentoml

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("bentoml.fnserve.lifecycle")
M = TypeVar("M")
State = Literal["loaded", "sleeping", "loading"]
SAFETENSORS_DTYPES = {  # the floating-point ones
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
}

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


class Reloadable:
    """A model whose weights are released and read back into the same module tree.

    A wake skips `from_pretrained`'s model build: the tree without its weights is a few MB, so it stays,
    and only the weights are read into it (vLLM's sleep mode also keeps the model and drops only its
    weights). Where the served dtype differs from the stored one (bf16 served from fp32 weights), the
    first release writes the weights as served to a temporary safetensors file, and wakes read that
    instead: casting the chat model's fp32 weights took about 100 ms of every wake on this CPU. By hand
    because transformers has no public call that loads a checkpoint into a model already built.
    """

    def __init__(
        self, build: Callable[[], torch.nn.Module], folder: str, dtype: torch.dtype, device: str
    ) -> None:
        """`build` makes the model the first time (`from_pretrained`, moved to its device)."""
        from safetensors import safe_open

        self._build, self._dtype, self._device = build, dtype, device
        self._store = self._source = Path(folder)
        self._stored: dict[str, str] = {}  # tensor name: safetensors dtype
        for file in self._store.glob("*.safetensors"):
            with safe_open(file, framework="pt") as weights:
                keys = weights.keys()  # a safe_open handle is not iterable
                self._stored |= {key: weights.get_slice(key).get_dtype() for key in keys}
        served = str(dtype).removeprefix("torch.")
        floats = [SAFETENSORS_DTYPES[d] for d in self._stored.values() if d in SAFETENSORS_DTYPES]
        self._casts = any(stored != served for stored in floats)
        self._spill: tempfile.TemporaryDirectory[str] | None = None  # removed when the process exits
        self._tree: torch.nn.Module | None = None

    def load(self) -> torch.nn.Module:
        if self._tree is None:
            self._tree = self._build()
            return self._tree
        state = self._read(self._source)
        loaded = self._tree.load_state_dict(state, strict=False, assign=True)
        # Old checkpoints also hold buffers that the model now computes itself (BERT's position ids).
        unexpected = set(loaded.unexpected_keys) - {name for name, _ in self._tree.named_buffers()}
        if hasattr(self._tree, "tie_weights"):  # a transformers model: tied weights are stored once
            self._tree.tie_weights()
        missing = [name for name, param in self._tree.named_parameters() if param.is_meta]
        if missing or unexpected:
            raise RuntimeError(f"weights in {self._source} do not fit the model: {missing=} {unexpected=}")
        return self._tree

    def release(self) -> None:
        """Each parameter becomes a meta tensor of its shape: its storage is freed, the tree stays."""
        import torch

        assert self._tree is not None, "released before it was loaded"
        if self._casts and self._spill is None:
            self._write_spill(self._tree)
        for module in self._tree.modules():
            for name, param in module.named_parameters(recurse=False):
                module._parameters[name] = torch.nn.Parameter(param.to("meta"), param.requires_grad)

    def _read(self, folder: Path) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        state = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, framework="pt", device=self._device) as weights:
                keys = weights.keys()
                state.update({key: self._cast(weights.get_tensor(key)) for key in keys})
        return state

    def _cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Floating-point tensors only, as `from_pretrained` does (BERT stores integer position ids)."""
        return tensor.to(self._dtype) if tensor.is_floating_point() else tensor

    def _write_spill(self, tree: torch.nn.Module) -> None:
        from safetensors.torch import save_file

        state = tree.state_dict()
        # A tied copy that the store also holds is left out: safetensors refuses tensors that share
        # memory, and `tie_weights()` restores it on load.
        tied = getattr(tree, "all_tied_weights_keys", {})
        kept = [key for key in self._stored if key in state and tied.get(key) not in self._stored]
        spill = tempfile.TemporaryDirectory(prefix="fnserve-weights-")
        spilled = {key: state[key].contiguous() for key in kept}
        try:
            save_file(spilled, f"{spill.name}/model.safetensors")
        except BaseException:
            # A spill cut short (a full disk) must not be read by a wake: the next release writes it again.
            spill.cleanup()
            raise
        self._spill, self._source = spill, Path(spill.name)


class ModelSlot(Generic[M]):
    def __init__(
        self,
        name: str,
        load: Callable[[], M],
        unload: Callable[[M], None],
        idle_seconds: float,
        alive: Callable[[M], bool] | None = None,
    ) -> None:
        """`load` and `unload` run in a worker thread; `idle_seconds` 0 keeps the model resident;
        `alive` tells a model that has stopped working (an engine whose loop died), which the next
        `use()` unloads and loads again instead of handing out."""
        self.name = name
        self._load, self._unload, self._alive = load, unload, alive
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
            if self._model is not None and self._alive and not self._alive(self._model):
                logger.error("%s stopped working: loading it again", self.name)
                dead, self._model = self._model, None
                # Unloaded and loaded again as one shielded step: a caller that gave up during the unload
                # let the next one start a load that the unload, still running, would strip.
                self._pending = asyncio.ensure_future(self._replace(dead))
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

    async def _replace(self, dead: M) -> None:
        """Loaded again even if `dead` cannot be unloaded: an engine stopped by an idle release whose
        weights could not be set aside (a full disk for the spill) is dead with its weights still in
        memory, and failing every caller until the next idle check would not free them."""
        try:
            await asyncio.to_thread(self._unload, dead)
        except Exception:
            logger.exception("%s could not be unloaded; loading it again all the same", self.name)
        except BaseException:
            self._pending = None  # the next caller loads it
            raise
        await self._wake()

    async def _wake(self) -> None:
        start = time.perf_counter()
        try:
            self._model = await asyncio.to_thread(self._load)
        finally:
            self._pending = None
        # Idle from now: a caller that gave up during the load left no use behind to count from.
        self._last_used = time.monotonic()
        seconds = time.perf_counter() - start
        LOADS.labels(model=self.name).inc()
        COLD_START.labels(model=self.name).observe(seconds)
        logger.info("%s loaded again in %.2f s", self.name, seconds)

    async def close(self, stop: Callable[[M], object]) -> None:
        """At shutdown: an idle release or a load under way ends first (a load whose callers all gave up
        runs on, shielded), then `stop` runs on what is loaded and the slot is left empty. Read at the
        shutdown's start, an engine that such a load started after it had been left running: its loop
        thread kept the worker from exiting until it was killed."""
        async with self._lock:  # a release under way holds it to its end
            if self._pending is not None:
                with suppress(Exception):  # a load that failed left nothing to stop
                    await asyncio.shield(self._pending)
            if (model := self._model) is not None:
                self._model = None  # nothing releases it again (a spill at shutdown) or hands it out
                await asyncio.to_thread(stop, model)

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
                except Exception:  # this loop must go on: one failure had ended scale-to-zero for good
                    logger.exception("%s could not be released; the next idle check tries again", self.name)
                    continue
                finally:
                    self._releasing = False
            UNLOADS.labels(model=self.name).inc()
            logger.info("%s released after %.0f s idle", self.name, idle)
