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


def close_to(served: np.ndarray, expected: np.ndarray) -> bool:
    return served.shape == expected.shape and float((np.abs(served - expected) * STD * 255).max()) < 1.5


def test_a_strip_two_million_pixels_long_is_read_by_its_centre() -> None:
    """Resized whole it would be 256x512,000,000 pixels; only its centre reaches the crop anyway."""
    strip = rng.integers(0, 256, (1, 2_000_000, 3), dtype=np.uint8)
    centre = strip[:, 1_000_000 - 2 : 1_000_000 + 2]
    assert close_to(preprocess(png(strip), 10**9, 10**9, "image"), trained(png(centre)))


def test_a_camera_jpeg_with_a_preview_is_its_main_picture_not_an_animation() -> None:
    out = io.BytesIO()
    main, preview = Image.new("RGB", (300, 200), "red"), Image.new("RGB", (160, 120), "blue")
    main.save(out, "MPO", save_all=True, append_images=[preview])
    assert Image.open(io.BytesIO(out.getvalue())).n_frames == 2
    assert close_to(preprocess(out.getvalue(), 10**9, 10**9, "image"), trained(out.getvalue()))


def test_a_photo_taken_upright_is_read_upright() -> None:
    """EXIF orientation 6: stored on its side, shown turned 90 degrees clockwise."""
    stored = np.zeros((200, 300, 3), dtype=np.uint8)
    stored[:, :150] = (255, 0, 0)
    stored[:, 150:] = (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif, quality=95)
    decoded = Image.open(io.BytesIO(out.getvalue()))
    shown = png(np.asarray(decoded.convert("RGB").transpose(Image.Transpose.ROTATE_270)))
    assert close_to(preprocess(out.getvalue(), 10**9, 10**9, "image"), trained(shown))


def test_a_limit_raised_past_pillows_own_lets_larger_images_in() -> None:
    """FNSERVE_IMAGE_MAX_PIXELS above Pillow's default bomb limit (89.5 MP): a 90.25 MP image is read,
    where Pillow's own limit had refused it; past the setting it is still refused, by its size."""
    from services.functions.types import Refused

    big = png(np.zeros((9_500, 9_500), dtype=np.uint8))  # zeros: a PNG of about 90 kB
    assert preprocess(big, len(big), 100_000_000, "image").shape == (3, SIZE, SIZE)
    with pytest.raises(Refused, match="9500x9500 pixels, over the limit of 90000000"):
        preprocess(big, len(big), 90_000_000, "image")
