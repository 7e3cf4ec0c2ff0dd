"""The image-classification function on a real server: every protocol that takes images (REST upload
and base64, OIP over gRPC and REST, batch lines, BentoML's native endpoint) against the model run
directly, batching that does not change answers, and each kind of bad image refused by name."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import bentoml
import httpx
import matplotlib
import numpy as np
import pytest
import tritonclient.grpc as tg
from PIL import Image
from tritonclient.utils import InferenceServerException

from services.functions.image import classify, load, preprocess
from tests.server import IMAGE_MAX_BYTES, IMAGE_MAX_PIXELS, LONG, counter, http_client
from tests.test_batch import final, jsonl, lines_of, submit, wait_until

MODEL = "efficientnet-lite0"
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"  # a photo matplotlib ships


@pytest.fixture(scope="module")
def server(capped_server: tuple[str, str]) -> tuple[str, str]:
    """The capped server, by the name these tests give it: images in fp32, so that answers can be
    compared with the model run here, and limits low enough to send images past them."""
    return capped_server


@pytest.fixture(scope="module")
def direct() -> object:
    """The classifier loaded here from the model store, as the server loads it."""
    return load(bentoml.models.get(MODEL).path, "cpu")


def encoded(image: Image.Image, kind: str = "PNG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, kind, **options)
    return out.getvalue()


def pictures() -> list[bytes]:
    """The photo and three images made here: a gradient, a checkerboard, noise."""
    ramp = np.linspace(0, 255, 300, dtype=np.uint8)
    gradient = Image.fromarray(np.stack([np.tile(ramp, (200, 1))] * 3, axis=-1))
    board = Image.fromarray(((np.indices((240, 320)).sum(axis=0) // 40) % 2 * 255).astype(np.uint8))
    noise = Image.fromarray(np.random.default_rng(7).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    return [PHOTO.read_bytes(), encoded(gradient), encoded(board, "JPEG"), encoded(noise, "WEBP")]


def rest(url: str, images: list[bytes], top_k: int = 5) -> httpx.Response:
    files = [("image", (f"{i}.img", data)) for i, data in enumerate(images)]
    return httpx.post(
        f"{url}/v1/images/classifications",
        data={"model": MODEL, "top_k": str(top_k)},
        files=files,
        timeout=LONG,
    )


def rest_base64(url: str, image: str, top_k: int = 5) -> httpx.Response:
    body = {"model": MODEL, "image": image, "top_k": top_k}
    return httpx.post(f"{url}/v1/images/classifications", json=body, timeout=LONG)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def labels(response: httpx.Response) -> list[list[tuple[int, float]]]:
    assert response.status_code == 200, response.text
    return [
        [(label["class_id"], label["score"]) for label in item["labels"]] for item in response.json()["data"]
    ]


def test_the_photo_is_a_military_uniform_as_the_model_run_directly_says(
    server: tuple[str, str], direct: object
) -> None:
    url, _ = server
    data = PHOTO.read_bytes()
    expected = classify(direct, preprocess(data, 10**9, 10**9, "image")[None])[0]
    best = np.argsort(-expected)[:3]
    uploaded = labels(rest(url, [data], top_k=3))[0]
    body = {"model": MODEL, "image": base64.b64encode(data).decode(), "top_k": 3}
    as_json = labels(httpx.post(f"{url}/v1/images/classifications", json=body, timeout=LONG))[0]
    for answer in (uploaded, as_json):
        assert [c for c, _ in answer] == best.tolist()
        assert answer[0][0] == 652  # ImageNet's "military uniform"
        np.testing.assert_allclose([p for _, p in answer], expected[best], rtol=0, atol=1e-5)
    response = rest(url, [data], top_k=1).json()
    assert response["data"][0]["labels"][0]["label"] == "military uniform"


def test_images_batched_together_answer_as_they_do_alone(server: tuple[str, str]) -> None:
    url, _ = server
    images = pictures()
    together = labels(rest(url, images))
    alone = [labels(rest(url, [image]))[0] for image in images]
    for joint, single in zip(together, alone, strict=True):
        assert [c for c, _ in joint] == [c for c, _ in single]
        np.testing.assert_allclose([p for _, p in joint], [p for _, p in single], rtol=0, atol=1e-5)
    # This server keeps no image cache: nothing was looked up, so nothing is counted as a miss.
    assert counter(url, "fnserve_cache_lookups_total", function="image") == 0


def test_oip_over_grpc_takes_files_and_tensors(server: tuple[str, str]) -> None:
    url, address = server
    data = PHOTO.read_bytes()
    expected = labels(rest(url, [data], top_k=3))[0]
    client = tg.InferenceServerClient(address)
    files = tg.InferInput("image", [1], "BYTES")
    files.set_data_from_numpy(np.array([data], dtype=object))
    tensor = preprocess(data, 10**9, 10**9, "image")[None]
    pixels = tg.InferInput("input", list(tensor.shape), "FP32")
    pixels.set_data_from_numpy(tensor)
    for inputs in ([files], [pixels]):
        result = client.infer(MODEL, inputs, parameters={"top_k": 3})
        assert result.as_numpy("class_ids")[0].tolist() == [c for c, _ in expected]
        assert result.as_numpy("labels")[0][0] == b"military uniform"
        np.testing.assert_allclose(result.as_numpy("scores")[0], [p for _, p in expected], rtol=0, atol=1e-5)


def cmyk() -> bytes:
    return encoded(Image.new("CMYK", (64, 64), (0, 128, 255, 0)), "JPEG")


def sixteen_bit() -> bytes:
    return encoded(Image.fromarray(np.full((64, 64), 40000, dtype=np.uint16)))


def animated() -> bytes:
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])


def cut_gif() -> bytes:
    """An animated GIF cut short where Pillow, counting its frames, raises neither OSError nor
    ValueError (IndexError, with Pillow 13.0): such a file was answered with a 500."""
    frames = [Image.new("RGB", (16, 16), (60 * i, 0, 0)) for i in range(4)]
    whole = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    for cut in range(len(whole)):
        try:
            Image.open(io.BytesIO(whole[:cut])).n_frames  # noqa: B018 - what the server reads
        except (OSError, SyntaxError, ValueError):
            continue
        except Exception:
            return whole[:cut]
    raise AssertionError("Pillow counts the frames of every cut of this GIF cleanly now: find another")


def too_many_pixels() -> bytes:
    """One row past the limit, a few kB: what a decompression bomb looks like."""
    return encoded(Image.new("L", (2000, IMAGE_MAX_PIXELS // 2000 + 1)))


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda: b"this is not an image", "not an image"),
        (lambda: PHOTO.read_bytes()[:20_000], "could not be decoded"),
        (cut_gif, "could not be decoded"),
        (too_many_pixels, "decompression bomb"),
        (lambda: b"\xff\xd8" + bytes(IMAGE_MAX_BYTES), "over the limit"),
        (cmyk, "mode CMYK"),
        (sixteen_bit, "mode I;16"),
        (animated, "animated"),
        (lambda: b"", "is empty"),
    ],
)
def test_bad_images_get_400_that_names_the_problem_and_the_next_is_served(
    server: tuple[str, str], make: object, problem: str
) -> None:
    url, address = server
    response = rest(url, [PHOTO.read_bytes(), make()])  # type: ignore[operator]
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert problem in error["message"] and error["message"].startswith("image[1]"), error
    files = tg.InferInput("image", [1], "BYTES")
    files.set_data_from_numpy(np.array([make()], dtype=object))  # type: ignore[operator]
    with pytest.raises(InferenceServerException) as caught:
        tg.InferenceServerClient(address).infer(MODEL, [files])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and problem in caught.value.message()
    assert labels(rest(url, [PHOTO.read_bytes()], top_k=1))[0][0][0] == 652


@pytest.mark.parametrize(
    ("shape", "datatype", "problem"),
    [([1, 3, 100, 100], "FP32", "shape [n, 3, 224, 224]"), ([1, 3, 224, 224], "INT32", "must be FP32")],
)
def test_bad_tensors_are_invalid_argument(
    server: tuple[str, str], shape: list[int], datatype: str, problem: str
) -> None:
    _, address = server
    client = tg.InferenceServerClient(address)
    tensor = tg.InferInput("input", shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype=np.float32 if datatype == "FP32" else np.int32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, [tensor])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT" and problem in caught.value.message()


def test_bad_base64_and_a_wrong_model_are_refused(server: tuple[str, str]) -> None:
    url, _ = server
    bad = httpx.post(
        f"{url}/v1/images/classifications", json={"model": MODEL, "image": "not base64!"}, timeout=LONG
    )
    assert bad.status_code == 400 and "base64" in bad.json()["error"]["message"]
    # As tools write it: wrapped in lines, or a data URL.
    for written in (base64.encodebytes(PHOTO.read_bytes()).decode(), f"data:image/jpeg;base64,{b64(PHOTO)}"):
        assert labels(rest_base64(url, written, top_k=1))[0][0][0] == 652
    url_without_base64 = f"data:image/jpeg,{b64(PHOTO)}"
    assert rest_base64(url, url_without_base64).status_code == 400
    unknown = httpx.post(
        f"{url}/v1/images/classifications", json={"model": "resnet", "image": ""}, timeout=LONG
    )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_batch_lines_and_the_native_endpoint_classify_too(server: tuple[str, str]) -> None:
    url, _ = server
    photo = base64.b64encode(PHOTO.read_bytes()).decode()
    lines = [
        {
            "custom_id": "photo",
            "method": "POST",
            "url": "/v1/images/classifications",
            "body": {"model": MODEL, "image": photo, "top_k": 1},
        },
        {
            "custom_id": "text",
            "method": "POST",
            "url": "/v1/images/classifications",
            "body": {"model": MODEL, "image": base64.b64encode(b"text").decode()},
        },
    ]
    with http_client(url) as client:
        batch = wait_until(client, submit(client, jsonl(lines), "/v1/images/classifications")["id"], final)
        assert batch["status"] == "completed" and batch["request_counts"] == {
            "total": 2,
            "completed": 1,
            "failed": 1,
        }
        (done,) = lines_of(client, batch["output_file_id"])
        (failed,) = lines_of(client, batch["error_file_id"])
    assert (
        done["custom_id"] == "photo" and done["response"]["body"]["data"][0]["labels"][0]["class_id"] == 652
    )
    assert failed["custom_id"] == "text" and "not an image" in failed["error"]["message"]
    with bentoml.SyncHTTPClient(url, timeout=LONG) as native:
        answer = native.classify(image=PHOTO, top_k=2)
    assert [label["class_id"] for label in answer][0] == 652 and len(answer) == 2
    not_an_image = httpx.post(f"{url}/classify", files={"image": ("x.jpg", b"not an image")}, timeout=LONG)
    assert not_an_image.status_code == 400 and "not an image" in not_an_image.text
    # A malformed form (a part without headers, as the fuzzer sent it): BentoML's own handler answered 500.
    boundary = "7c5156fb04a2177cf9e322ad31ebde44"
    broken = f"--{boundary}\r\nNone--{boundary}--\r\n".encode()
    kind = {"content-type": f"multipart/form-data; boundary={boundary}"}
    malformed = httpx.post(f"{url}/classify", content=broken, headers=kind, timeout=LONG)
    assert malformed.status_code == 400 and "malformed" in malformed.json()["error"]["message"], (
        malformed.text
    )
    with bentoml.SyncHTTPClient(url, timeout=LONG) as native:
        assert native.classify(image=PHOTO, top_k=1)[0]["class_id"] == 652
