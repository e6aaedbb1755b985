"""The one preprocessing path: any image source -> upright RGB image -> normalised tensor.

Two steps, one function each: :func:`read_image` reads any source (format check, damaged vs not an image, size
limit, EXIF rotation, JPEG draft mode) and :func:`to_tensor` makes the encoder's input. :func:`prepare_image` is
both, with the format and upright size the service reports; :func:`preprocess` (the tensor alone) and
:func:`load_image` (the pixels alone) are its shorthands. The Python API, the batch command, the service and
training all come through here with the :class:`PreprocessConfig` stored in the model, so a caption never depends
on which door an image came in by, and a damaged file is the same error at every door.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from captioner.errors import CorruptImageError, ImageTooLargeError, NotAnImageError

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Image.Image

# A decoded image bigger than this is refused before its pixels are allocated (decompression bombs).
DEFAULT_MAX_PIXELS = 50_000_000

# We check sizes ourselves (with a clear error), so Pillow's own bomb check must not fire first with a warning.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class PreprocessConfig:
    """How pixels become the encoder's input; saved in every checkpoint.

    ``resize="squash"`` resizes to ``size`` x ``size`` without keeping the aspect ratio (how Flickr8k's 224x224
    copies were made, so inference sees what training saw); ``"crop"`` resizes the shorter side and centre-crops.
    """

    size: int = 224
    resize: str = "squash"
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __post_init__(self) -> None:
        if self.resize not in ("squash", "crop"):
            raise ValueError(f"unknown resize mode {self.resize!r} (expected 'squash' or 'crop')")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {self.interpolation!r} (expected one of {sorted(_RESAMPLE)})")
        if self.size < 16:
            raise ValueError(f"image size {self.size} is too small")

    def to_json(self) -> dict:
        """A JSON-serialisable dict of the parameters."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_json(cls, data: dict) -> PreprocessConfig:
        """Inverse of :meth:`to_json`."""
        return cls(
            size=int(data["size"]),
            resize=str(data["resize"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(float(x) for x in data["mean"]),
            std=tuple(float(x) for x in data["std"]),
        )


# Unambiguous magic numbers of formats Pillow reads: bytes starting with one are a damaged image, not a non-image.
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
EXIF_ORIENTATION = 0x0112


def known_signature(data: bytes) -> str | None:
    """The image format ``data`` (a file's first bytes) declares by its magic number, if any (WebP: RIFF....WEBP)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in SIGNATURES if data.startswith(magic)), None)


def open_image(source: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image lazily (header only) and check its size, raising a library error for bad input."""
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise NotAnImageError("empty file: zero bytes")
            fp: io.BytesIO | str | os.PathLike = io.BytesIO(bytes(source))
        else:
            fp = source
            if not Path(fp).is_file():
                raise FileNotFoundError(f"no such image file: {fp}")
            if Path(fp).stat().st_size == 0:
                raise NotAnImageError(f"empty file: {fp}")
        try:
            image = Image.open(fp)
        except UnidentifiedImageError as exc:
            signature = _signature_of(fp)
            if signature:  # Pillow gave up, but the bytes say which format it is: a damaged file, not a non-image
                raise CorruptImageError(f"{signature} data is truncated or corrupt") from exc
            raise NotAnImageError("not an image, or an image format Pillow cannot read") from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise CorruptImageError(f"cannot read image header: {exc}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise CorruptImageError(f"image has an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        # Palette images may carry transparency in their info; RGBA keeps it for the composite below.
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # ("F" Pillow clips and truncates the same way)
        array = np.asarray(image, dtype=np.float64)
        # 16-bit range -> 8-bit range: always for I;16 (even a dark image whose values are all <= 255), by value for I
        if image.mode.startswith("I;16") or (image.mode == "I" and array.max(initial=0) > 255):
            array = array / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):  # (no file opens as "La", which Pillow cannot convert)
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _signature_of(fp: io.BytesIO | str | os.PathLike) -> str | None:
    """:func:`known_signature` of an opened source's first bytes."""
    if isinstance(fp, io.BytesIO):
        return known_signature(fp.getvalue()[:16])
    with open(fp, "rb") as file:
        return known_signature(file.read(16))


@dataclass(frozen=True)
class DecodedImage:
    """An image read by :func:`read_image`."""

    image: Image.Image  # upright 8-bit RGB; JPEGs may be decoded smaller than width x height (draft mode)
    format: str | None  # as judged from the bytes ("JPEG", "PNG", ...); None for a PIL image made in memory
    width: int  # the source's upright size (after EXIF rotation), not the decoded size
    height: int


def drafts_jpeg(image: Image.Image) -> bool:
    """Whether :func:`read_image` decodes ``image`` in JPEG draft mode (at a reduced DCT scale): JPEGs in the modes
    Pillow opens them in (RGB, L, CMYK)."""
    return image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK")


def read_image(
    source: ImageSource, config: PreprocessConfig | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> DecodedImage:
    """Read any image source (a path, bytes or a PIL image): the one image reader of every door.

    Bad input raises the library's errors: :class:`NotAnImageError` (zero bytes, text, HTML, formats Pillow cannot
    read), :class:`CorruptImageError` (truncated or damaged data, including bytes with an image format's magic
    number that Pillow cannot open), :class:`ImageTooLargeError` (over ``max_pixels``, checked from the header
    before decoding); a missing path raises ``FileNotFoundError``. JPEGs are decoded in draft mode at the smallest
    DCT scale that still covers ``config.size``: a 12-megapixel photo decodes at 1/8 of its pixels, because the
    model only ever sees 224x224 of them.
    """
    config = config or PreprocessConfig()
    image = open_image(source, max_pixels=max_pixels)
    image_format, (width, height) = image.format, image.size
    try:
        if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
            width, height = height, width
        if drafts_jpeg(image):
            image.draft("RGB" if image.mode != "L" else "L", (config.size, config.size))
        if getattr(image, "is_animated", False):
            image.seek(0)  # first frame of an animated GIF/PNG/WebP
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. palette-with-transparency notices
            image.load()
            image = ImageOps.exif_transpose(image)
            rgb = _to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(f"image data is truncated or corrupt: {exc}") from exc
    except Exception as exc:  # a decoder bug on hostile bytes (struct.error, IndexError...) is still bad input
        raise CorruptImageError(f"image data cannot be decoded: {type(exc).__name__}: {exc}") from exc
    return DecodedImage(rgb, image_format, width, height)


def load_image(
    source: ImageSource, config: PreprocessConfig | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """The upright RGB pixels of :func:`read_image` (e.g. for thumbnails)."""
    return read_image(source, config, max_pixels).image


def to_tensor(image: Image.Image, config: PreprocessConfig | None = None) -> torch.Tensor:
    """Resize and normalise an RGB image to a float tensor of shape (3, size, size)."""
    config = config or PreprocessConfig()
    size, resample = config.size, _RESAMPLE[config.interpolation]
    if config.resize == "squash":
        image = image.resize((size, size), resample, reducing_gap=None)
    else:
        width, height = image.size
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new, resample)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(config.mean).view(3, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1)
    return (pixels - mean) / std


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the encoder, with what the service reports about it."""

    tensor: torch.Tensor  # (3, size, size), normalised
    format: str | None  # see DecodedImage
    width: int  # the source's upright size
    height: int


def prepare_image(
    source: ImageSource, config: PreprocessConfig | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> PreparedImage:
    """Any image source to the encoder's input: :func:`read_image` then :func:`to_tensor`."""
    decoded = read_image(source, config, max_pixels)
    return PreparedImage(to_tensor(decoded.image, config), decoded.format, decoded.width, decoded.height)


def preprocess(
    source: ImageSource, config: PreprocessConfig | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """The encoder's input tensor (3, size, size) of :func:`prepare_image`."""
    return prepare_image(source, config, max_pixels).tensor
