"""Small pieces of the preprocessing path, pinned exactly: the config's JSON, magic numbers, the pixels shorthand."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from captioner.errors import ImageTooLargeError
from captioner.preprocess import PreprocessConfig, known_signature, load_image, preprocess


def test_config_json_is_plain_and_round_trips() -> None:
    config = PreprocessConfig(size=240, resize="crop", interpolation="bicubic", mean=(0.5, 0.5, 0.5))
    data = config.to_json()
    assert data == {"size": 240, "resize": "crop", "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
                    "std": [0.229, 0.224, 0.225]}
    assert type(data["mean"]) is list and type(data["std"]) is list  # JSON arrays, not tuples
    assert PreprocessConfig.from_json(data) == config


@pytest.mark.parametrize(
    ("head", "name"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00", "PNG"),
        (b"\xff\xd8\xff\xe0", "JPEG"),
        (b"GIF87a..", "GIF"),
        (b"GIF89a..", "GIF"),
        (b"II*\x00....", "TIFF"),
        (b"MM\x00*....", "TIFF"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "WebP"),
        (b"RIFF\x10\x00\x00\x00AVI LIST", None),  # RIFF, but a video
        (b"RIFX\x10\x00\x00\x00WEBPVP8 ", None),  # WEBP at the right place, but not a RIFF file
        (b"riff\x10\x00\x00\x00WEBPVP8 ", None),
        (b"\x89PNG", None),  # too short to be sure
        (b"<html>", None),
        (b"", None),
    ],
)
def test_known_signature(head: bytes, name: str | None) -> None:
    assert known_signature(head) == name


def test_load_image_uses_the_given_config() -> None:
    out = io.BytesIO()
    Image.new("RGB", (1000, 750), (9, 99, 199)).save(out, "JPEG")
    data = out.getvalue()
    assert load_image(data).size == (500, 375)  # the default 224: drafted at 1/2
    assert load_image(data, PreprocessConfig(size=400)).size == (1000, 750)  # 1/2 would be under 400


def test_every_shorthand_passes_the_pixel_limit_on() -> None:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 99, 199)).save(out, "PNG")
    data = out.getvalue()
    assert preprocess(data, PreprocessConfig(size=16), max_pixels=1200).shape == (3, 16, 16)  # exactly at the limit
    for read in (preprocess, load_image):
        with pytest.raises(ImageTooLargeError, match="40x30 = 1200 pixels, over the limit of 1199"):
            read(data, PreprocessConfig(size=16), max_pixels=1199)
