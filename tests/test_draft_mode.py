"""JPEG draft mode, pinned: the exact size each photo size is decoded at, for the model input sizes in use.

Draft mode decodes a JPEG at 1/2, 1/4 or 1/8 scale, and ``read_image`` must pick the smallest scale that still
covers ``config.size`` on both sides. Asking for less (half the size, say) decodes a 1000x750 photo at 250x188 and
upscales it, which changes captions; asking for more wastes time. A 4000x3000 photo alone cannot tell (1/8 is the
limit either way), so several sizes are pinned here.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from captioner.preprocess import EXIF_ORIENTATION, PreprocessConfig, prepare_image, read_image

GOLDEN_PHOTOS = Path(__file__).parent / "data" / "golden"


def photo_jpeg(width: int, height: int, mode: str = "RGB", exif: bytes | None = None) -> bytes:
    """A JPEG of a two-colour picture (so it is not a flat file the encoder could shortcut)."""
    image = Image.new(mode, (width, height), (20, 90, 200) if mode == "RGB" else 90)
    image.paste((220, 40, 30) if mode == "RGB" else 220, (0, 0, width // 2, height // 2))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85, **({"exif": exif} if exif else {}))
    return out.getvalue()


# (source width, height, model input size) -> decoded width, height: the smallest DCT scale (1, 1/2, 1/4, 1/8)
# whose result is at least `size` on both sides.
DRAFT_SIZES = [
    (640, 480, 224, (320, 240)),  # 1/2 (1/4 would be 160x120)
    (1000, 750, 224, (500, 375)),  # 1/2 (1/4 would be 250x188: too small)
    (2000, 1500, 224, (500, 375)),  # 1/4
    (4000, 3000, 224, (500, 375)),  # 1/8, the smallest draft JPEG has
    (3000, 2000, 224, (375, 250)),  # 1/8
    (750, 1000, 224, (375, 500)),  # portrait: the same rule on the other side
    (448, 448, 224, (224, 224)),  # exactly twice the size: 1/2 is just enough
    (447, 447, 224, (447, 447)),  # just under: full size
    (900, 900, 224, (225, 225)),  # 1/4, rounded up
    (640, 480, 299, (640, 480)),  # a larger model input: 1/2 would be 320x240 < 299
    (3000, 2000, 299, (750, 500)),  # 1/4 (1/8 would be 375x250 < 299)
    (900, 900, 299, (450, 450)),
]


@pytest.mark.parametrize(("width", "height", "size", "decoded"), DRAFT_SIZES)
def test_jpeg_draft_size(width: int, height: int, size: int, decoded: tuple[int, int]) -> None:
    config = PreprocessConfig(size=size)
    image = read_image(photo_jpeg(width, height), config)
    assert image.image.size == decoded
    assert (image.width, image.height) == (width, height)  # the reported size is the source's
    assert image.image.mode == "RGB"
    prepared = prepare_image(photo_jpeg(width, height), config)
    assert prepared.tensor.shape == (3, size, size)


def test_grayscale_jpeg_is_drafted_too() -> None:
    image = read_image(photo_jpeg(1000, 750, mode="L"), PreprocessConfig(size=224))
    assert image.image.size == (500, 375) and image.image.mode == "RGB"


def test_cmyk_jpeg_is_drafted_too() -> None:
    out = io.BytesIO()
    Image.new("CMYK", (1000, 750), (10, 20, 30, 40)).save(out, "JPEG")
    image = read_image(out.getvalue(), PreprocessConfig(size=224))
    assert image.image.size == (500, 375) and image.image.mode == "RGB"


def test_rotated_jpeg_is_drafted_then_turned_upright() -> None:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    image = read_image(photo_jpeg(1000, 750, exif=exif.tobytes()), PreprocessConfig(size=224))
    assert image.image.size == (375, 500)  # drafted at 1/2, then turned
    assert (image.width, image.height) == (750, 1000)


def test_png_is_never_drafted() -> None:
    out = io.BytesIO()
    Image.new("RGB", (1000, 750), (1, 2, 3)).save(out, "PNG")
    assert read_image(out.getvalue(), PreprocessConfig(size=224)).image.size == (1000, 750)


# The golden photos of tests/test_decoder_pinning.py, as their pinned captions were made: astronaut (512x512) at 1/2,
# the others at full size (1/2 would be under 224 on one side). A half-size draft would shrink every one of them.
GOLDEN_DECODED = {
    "astronaut.jpg": (256, 256),
    "chelsea.jpg": (451, 300),
    "coffee.jpg": (600, 400),
    "rocket.jpg": (640, 427),
}


@pytest.mark.parametrize(("name", "decoded"), GOLDEN_DECODED.items())
def test_golden_photos_decoded_sizes(name: str, decoded: tuple[int, int]) -> None:
    assert read_image(GOLDEN_PHOTOS / name, PreprocessConfig(size=224)).image.size == decoded
