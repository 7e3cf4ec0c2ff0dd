"""The image function's preprocessing against the pipeline the model was trained with, written with
Pillow alone: torch's uint8 bicubic resize stands in for Pillow's for speed, and this fails if the two
stop giving the same pixels (a torch or Pillow upgrade)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from services.functions.image import MEAN, RESIZE, SIZE, STD, preprocess
from tests.test_images import PHOTO


def trained(data: bytes) -> np.ndarray:
    """Decode, RGB, short side to 256 with Pillow's bicubic, centre crop 224, ImageNet normalisation."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = RESIZE / min(image.size)
    size = (max(SIZE, round(image.width * scale)), max(SIZE, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - SIZE) // 2, (image.height - SIZE) // 2
    image = image.crop((left, top, left + SIZE, top + SIZE))
    return (np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0 - MEAN) / STD


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    out = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(out, "PNG")
    return out.getvalue()


rng = np.random.default_rng(7)
IMAGES = {
    "photo, downscaled 2x": PHOTO.read_bytes(),
    "noise, wide, downscaled 3.9x": png(rng.integers(0, 256, (1000, 1500, 3), dtype=np.uint8)),
    "noise, tall, upscaled": png(rng.integers(0, 256, (230, 100, 3), dtype=np.uint8)),
    "greyscale noise": png(rng.integers(0, 256, (400, 300), dtype=np.uint8)),
    "RGBA noise": png(rng.integers(0, 256, (300, 300, 4), dtype=np.uint8)),
    "palette": png(rng.integers(0, 256, (512, 384, 3), dtype=np.uint8), "P"),
    "matplotlib's logo, upscaled": (
        Path(matplotlib.get_data_path()) / "images" / "matplotlib_large.png"
    ).read_bytes(),
}


@pytest.mark.parametrize("name", IMAGES)
def test_preprocessing_gives_the_pixels_pillow_gives(name: str) -> None:
    data = IMAGES[name]
    served, expected = preprocess(data, 10**9, 10**9, "image"), trained(data)
    assert served.shape == expected.shape == (3, SIZE, SIZE)
    levels = np.abs(served - expected) * STD * 255  # back to 8-bit levels
    assert levels.max() < 1.5, f"{name}: pixels differ by up to {levels.max():.1f} levels"
    assert levels.mean() < 0.05, f"{name}: pixels differ by {levels.mean():.3f} levels on average"
