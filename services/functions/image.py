"""The image-classification function: EfficientNet-Lite0 on ImageNet-1k, batching images from every
caller into one forward pass, as the embedding function batches texts.

Encoded files are checked and preprocessed as the model was trained (decode, RGB, resize the short side
to 256 with bicubic filtering, centre crop 224, ImageNet mean and standard deviation, as the weights'
own package documents) in worker threads, off the event loop: Pillow and torch release the GIL while
they decode and resize."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bentoml
import numpy as np

from models.catalog import CATALOG
from services.config import Settings, pick_device, usable_cores
from services.functions.batching import GreedyBatcher, WaitTarget, answered_by
from services.functions.cache import cache_key, response_cache, through_cache
from services.functions.hardware import Choices, model_status, share_the_gil
from services.functions.lifecycle import ModelSlot, Reloadable
from services.functions.pacing import encoder_turns
from services.functions.types import Refused

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("bentoml.fnserve.image")
SIZE, RESIZE = 224, 256
# The centre crop keeps a square 224/256 of the short side wide, so a long side past this many short
# sides is cut to its centre before the resize: a 200,000x10 strip resized whole takes gigabytes.
MAX_ASPECT = 4
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
# Modes Pillow converts to 8-bit RGB without loss of meaning; others (CMYK, 16- and 32-bit) are refused
# rather than guessed at.
MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "1"}

BATCH_SIZE = bentoml.metrics.Histogram(
    name="fnserve_image_batch_size",
    documentation="Images per forward pass of the image classifier",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)


@dataclass
class Classified:
    scores: np.ndarray
    """[n, classes] float32 probabilities"""
    hits: int | None
    """inputs answered from the response cache; None with the cache off"""


def preprocess(data: bytes, max_bytes: int, max_pixels: int, where: str) -> np.ndarray:
    """One encoded image as the model's input [3, 224, 224] float32; refuses what is not a single 8-bit
    image within the limits, naming `where` (the caller's name for it) and the problem."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not data:
        raise Refused("invalid", f"{where} is empty", where)
    if len(data) > max_bytes:
        raise Refused("invalid", f"{where} is {len(data)} bytes, over the limit of {max_bytes}", where)
    # Pillow's own bomb check (a warning past its limit, an error past twice it) follows the setting:
    # at its default, 89.5 MP, it refused what a raised setting allows. check_image refuses past the
    # setting before a pixel is decoded. (A global, set to one value by every decoding thread; the
    # per-call warnings filter this replaced was process-wide state that threads overwrote.)
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        image = Image.open(BytesIO(data))
        check_image(image, max_pixels, where)
        image.load()
        image = ImageOps.exif_transpose(image)  # a phone's portrait photo, upright as it is shown
    except Refused:
        raise
    except UnidentifiedImageError:
        raise Refused(
            "invalid", f"{where} is not an image Pillow can read (JPEG, PNG, WebP, ...)", where
        ) from None
    except Image.DecompressionBombError as exc:
        raise Refused("invalid", f"{where}: {exc}", where) from None
    # Truncated or corrupt data. Pillow's decoders raise OSError, SyntaxError and ValueError, but counting
    # a cut GIF's frames IndexError or struct.error, and a bad TIFF TypeError (Pillow 13.0): those had
    # answered 500 and sent batch lines into retries.
    except Exception as exc:
        raise Refused(
            "invalid", f"{where} could not be decoded: {type(exc).__name__}: {exc}", where
        ) from None
    return model_input(image)


def check_image(image: Any, max_pixels: int, where: str) -> None:
    """Refuses an image too large, animated, or in a mode that is not 8-bit RGB or greyscale."""
    pixels = image.width * image.height
    if pixels > max_pixels:
        message = f"{where} is {image.width}x{image.height} pixels, over the limit of {max_pixels}"
        raise Refused("invalid", message + " (a decompression bomb?)", where)
    # A camera's JPEG with previews (MPO) has frames too; Pillow reads the main picture, frame 0.
    if getattr(image, "n_frames", 1) > 1 and image.format != "MPO":
        raise Refused("invalid", f"{where} is animated ({image.n_frames} frames); send one frame", where)
    if image.mode not in MODES:
        raise Refused("invalid", f"{where} is in mode {image.mode}; send 8-bit RGB or greyscale", where)


def model_input(image: Any) -> np.ndarray:
    """A decoded PIL image as the model was trained to see it.

    Pillow decodes; torch resizes. Torch's antialiased bicubic on uint8 (the kernel torchvision's
    `resize` calls for tensors, ported from Pillow-SIMD) gives Pillow's own BICUBIC pixels 7x faster here
    (0.32 against 2.30 ms for the 512x600 photo, one thread, Zen 5). torchvision itself is not used: the
    package index has only its CUDA builds, which do not import beside the CPU torch.
    `tests/test_image_preprocessing.py` fails if the two stop agreeing."""
    import torch

    long, short = max(image.size), min(image.size)
    if long > MAX_ASPECT * short:
        keep = MAX_ASPECT * short
        box = (long - keep) // 2
        image = image.crop(
            (box, 0, box + keep, short) if image.width == long else (0, box, short, box + keep)
        )
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]
    scale = RESIZE / min(image.size)
    size = (max(SIZE, round(image.height * scale)), max(SIZE, round(image.width * scale)))
    resized = torch.nn.functional.interpolate(pixels, size, mode="bicubic", antialias=True)[0]
    top, left = (size[0] - SIZE) // 2, (size[1] - SIZE) // 2
    array = resized[:, top : top + SIZE, left : left + SIZE].numpy().astype(np.float32) / 255.0
    return (array - MEAN) / STD


def classify(model: Any, batch: np.ndarray, device: str = "cpu") -> np.ndarray:
    """Probabilities [n, classes] for preprocessed images [n, 3, 224, 224]. Shared with the benchmark."""
    import torch

    dtype = next(model.parameters()).dtype
    with torch.inference_mode():
        logits = model(torch.from_numpy(batch).to(device=device, dtype=dtype))
        return logits.float().softmax(dim=-1).cpu().numpy()


def load(path: str, device: str) -> torch.nn.Module:
    """The classifier from the model store (safetensors, fp32)."""
    from safetensors.torch import load_file

    from services.functions.efficientnet import EfficientNetLite0

    model = EfficientNetLite0()
    model.load_state_dict(load_file(Path(path) / "model.safetensors"))
    return model.to(device).eval()


class ImageFunction:
    """Owns the classifier (loaded, released when idle, woken on use), its batcher and its cache."""

    def __init__(self, settings: Settings, model_path: str) -> None:
        from PIL import Image

        # Pillow warns of an image between its limit (the setting, `preprocess`) and twice it, naming its
        # size: a line on stderr and an entry in its warning registry for every size a client sends.
        # check_image refuses those images by name already. Set once, before any decoding thread.
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
        entry = CATALOG[settings.image_model]
        self.settings = settings
        self.model_id = entry.name
        self.choices = Choices("image")
        share_the_gil(self.choices, settings.gil_switch_microseconds)
        self.device = pick_device(settings)
        self.labels: list[str] = json.loads((Path(model_path) / "labels.json").read_text())
        stored = load(model_path, self.device)
        probe = np.zeros((8, 3, SIZE, SIZE), dtype=np.float32)
        self.dtype: torch.dtype = self.choices.dtype(
            settings.image_dtype,
            "FNSERVE_IMAGE_DTYPE",
            stored,
            lambda model: classify(model, probe, self.device),
            key=str(entry.tag),
        )
        served = stored.to(self.dtype)
        self.batch_size = self.choices.batch_size(
            settings.image_max_batch_size, "FNSERVE_IMAGE_MAX_BATCH_SIZE", self.device,
            settings.image_batch_size, (1, 4, 8, 16),
            lambda size: classify(served, np.zeros((size, 3, SIZE, SIZE), dtype=np.float32), self.device),
            f"{entry.tag}-{self.dtype}",
        )  # fmt: skip
        weights = Reloadable(lambda: served, model_path, self.dtype, self.device)
        self._forward_lock = threading.Lock()
        # Decoding has threads of its own: queued in asyncio's shared threads, a flood of large images held
        # every task behind them there (the batch store's calls, long texts' tokenizing) until decoded.
        self._decoders = ThreadPoolExecutor(max_workers=usable_cores(), thread_name_prefix="fnserve-decode")
        self.slot = ModelSlot(
            entry.name, weights.load, lambda _: self._release(weights), settings.idle_release_seconds
        )
        self.slot.load_now()
        logger.info("image model %s on %s", entry.tag, self.device)
        turns = encoder_turns("image", settings.encoder_cpu_share, self.device, self.choices)
        self._batcher = GreedyBatcher(
            self._forward,
            max_batch_size=self.batch_size,
            max_queue_seconds=settings.image_max_latency_ms / 1000,
            max_queue=max(64, self.batch_size * 16),
            on_batch=lambda size, _: BATCH_SIZE.observe(size),
            wait_target=WaitTarget(
                "image", settings.image_max_wait_seconds, "FNSERVE_IMAGE_MAX_WAIT_SECONDS"
            ),
            turns=turns,
        )
        self._cache = response_cache(settings.redis_url, settings.image_cache_size)
        self._cache_scope = (entry.tag, str(self.dtype))

    def status(self) -> dict[str, Any]:
        entry = model_status(self.slot.state, self.device, self.choices)
        return {self.model_id: {**entry, "load": self._batcher.load()}}

    def top(self, scores: np.ndarray, k: int) -> list[list[tuple[int, str, float]]]:
        """The k best (class id, label, probability) per image, best first."""
        best = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
        return [
            [(int(i), self.labels[i], float(row[i])) for i in ids]
            for row, ids in zip(scores, best, strict=True)
        ]

    async def preprocess(
        self, images: list[bytes], field: str = "image", deadline: float | None = None
    ) -> list[np.ndarray]:
        """Model inputs for encoded images, in worker threads, under the request's deadline; refuses the
        first bad one by index. A full queue refuses them before they are decoded (up to 64 images of
        up to 40 MP each, for a 429 all the same)."""
        limits = self.settings
        if not images:
            raise Refused("invalid", f"{field} must not be empty", field)
        if len(images) > limits.image_max_inputs:
            raise Refused("invalid", f"at most {limits.image_max_inputs} images per request", field)
        where = [field] if len(images) == 1 else [f"{field}[{i}]" for i in range(len(images))]
        decode = asyncio.get_running_loop().run_in_executor
        async with answered_by(deadline):
            self._batcher.check(len(images), deadline)
            decoded = await asyncio.gather(
                *(
                    decode(
                        self._decoders,
                        preprocess,
                        data,
                        limits.image_max_bytes,
                        limits.image_max_pixels,
                        name,
                    )
                    for data, name in zip(images, where, strict=True)
                ),
                return_exceptions=True,
            )
        for item in decoded:  # the first bad one by index, not the first to fail: the same answer each time
            if isinstance(item, BaseException):
                raise item
        return decoded  # type: ignore[return-value]

    def check_tensor(self, batch: np.ndarray, field: str = "input") -> list[np.ndarray]:
        """Already preprocessed images [n, 3, 224, 224] float32."""
        if batch.ndim != 4 or batch.shape[1:] != (3, SIZE, SIZE):
            raise Refused(
                "invalid", f"{field} must have shape [n, 3, {SIZE}, {SIZE}], not {list(batch.shape)}", field
            )
        if not 1 <= len(batch) <= self.settings.image_max_inputs:
            raise Refused("invalid", f"{field} must hold 1 to {self.settings.image_max_inputs} images", field)
        if not np.isfinite(batch).all():
            raise Refused("invalid", f"{field} holds NaN or infinite values", field)
        return list(batch.astype(np.float32, copy=False))

    async def classify(self, inputs: list[np.ndarray], deadline: float | None = None) -> Classified:
        """Probabilities for checked model inputs; those not in the cache (keyed on the input's bytes)
        are batched with other requests' images."""
        async with answered_by(deadline):
            return await self._classify(inputs, deadline)

    async def _classify(self, inputs: list[np.ndarray], deadline: float | None) -> Classified:
        async def compute(missing: list[int]) -> list[np.ndarray]:
            async with self.slot.use():
                return await self._batcher.submit([inputs[i] for i in missing], deadline)

        def keys() -> list[str]:
            digests = [hashlib.sha256(x.tobytes()).hexdigest() for x in inputs]
            return [cache_key("image", *self._cache_scope, digest) for digest in digests]

        def unpack(value: bytes) -> np.ndarray:
            return np.frombuffer(value, dtype=np.float32)

        scores, hits = await through_cache(
            self._cache, "image", keys, compute, np.ndarray.tobytes, unpack, len(inputs)
        )
        return Classified(np.stack(scores), hits)

    def _release(self, weights: Reloadable) -> None:
        with self._forward_lock:
            weights.release()

    def _forward(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        with self._forward_lock:
            return list(classify(self.slot.model, np.stack(inputs), self.device))
