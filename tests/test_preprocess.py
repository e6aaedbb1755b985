"""Preprocessing of odd images, all generated here: orientation, modes, bit depths, bad or huge input, draft mode."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from captioner.errors import CorruptImageError, ImageError, ImageTooLargeError, NotAnImageError
from captioner.preprocess import (
    PreprocessConfig,
    drafts_jpeg,
    known_signature,
    load_image,
    open_image,
    prepare_image,
    preprocess,
    read_image,
    to_tensor,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
SMALL = PreprocessConfig(size=32)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def pixel(image: Image.Image, xy: tuple[int, int]) -> np.ndarray:
    return np.asarray(image, dtype=np.int32)[xy[1], xy[0]]


def assert_colour(image: Image.Image, xy: tuple[int, int], rgb: tuple[int, int, int], tolerance: int = 12) -> None:
    assert np.abs(pixel(image, xy) - np.array(rgb)).max() <= tolerance, (xy, pixel(image, xy), rgb)


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random pixels: they compress badly, so a truncated file loses real image data."""
    channels = {"RGB": 3, "L": 1}[mode]
    array = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array.squeeze(2) if channels == 1 else array)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width`` x ``height`` RGB, then an empty IDAT: no real pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_exif_orientation_6_is_rotated_upright() -> None:
    """Orientation 6: the stored pixels must be turned 90 degrees clockwise to display upright."""
    stored = Image.new("RGB", (64, 32), BLUE)
    stored.paste(RED, (0, 0, 32, 16))  # stored top-left quadrant
    exif = Image.Exif()
    exif[0x0112] = 6
    image = load_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert image.mode == "RGB"
    assert image.size == (32, 64)  # width and height swapped
    assert_colour(image, (24, 8), RED)  # stored top-left is now top-right
    assert_colour(image, (8, 8), BLUE)
    assert_colour(image, (24, 56), BLUE)


def test_no_exif_is_left_alone() -> None:
    stored = Image.new("RGB", (64, 32), BLUE)
    stored.paste(RED, (0, 0, 32, 16))
    image = load_image(encode(stored, "JPEG", quality=95))
    assert image.size == (64, 32)
    assert_colour(image, (8, 8), RED)


def test_rgba_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (255, 0, 0, 128)])  # transparent, opaque, half-transparent red
    image = load_image(encode(rgba, "PNG"))
    assert image.mode == "RGB"
    assert_colour(image, (0, 0), WHITE, tolerance=0)
    assert_colour(image, (1, 0), RED, tolerance=0)
    assert_colour(image, (2, 0), (255, 127, 127), tolerance=1)


def test_la_is_composited_on_white() -> None:
    la = Image.new("LA", (3, 1))
    la.putdata([(0, 0), (0, 255), (100, 255)])
    image = load_image(encode(la, "PNG"))
    assert image.mode == "RGB"
    assert [tuple(pixel(image, (x, 0))) for x in range(3)] == [WHITE, (0, 0, 0), (100, 100, 100)]


def test_palette_with_transparency_is_composited_on_white() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
    palette.putdata([0, 1])
    data = encode(palette, "PNG", transparency=0)  # index 0 is transparent (it is black in the palette)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    image = load_image(data)
    assert [tuple(pixel(image, (x, 0))) for x in range(2)] == [WHITE, RED]


def test_palette_gif_with_transparency() -> None:
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, *GREEN] + [0, 0, 0] * 254)
    palette.putdata([0, 1])
    image = load_image(encode(palette, "GIF", transparency=0))
    assert [tuple(pixel(image, (x, 0))) for x in range(2)] == [WHITE, GREEN]


def test_cmyk_jpeg() -> None:
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red in CMYK
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = load_image(data)
    assert image.mode == "RGB"
    assert_colour(image, (16, 16), RED, tolerance=16)


def test_16_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = load_image(data)
    assert image.mode == "RGB"
    levels = [int(pixel(image, (x, 0))[0]) for x in range(4)]
    assert np.abs(np.array(levels) - np.array([0, 4, 128, 255])).max() <= 1  # value / 257, not min(value, 255)
    assert all(len(set(pixel(image, (x, 0)))) == 1 for x in range(4))  # grey


def test_dark_16_bit_png_stays_dark() -> None:
    """A 16-bit image whose values all happen to be <= 255 is still 16-bit: nearly black, not full brightness."""
    values = np.array([[0, 128, 255]], dtype=np.uint16)
    image = load_image(encode(Image.fromarray(values), "PNG"))
    assert [int(pixel(image, (x, 0))[0]) for x in range(3)] == [0, 0, 0]


def test_mode_1_and_l() -> None:
    bilevel = Image.new("1", (2, 1))
    bilevel.putdata([0, 1])
    assert [tuple(pixel(load_image(encode(bilevel, "PNG")), (x, 0))) for x in range(2)] == [(0, 0, 0), WHITE]
    grey = load_image(encode(Image.new("L", (4, 4), 100), "PNG"))
    assert grey.mode == "RGB"
    assert tuple(pixel(grey, (1, 1))) == (100, 100, 100)


def test_one_by_one_pixel() -> None:
    image = load_image(encode(Image.new("RGB", (1, 1), RED), "PNG"))
    assert image.size == (1, 1)
    tensor = preprocess(encode(Image.new("RGB", (1, 1), RED), "PNG"), SMALL)
    assert tensor.shape == (3, 32, 32)
    assert torch.allclose(tensor, tensor[:, :1, :1].expand(3, 32, 32))  # a uniform image


def test_huge_dimensions_are_refused_from_the_header() -> None:
    """A PNG claiming 100000x100000 has no pixel data: refusing it proves the size check precedes any decoding."""
    data = png_header_only(100_000, 100_000)
    assert Image.open(io.BytesIO(data)).size == (100_000, 100_000)
    with pytest.raises(ImageTooLargeError, match="100000x100000"):
        load_image(data)
    with pytest.raises(ImageTooLargeError):
        preprocess(data)


@pytest.mark.parametrize("as_pil", [False, True])
def test_max_pixels_limit(as_pil: bool) -> None:
    data = encode(Image.new("RGB", (100, 60), RED), "PNG")
    source = Image.open(io.BytesIO(data)) if as_pil else data
    with pytest.raises(ImageTooLargeError, match="over the limit of 5999"):
        load_image(source, max_pixels=5999)
    assert load_image(data, max_pixels=6000).size == (100, 60)


@pytest.mark.parametrize("data", [b"", b"hello, this is a caption, not an image\n", b"\x00" * 100, b"GIF8"])
def test_not_an_image(data: bytes, tmp_path: Path) -> None:
    with pytest.raises(NotAnImageError):
        load_image(data)
    path = tmp_path / "file.jpg"
    path.write_bytes(data)
    with pytest.raises(NotAnImageError):
        load_image(path)


@pytest.mark.parametrize(("data", "error", "message"), [
    (b"", NotAnImageError, "^not_an_image: empty file: zero bytes$"),
    (b"x", NotAnImageError, "^not_an_image: not an image, or an image format Pillow cannot read$"),  # not empty
    (b"hello, this is a caption\n", NotAnImageError, "^not_an_image: not an image, or an image format Pillow"),
    (b"\x89PNG\r\n\x1a\n" + bytes(8), CorruptImageError, "^corrupt_image: PNG data is truncated or corrupt$"),
])
def test_bad_input_error_names_the_problem(data: bytes, error: type, message: str, tmp_path: Path) -> None:
    with pytest.raises(error, match=message):
        load_image(data)
    path = tmp_path / "file.jpg"
    path.write_bytes(data)
    with pytest.raises(error, match=message.replace("zero bytes", re.escape(str(path)))):
        load_image(path)


def test_unreadable_header_error_names_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_open(fp: object) -> Image.Image:
        raise SyntaxError("broken PNG file")

    monkeypatch.setattr(Image, "open", broken_open)
    with pytest.raises(CorruptImageError, match="^corrupt_image: cannot read image header: broken PNG file$"):
        load_image(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize("size", [(0, 5), (5, 0), (0, 0)])
def test_empty_image_is_corrupt(size: tuple[int, int]) -> None:
    with pytest.raises(CorruptImageError, match=f"^corrupt_image: image has an empty size {size[0]}x{size[1]}$"):
        load_image(Image.new("RGB", size))


def test_truncated_and_undecodable_data_errors_name_the_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(noise(64, 64), "PNG")
    with pytest.raises(CorruptImageError, match="^corrupt_image: image data is truncated or corrupt: .+"):
        load_image(data[: len(data) // 2])

    def decoder_bug(image: Image.Image) -> Image.Image:
        raise IndexError("list index out of range")

    monkeypatch.setattr(ImageOps, "exif_transpose", decoder_bug)
    message = "^corrupt_image: image data cannot be decoded: IndexError: list index out of range$"
    with pytest.raises(CorruptImageError, match=message):
        load_image(data)


@pytest.mark.parametrize(("fields", "message"), [
    ({"size": 15}, "^image size 15 is too small$"),
    ({"resize": "stretch"}, "^unknown resize mode 'stretch' \\(expected 'squash' or 'crop'\\)$"),
    ({"interpolation": "cubic"}, "^unknown interpolation 'cubic' \\(expected one of \\["),
])
def test_preprocess_config_errors_name_the_field(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**fields)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.jpg")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image_is_corrupt(fmt: str, tmp_path: Path) -> None:
    data = encode(noise(64, 64), fmt)
    truncated = data[: len(data) // 2]
    with pytest.raises(CorruptImageError):
        load_image(truncated)
    (tmp_path / "cut").write_bytes(truncated)
    with pytest.raises(CorruptImageError):
        preprocess(tmp_path / "cut")
    assert issubclass(CorruptImageError, ImageError) and issubclass(CorruptImageError, ValueError)


def test_damaged_png_data_is_corrupt() -> None:
    data = bytearray(encode(noise(32, 32), "PNG"))
    data[60:80] = bytes(20)  # zero bytes inside the compressed IDAT stream
    with pytest.raises(CorruptImageError):
        load_image(bytes(data))


def test_animated_gif_gives_the_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, BLUE, GREEN)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    opened = Image.open(io.BytesIO(data))
    assert opened.n_frames == 3
    assert tuple(pixel(load_image(data), (4, 4))) == RED
    opened.seek(2)  # a PIL image left on a later frame still gives the first
    assert tuple(pixel(load_image(opened), (4, 4))) == RED


def test_large_jpeg_is_decoded_in_draft_mode() -> None:
    photo = Image.new("RGB", (4000, 3000), BLUE)
    photo.paste(RED, (0, 0, 2000, 1500))
    data = encode(photo, "JPEG", quality=80)
    config = PreprocessConfig(size=224)
    image = load_image(data, config)
    width, height = image.size
    assert width < 4000 and height < 3000
    assert min(width, height) >= config.size
    assert width * 3 == height * 4  # aspect ratio kept
    assert_colour(image, (width // 4, height // 4), RED)
    assert_colour(image, (3 * width // 4, 3 * height // 4), BLUE)
    assert preprocess(data, config).shape == (3, 224, 224)


def test_bytes_path_and_pil_sources_give_the_same_tensor(tmp_path: Path) -> None:
    for fmt, name in (("JPEG", "photo.jpg"), ("PNG", "photo.png")):
        data = encode(noise(300, 250), fmt)
        path = tmp_path / name
        path.write_bytes(data)
        expected = preprocess(data, SMALL)
        for source in (
            bytearray(data),
            memoryview(data),
            path,
            str(path),
            Image.open(path),
            Image.open(io.BytesIO(data)),
        ):
            assert torch.equal(preprocess(source, SMALL), expected), (fmt, type(source))


def test_output_shape_dtype_and_normalisation() -> None:
    config = PreprocessConfig(size=48)
    tensor = preprocess(encode(Image.new("RGB", (100, 70), WHITE), "PNG"), config)
    assert tensor.shape == (3, 48, 48)
    assert tensor.dtype == torch.float32
    expected = (1.0 - torch.tensor(config.mean)) / torch.tensor(config.std)
    assert torch.allclose(tensor, expected.view(3, 1, 1).expand(3, 48, 48))
    black = preprocess(encode(Image.new("RGB", (10, 10)), "PNG"), config)
    assert torch.allclose(black[:, 0, 0], -torch.tensor(config.mean) / torch.tensor(config.std))


def unnormalise(tensor: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    return tensor * torch.tensor(config.std).view(3, 1, 1) + torch.tensor(config.mean).view(3, 1, 1)


@pytest.mark.parametrize("orientation", ["landscape", "portrait"])
def test_crop_mode_keeps_the_centre(orientation: str) -> None:
    """A 192x64 image: centre 96 columns green, red bands at both ends; crop keeps only green, squash keeps red."""
    image = Image.new("RGB", (192, 64), RED)
    image.paste(GREEN, (48, 0, 144, 64))
    if orientation == "portrait":
        image = image.transpose(Image.Transpose.ROTATE_90)
    crop = PreprocessConfig(size=32, resize="crop")
    pixels = unnormalise(to_tensor(image, crop), crop)
    assert pixels.shape == (3, 32, 32)
    assert torch.allclose(pixels, torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1).expand(3, 32, 32), atol=1e-5)
    squash = PreprocessConfig(size=32, resize="squash")
    squashed = unnormalise(to_tensor(image, squash), squash)
    corner, centre = squashed[:, 0, 0], squashed[:, 16, 16]
    assert torch.allclose(corner, torch.tensor([1.0, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(centre, torch.tensor([0.0, 1.0, 0.0]), atol=1e-5)


def test_crop_mode_of_a_small_image_upscales() -> None:
    image = Image.new("RGB", (20, 10), BLUE)
    config = PreprocessConfig(size=32, resize="crop", interpolation="bicubic")
    assert to_tensor(image, config).shape == (3, 32, 32)


@pytest.mark.parametrize(
    "params", [{"resize": "stretch"}, {"interpolation": "nearest"}, {"size": 8}], ids=["resize", "interp", "size"]
)
def test_invalid_config(params: dict) -> None:
    with pytest.raises(ValueError):
        PreprocessConfig(**params)


def test_config_json_round_trip() -> None:
    config = PreprocessConfig(
        size=96, resize="crop", interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.2, 0.3, 0.4)
    )
    assert PreprocessConfig.from_json(config.to_json()) == config
    assert config.to_json()["mean"] == [0.5, 0.5, 0.5]


def test_open_image_is_lazy() -> None:
    image = open_image(encode(noise(64, 64), "PNG"))
    assert image.size == (64, 64)
    assert image.tile  # header only: Pillow clears the tile list once the pixels are decoded


def test_prepare_image_reports_format_and_upright_size(tmp_path: Path) -> None:
    """What the service reports comes from the library's one image path: the format judged from the bytes and
    the upright size (EXIF orientations 5-8 swap width and height), whatever the decoded (draft) size."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(noise(640, 320), "JPEG", exif=exif.tobytes())
    prepared = prepare_image(data, SMALL)
    assert (prepared.format, prepared.width, prepared.height) == ("JPEG", 320, 640)
    assert torch.equal(prepared.tensor, preprocess(data, SMALL)) and prepared.tensor.shape == (3, 32, 32)
    decoded = read_image(data, SMALL)
    assert decoded.image.size[0] < decoded.image.size[1] < 640  # upright, decoded at a reduced draft size
    (tmp_path / "photo.bin").write_bytes(encode(noise(30, 20), "PNG"))
    assert (read_image(tmp_path / "photo.bin").format, read_image(Image.new("RGB", (3, 2))).format) == ("PNG", None)


@pytest.mark.parametrize("signature", [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"II*\x00"])
def test_a_known_signature_that_pillow_cannot_open_is_corrupt_not_a_non_image(signature: bytes, tmp_path: Path) -> None:
    data = signature + b"\x00" * 8
    with pytest.raises(CorruptImageError, match="corrupt_image: .* data is truncated or corrupt"):
        read_image(data)
    (tmp_path / "x").write_bytes(data)
    with pytest.raises(CorruptImageError):
        read_image(tmp_path / "x")
    with pytest.raises(NotAnImageError, match="^not_an_image: "):
        read_image(b"<html>" + data)


# -- small pieces, pinned exactly (tests/test_draft_mode.py and test_exif_orientation.py pin draft and EXIF) ----


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
    for read in (preprocess, load_image, prepare_image):
        with pytest.raises(ImageTooLargeError, match="40x30 = 1200 pixels, over the limit of 1199"):
            read(data, PreprocessConfig(size=16), max_pixels=1199)


def test_prepare_image_reads_with_the_given_config() -> None:
    out = io.BytesIO()
    noise(1000, 750).save(out, "JPEG")
    config = PreprocessConfig(size=400)  # 1/2 draft would be under 400: read at full size
    expected = to_tensor(read_image(out.getvalue(), config).image, config)
    assert torch.equal(prepare_image(out.getvalue(), config).tensor, expected)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize(("width", "height"), [(64, 48), (65, 48), (48, 71), (40, 40)])
def test_to_tensor_is_exactly_resize_crop_and_normalise(interpolation: str, width: int, height: int) -> None:
    """The encoder input, stated step by step: the named filter, the centre crop's integer offsets, / 255, mean/std."""
    filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
    image = noise(width, height, seed=width + height)
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    for resize in ("squash", "crop"):
        config = PreprocessConfig(size=32, resize=resize, interpolation=interpolation, mean=tuple(mean),
                                  std=tuple(std))
        if resize == "squash":
            resized = image.resize((32, 32), filters[interpolation])
        else:
            short = min(width, height)
            new = (max(32, round(width * 32 / short)), max(32, round(height * 32 / short)))
            left, top = (new[0] - 32) // 2, (new[1] - 32) // 2
            resized = image.resize(new, filters[interpolation]).crop((left, top, left + 32, top + 32))
        expected = (np.asarray(resized, dtype=np.float64) / 255.0 - mean) / std
        got = to_tensor(image, config).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=f"{resize} {interpolation} {width}x{height}")


@pytest.mark.parametrize(("mode", "values", "expected"), [
    ("I;16", [0, 257, 25700, 65535], [0, 1, 100, 255]),  # 16-bit: always scaled by 1/257
    ("I;16", [0, 100, 200, 255], [0, 0, 0, 0]),  # even a dark 16-bit image (all values <= 255), truncated
    ("I;16B", [0, 257, 25700, 65535], [0, 1, 100, 255]),  # every 16-bit byte order (Pillow alone would clip)
    ("I;16L", [0, 257, 25700, 65535], [0, 1, 100, 255]),
    ("I;16N", [0, 257, 25700, 65535], [0, 1, 100, 255]),
    ("I", [0, 257, 25700, 65535], [0, 1, 100, 255]),  # 32-bit with 16-bit values: scaled
    ("I", [0, 100, 200, 255], [0, 100, 200, 255]),  # 32-bit with 8-bit values: kept
    ("I", [0, 100, 200, 256], [0, 0, 0, 0]),  # one value over 255: the 16-bit range, scaled
    ("I", [-5, 0, 100, 255], [0, 0, 100, 255]),  # negative: clipped to 0 (not wrapped around)
    ("I", [0, 257, 65535, 70000], [0, 1, 255, 255]),  # over 16 bits: clipped to 255 (not wrapped around)
    ("F", [-5.0, 0.0, 127.0, 300.0], [0, 0, 127, 255]),  # clipped to 0..255
])
def test_high_bit_depth_gray_becomes_8_bit_gray_rgb(mode: str, values: list[float], expected: list[int]) -> None:
    from captioner.preprocess import _to_rgb

    image = Image.new(mode, (4, 1))
    image.putdata(values)
    rgb = _to_rgb(image)
    assert rgb.mode == "RGB"
    assert [pixel[0] for pixel in rgb.getdata()] == expected
    assert all(r == g == b for r, g, b in rgb.getdata())


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_image_becomes_its_colours(transparent: bool) -> None:
    from captioner.preprocess import _to_rgb

    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.putdata([0, 1])
    if transparent:
        image.info["transparency"] = 0  # palette entry 0 (red) is transparent: white after compositing
    assert list(_to_rgb(image).getdata()) == [(255, 255, 255) if transparent else (255, 0, 0), (0, 0, 255)]


@pytest.mark.parametrize("mode", ["LA", "RGBa", "PA"])
def test_every_mode_with_alpha_is_composited_on_white(mode: str) -> None:
    from captioner.preprocess import _to_rgb

    rgba = Image.new("RGBA", (2, 1))
    rgba.putdata([(0, 0, 0, 0), (0, 0, 0, 255)])  # transparent black, opaque black
    image = rgba.convert(mode)
    assert image.mode == mode
    assert list(_to_rgb(image).getdata()) == [(255, 255, 255), (0, 0, 0)]


@pytest.mark.parametrize(("fmt", "mode", "drafted"), [
    ("JPEG", "RGB", True), ("JPEG", "L", True), ("JPEG", "CMYK", True),
    ("PNG", "RGB", False), ("PNG", "L", False), ("TIFF", "CMYK", False),
])  # fmt: skip
def test_only_jpeg_files_are_decoded_in_draft_mode(fmt: str, mode: str, drafted: bool) -> None:
    """drafts_jpeg: JPEG files in the modes libjpeg can draft, nothing else (the service's memory estimate reads
    it too, so a large PNG must not be costed as a draft)."""
    data = io.BytesIO()
    Image.new(mode, (40, 30)).save(data, fmt)
    with Image.open(data) as image:
        assert drafts_jpeg(image) is drafted
