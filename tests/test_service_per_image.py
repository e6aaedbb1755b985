"""The service with a test model whose captions differ per image, in-process (Flask test client, no gunicorn).

The tiny random model gives every image the same caption, so results handed to the wrong request (the micro-batcher
or the batch route mixing up rows) pass unnoticed with it. Here the encoder is calibrated (``varied_tiny_model``) so
that each test image gets its own caption, and every request must get its image's caption: in one micro-batch with
equal options, with interleaved different options, through the batch route and from concurrent requests.
Also here, fast: decoder errors become a JSON 500 (batching on and off), and an EXIF-rotated upload is captioned
upright.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import varied_tiny_model
from flask import Flask
from PIL import Image

from captioner.api import Captioner
from captioner.checkpoint import save_model
from captioner.decoding import DecodingOptions
from captioner.preprocess import EXIF_ORIENTATION
from service.app import create_app
from service.microbatch import MicroBatcher
from service.routes.common import ENGINE_KEY

NUM_IMAGES = 8


def photo(seed: int, fmt: str = "PNG") -> bytes:
    """A noisy picture on a per-seed background colour: a different caption for each seed with the varied model."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (3,))
    pixels = (rng.integers(0, 256, (48, 64, 3)) * 0.5 + background * 0.5).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


# Seeds whose photos get eight different captions with each of OPTION_SETS (checked by the first test).
PHOTOS = [photo(seed) for seed in (0, 1, 2, 3, 5, 7, 9, 10)]


@pytest.fixture(scope="module")
def varied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(varied_tiny_model(), tmp_path_factory.mktemp("models") / "varied")


@pytest.fixture(scope="module")
def captioner(varied_dir: Path) -> Captioner:
    return Captioner.load(varied_dir, allow_download=False, runtime="torch")


@pytest.fixture(scope="module")
def app(varied_dir: Path) -> Iterator[Flask]:
    app = create_app({"model": str(varied_dir), "load_in_background": False, "runtime": "torch",
                      "batch_max_wait_ms": 200})
    yield app
    app.extensions[ENGINE_KEY].close()


def one_by_one(captioner: Captioner, data: bytes, options: DecodingOptions) -> list[str]:
    return [c.text for c in captioner.caption_tensors(captioner.load_tensor(data).unsqueeze(0), options)[0]]


OPTION_SETS = [
    {"strategy": "greedy"},
    {"beam_size": 3, "num_captions": 2},
    {"beam_size": 2, "max_length": 6},
]


def test_the_test_model_captions_each_image_differently(captioner: Captioner) -> None:
    for given in OPTION_SETS:
        options = captioner.options(**given)
        captions = {one_by_one(captioner, data, options)[0] for data in PHOTOS}
        assert len(captions) == NUM_IMAGES, given  # otherwise swapped results could not be seen


def _run_in_one_batch(captioner: Captioner, tensors: list[torch.Tensor], options: list[DecodingOptions]) -> list:
    sizes: list[int] = []
    batcher = MicroBatcher(captioner, max_size=32, max_wait_ms=5000, observer=lambda n, s: sizes.append(n))
    try:
        with batcher.expecting(len(tensors)) as ticket:  # the batch waits for every announced image
            futures = [batcher.submit(t, o, ticket) for t, o in zip(tensors, options, strict=True)]
        results = [f.result(10) for f in futures]
    finally:
        batcher.close()
    assert sizes == [len(tensors)]  # really one model batch
    return results


@pytest.mark.parametrize("given", OPTION_SETS)
def test_micro_batch_with_equal_options_gives_each_request_its_caption(captioner: Captioner, given: dict) -> None:
    options = captioner.options(**given)
    tensors = [captioner.load_tensor(data) for data in PHOTOS]
    results = _run_in_one_batch(captioner, tensors, [options] * NUM_IMAGES)
    for data, result in zip(PHOTOS, results, strict=True):
        assert [c.text for c in result.captions] == one_by_one(captioner, data, options)
        assert result.batch_size == NUM_IMAGES


def test_micro_batch_with_interleaved_options_gives_each_request_its_caption(captioner: Captioner) -> None:
    sets = [captioner.options(**given) for given in OPTION_SETS]
    options = [sets[i % len(sets)] for i in range(NUM_IMAGES)]  # groups interleaved in the queue
    tensors = [captioner.load_tensor(data) for data in PHOTOS]
    results = _run_in_one_batch(captioner, tensors, options)
    for data, opts, result in zip(PHOTOS, options, results, strict=True):
        assert [c.text for c in result.captions] == one_by_one(captioner, data, opts)
        assert len(result.captions) == opts.num_captions


@pytest.mark.parametrize("query", ["strategy=greedy", "beam_size=3&num_captions=2"])
def test_batch_route_keeps_each_image_with_its_caption(app: Flask, captioner: Captioner, query: str) -> None:
    files = [(io.BytesIO(data), f"{i}.png") for i, data in enumerate(PHOTOS)]
    response = app.test_client().post(f"/v1/captions:batch?{query}", data={"image": files})
    assert response.status_code == 200, response.json
    given = dict(pair.split("=") for pair in query.split("&"))
    options = captioner.options(**{k: v if k == "strategy" else int(v) for k, v in given.items()})
    results = response.json["results"]
    assert [[c["text"] for c in r["captions"]] for r in results] == [
        one_by_one(captioner, data, options) for data in PHOTOS]


def test_concurrent_requests_with_equal_and_different_options(app: Flask, captioner: Captioner) -> None:
    queries = ["strategy=greedy", "strategy=greedy", "beam_size=2", "strategy=greedy", "beam_size=2",
               "beam_size=2", "strategy=greedy", "beam_size=2"]
    answers: list = [None] * NUM_IMAGES
    start = threading.Barrier(NUM_IMAGES)

    def request(i: int) -> None:
        start.wait(10)
        answers[i] = app.test_client().post(f"/v1/captions?{queries[i]}", data=PHOTOS[i], content_type="image/png")

    threads = [threading.Thread(target=request, args=(i,)) for i in range(NUM_IMAGES)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    for i, response in enumerate(answers):
        assert response.status_code == 200, response.json
        key, value = queries[i].split("=")
        options = captioner.options(**{key: value if key == "strategy" else int(value)})
        assert response.json["captions"][0]["text"] == one_by_one(captioner, PHOTOS[i], options)[0], i
    assert max(r.json["batch_size"] for r in answers) > 1  # some requests really shared a batch


@pytest.mark.parametrize("batching", [True, False])
def test_decoder_error_is_a_json_500(
    varied_dir: Path, batching: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app({"model": str(varied_dir), "load_in_background": False, "runtime": "torch",
                      "batching": batching})
    engine = app.extensions[ENGINE_KEY]
    try:
        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("decoder exploded")

        monkeypatch.setattr(engine.captioner, "caption_tensors", broken)
        client = app.test_client()
        response = client.post("/v1/captions", data=PHOTOS[0], content_type="image/png")
        assert response.status_code == 500
        assert response.json == {"error": {"code": "internal_error",
                                           "message": "internal server error; see the server log"}}
        assert "decoder exploded" not in response.get_data(as_text=True)  # no internals leak to the client
        response = client.post("/v1/captions:batch", data={"image": [(io.BytesIO(PHOTOS[1]), "b.png")]})
        assert response.status_code == 500 and response.json["error"]["code"] == "internal_error"
        monkeypatch.undo()
        assert client.post("/v1/captions", data=PHOTOS[0], content_type="image/png").status_code == 200
    finally:
        engine.close()


def test_exif_rotated_upload_is_captioned_upright(app: Flask, captioner: Captioner) -> None:
    """Orientation 6 (a camera held sideways): the stored pixels are turned 90 degrees clockwise before captioning.
    PNG (which carries EXIF too) keeps the pixels exact, so the caption must equal the upright image's."""
    upright = Image.open(io.BytesIO(photo(3))).convert("RGB").resize((64, 96))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # turned a quarter anticlockwise, as the sensor saw it
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    client = app.test_client()

    def caption(image: Image.Image, **save: object) -> dict:
        out = io.BytesIO()
        image.save(out, "PNG", **save)
        return client.post("/v1/captions?strategy=greedy", data=out.getvalue(), content_type="image/png").json

    rotated, sideways, plain = caption(stored, exif=exif.tobytes()), caption(stored), caption(upright)
    assert rotated["image"] == {"format": "PNG", "width": 64, "height": 96}  # the upright size
    assert sideways["image"] == {"format": "PNG", "width": 96, "height": 64}
    assert rotated["captions"] == plain["captions"]
    assert sideways["captions"][0]["text"] != plain["captions"][0]["text"]  # the rotation matters to this model
