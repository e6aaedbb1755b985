"""EXIF orientation, all eight values, pixel-exact and in-process: every door reads images through ``read_image``.

The stored pixels for each orientation are made here with numpy (independently of Pillow's own table), as a camera
would store them, in PNG (which carries EXIF and keeps pixels exact); reading them must give the upright picture.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from captioner.preprocess import EXIF_ORIENTATION, PreprocessConfig, prepare_image, read_image

UPRIGHT = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)  # 20 wide, 12 high, asymmetric

# orientation -> the stored pixels of UPRIGHT (what the reader must undo)
STORED = {
    1: UPRIGHT,
    2: UPRIGHT[:, ::-1],  # mirrored left-right
    3: UPRIGHT[::-1, ::-1],  # upside down
    4: UPRIGHT[::-1, :],  # mirrored top-bottom
    5: UPRIGHT.swapaxes(0, 1),  # transposed
    6: np.rot90(UPRIGHT, 1),  # turned a quarter anticlockwise: display turns it clockwise
    7: UPRIGHT.swapaxes(0, 1)[::-1, ::-1],  # transverse
    8: np.rot90(UPRIGHT, -1),  # turned a quarter clockwise
}


def stored_png(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(STORED[orientation])).save(out, "PNG", exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_reads_upright(orientation: int) -> None:
    decoded = read_image(stored_png(orientation))
    assert np.array_equal(np.asarray(decoded.image), UPRIGHT)
    assert (decoded.width, decoded.height) == (20, 12)  # the upright size is reported


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_the_encoder_input_is_the_upright_images(orientation: int) -> None:
    config = PreprocessConfig(size=16)
    expected = prepare_image(Image.fromarray(UPRIGHT), config).tensor
    assert np.array_equal(prepare_image(stored_png(orientation), config).tensor.numpy(), expected.numpy())
