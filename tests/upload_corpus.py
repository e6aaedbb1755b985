"""A corpus of bad and odd uploads for the HTTP service, generated in code, each with the status it must get.

Used by tests/test_service_gunicorn.py (against a real gunicorn process) and tests/test_service_app.py (in-process).
Every case is a full HTTP request (path, headers, body), built lazily: the big ones cost a little CPU.
"""

from __future__ import annotations

import gzip
import io
import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from PIL import Image

MB = 1024 * 1024


@dataclass(frozen=True)
class Request:
    """An HTTP request to send as is."""

    body: bytes = b""
    content_type: str | None = None
    path: str = "/v1/captions"
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)

    def with_path(self, path: str) -> Request:
        return Request(self.body, self.content_type, path, self.method, self.headers)

    def all_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.content_type is not None:
            headers["Content-Type"] = self.content_type
        return headers


@dataclass(frozen=True)
class Case:
    """One upload, the status it must get and, for errors, the error code."""

    name: str
    description: str
    status: int
    code: str | None
    build: Callable[[], Request]
    check: Callable[[dict], None] | None = None  # extra assertions on a 200 response's JSON


# -- image bytes ---------------------------------------------------------------------------------------------------


def _save(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _photo(width: int = 96, height: int = 64, mode: str = "RGB") -> Image.Image:
    """A small image with some structure (a gradient and a block), so codecs have real data to encode."""
    image = Image.linear_gradient("L").resize((width, height))
    if mode != "L":
        rgb = Image.merge("RGB", (image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), image.rotate(90)))
        rgb.paste((200, 40, 40), (width // 4, height // 4, width // 2, height // 2))
        image = rgb.convert(mode) if mode != "RGB" else rgb
    return image


@cache
def jpeg() -> bytes:
    return _save(_photo(), "JPEG", quality=90)


@cache
def png() -> bytes:
    return _save(_photo(), "PNG")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims ``width`` x ``height`` (CRC fixed): a decompression bomb's header."""
    data = _save(Image.new("L", (1, 1)), "PNG")
    ihdr = data[8 + 8 : 8 + 8 + 13]
    patched = struct.pack(">II", width, height) + ihdr[8:]
    return data[:8] + _png_chunk(b"IHDR", patched) + data[8 + 25 :]


def corrupt_png() -> bytes:
    """A PNG whose compressed pixel data is overwritten with garbage (valid chunk CRCs, so the header parses)."""
    data = png()
    start = data.index(b"IDAT") + 4
    length = struct.unpack(">I", data[start - 8 : start - 4])[0]
    garbage = bytes((i * 37 + 11) % 256 for i in range(length))
    return data[: start - 8] + _png_chunk(b"IDAT", garbage) + data[start + length + 4 :]


def jpeg_with_size(width: int, height: int) -> bytes:
    """A valid JPEG whose SOF0 frame header claims ``width`` x ``height``."""
    data = bytearray(jpeg())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("P", (40, 30), color) for color in (10, 80, 160)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def png16() -> bytes:
    image = Image.new("I;16", (48, 32))
    image.putdata([(x * 1361) % 65536 for x in range(48 * 32)])
    return _save(image, "PNG")


def exif_rotated_jpeg() -> bytes:
    """A 120x80 JPEG with EXIF orientation 6 (rotate 90°): upright it is 80x120."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(_photo(120, 80), "JPEG", exif=exif.tobytes())


def palette_png_with_transparency() -> bytes:
    image = _photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(image, "PNG", transparency=0)


@cache
def big_jpeg() -> bytes:
    """4000x3000 (12 megapixels, under the default limit) with a little detail."""
    image = Image.new("RGB", (4000, 3000), (90, 120, 160))
    image.paste((220, 200, 40), (1000, 800, 2600, 2000))
    return _save(image, "JPEG", quality=80)


def huge_png() -> bytes:
    """A real (fully decodable) 1-bit PNG of 8000x7000 = 56 megapixels, over the 50 megapixel default limit."""
    return _save(Image.new("1", (8000, 7000)), "PNG")


def gzip_bytes() -> bytes:
    return gzip.compress(b"not an image " * 100)


# -- request bodies ------------------------------------------------------------------------------------------------


def multipart(parts: list[Part], boundary: str | None = None) -> Request:
    """A multipart/form-data request from (field name, file name or None for a text field, bytes, content type)."""
    boundary = boundary or uuid.uuid4().hex
    body = io.BytesIO()
    for name, filename, data, content_type in parts:
        body.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        body.write(f"Content-Disposition: {disposition}\r\n".encode())
        if content_type:
            body.write(f"Content-Type: {content_type}\r\n".encode())
        body.write(b"\r\n" + data + b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return Request(body.getvalue(), f"multipart/form-data; boundary={boundary}")


Part = tuple[str, "str | None", bytes, "str | None"]  # field name, file name (None: text field), data, content type


def upload(
    data: bytes, filename: str = "photo.jpg", content_type: str | None = "image/jpeg", query: str = "",
    path: str = "/v1/captions", extra: list[Part] | None = None,
) -> Request:
    """One file in the ``image`` field (plus ``extra`` parts), posted to ``path?query``."""
    request = multipart([("image", filename, data, content_type), *(extra or [])])
    return Request(request.body, request.content_type, f"{path}?{query}" if query else path)


def raw(data: bytes, content_type: str | None, query: str = "") -> Request:
    return Request(data, content_type, f"/v1/captions?{query}" if query else "/v1/captions")


def _size_is(width: int, height: int) -> Callable[[dict], None]:
    def check(body: dict) -> None:
        assert (body["image"]["width"], body["image"]["height"]) == (width, height), body["image"]

    return check


def _n_captions(count: int) -> Callable[[dict], None]:
    def check(body: dict) -> None:
        assert len(body["captions"]) == count, body

    return check


_HTML = b"<!doctype html><html><head><title>x</title></head><body><img src=x onerror=alert(1)></body></html>"
_SVG = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>'

CASES: tuple[Case, ...] = (
    # not an image at all: judged from the bytes -> 415
    Case("zero_bytes", "a zero-byte file named photo.jpg", 415, "not_an_image", lambda: upload(b"")),
    Case("text", "plain text named photo.jpg", 415, "not_an_image", lambda: upload(b"hello, I am not a photo\n")),
    Case("html", "an HTML page sent as image/jpeg", 415, "not_an_image", lambda: upload(_HTML)),
    Case("svg", "an SVG (XML, not a raster format)", 415, "not_an_image",
         lambda: upload(_SVG, "x.svg", "image/svg+xml")),
    Case("pdf", "the start of a PDF named photo.png", 415, "not_an_image",
         lambda: upload(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n", "photo.png", "image/png")),
    Case("gzip", "gzip-compressed text", 415, "not_an_image", lambda: upload(gzip_bytes())),
    Case("random_bytes", "2 KiB of pseudo-random bytes", 415, "not_an_image",
         lambda: upload(bytes((i * 7919 + 13) % 251 for i in range(2048)))),
    # starts like an image, cannot be decoded -> 422
    Case("truncated_jpeg", "the first half of a JPEG", 422, "corrupt_image",
         lambda: upload(jpeg()[: len(jpeg()) // 2])),
    Case("corrupt_png", "a PNG whose IDAT data is garbage", 422, "corrupt_image", lambda: upload(corrupt_png())),
    Case("truncated_png", "a PNG cut in the middle of its pixel data", 422, "corrupt_image",
         lambda: upload(png()[: len(png()) - 40], "x.png", "image/png")),
    Case("png_header_only", "a PNG's first 33 bytes (signature and IHDR)", 422, "corrupt_image",
         lambda: upload(png()[:33], "x.png", "image/png")),
    Case("jpeg_header_only", "a JPEG's first 20 bytes", 422, "corrupt_image", lambda: upload(jpeg()[:20])),
    Case("truncated_gif", "an animated GIF cut in half", 422, "corrupt_image",
         lambda: upload(animated_gif()[: len(animated_gif()) // 2], "a.gif", "image/gif")),
    # too many pixels, refused from the header before decoding -> 413
    Case("png_bomb", "a 68-byte PNG declaring 100000x100000 pixels", 413, "image_too_large",
         lambda: upload(png_with_size(100_000, 100_000), "bomb.png", "image/png")),
    Case("jpeg_bomb", "a small JPEG whose frame header claims 65000x65000", 413, "image_too_large",
         lambda: upload(jpeg_with_size(65_000, 65_000))),
    Case("huge_dimensions", "a real 8000x7000 (56 MP) 1-bit PNG, over the 50 MP limit", 413, "image_too_large",
         lambda: upload(huge_png(), "huge.png", "image/png")),
    # odd but valid images -> 200
    Case("animated_gif", "a 3-frame animated GIF (first frame is captioned)", 200, None,
         lambda: upload(animated_gif(), "anim.gif", "image/gif"), _size_is(40, 30)),
    Case("png_16bit", "a 16-bit grayscale PNG", 200, None, lambda: upload(png16(), "deep.png", "image/png")),
    Case("cmyk_jpeg", "a CMYK JPEG", 200, None, lambda: upload(_save(_photo(mode="CMYK"), "JPEG"))),
    Case("exif_rotated", "a 120x80 JPEG with EXIF orientation 6: captioned upright as 80x120", 200, None,
         lambda: upload(exif_rotated_jpeg()), _size_is(80, 120)),
    Case("one_pixel", "a 1x1 PNG", 200, None, lambda: upload(_save(Image.new("RGB", (1, 1)), "PNG"), "1.png")),
    Case("grayscale_jpeg", "an 8-bit grayscale JPEG", 200, None, lambda: upload(_save(_photo(mode="L"), "JPEG"))),
    Case("rgba_png", "a PNG with an alpha channel", 200, None,
         lambda: upload(_save(_photo(mode="RGBA"), "PNG"), "a.png", "image/png")),
    Case("palette_transparency", "a palette PNG with a transparent colour", 200, None,
         lambda: upload(palette_png_with_transparency(), "p.png", "image/png")),
    Case("webp", "a WebP image", 200, None, lambda: upload(_save(_photo(), "WEBP"), "x.webp", "image/webp")),
    Case("tiff", "a TIFF image", 200, None, lambda: upload(_save(_photo(), "TIFF"), "x.tif", "image/tiff")),
    Case("bmp", "a BMP image", 200, None, lambda: upload(_save(_photo(), "BMP"), "x.bmp", "image/bmp")),
    Case("big_photo", "a 4000x3000 JPEG (12 MP, under the limit)", 200, None, lambda: upload(big_jpeg()),
         _size_is(4000, 3000)),
    Case("png_named_jpg", "PNG bytes named photo.jpg, sent as image/jpeg: the bytes decide", 200, None,
         lambda: upload(png()), lambda body: None if body["image"]["format"] == "PNG" else _fail(body)),
    # request shape
    Case("wrong_field_name", "the file in field 'file' instead of 'image'", 400, "missing_image",
         lambda: multipart([("file", "photo.jpg", jpeg(), "image/jpeg")])),
    Case("two_files", "two 'image' files on the one-image route", 400, "too_many_images",
         lambda: upload(jpeg(), extra=[("image", "second.jpg", jpeg(), "image/jpeg")])),
    Case("image_as_text_field", "'image' sent as a text field, not a file", 400, "missing_image",
         lambda: multipart([("image", None, b"photo.jpg", None)])),
    Case("no_file_chosen", "a browser form with no file chosen (empty part, empty file name)", 400, "missing_image",
         lambda: multipart([("image", "", b"", "application/octet-stream")])),
    Case("multipart_without_boundary", "Content-Type multipart/form-data with no boundary", 400, "missing_image",
         lambda: Request(b"--x\r\n\r\n--x--\r\n", "multipart/form-data")),
    Case("oversize_body", "an 11 MB upload (limit 10 MB)", 413, "payload_too_large",
         lambda: upload(b"\xff\xd8\xff" + bytes(11 * MB))),
    Case("no_body", "POST with no body and no Content-Type", 400, "missing_image", lambda: Request(b"", None)),
    Case("raw_jpeg", "raw JPEG body, Content-Type image/jpeg", 200, None, lambda: raw(jpeg(), "image/jpeg")),
    Case("raw_lying_type", "raw PNG body labelled image/jpeg: the bytes decide", 200, None,
         lambda: raw(png(), "image/jpeg")),
    Case("raw_octet_stream", "raw JPEG body, Content-Type application/octet-stream", 200, None,
         lambda: raw(jpeg(), "application/octet-stream")),
    Case("raw_empty", "empty raw body with Content-Type image/png", 400, "missing_image",
         lambda: raw(b"", "image/png")),
    Case("raw_text_type", "raw JPEG body with Content-Type text/plain", 415, "unsupported_media_type",
         lambda: raw(jpeg(), "text/plain")),
    Case("raw_json_type", "a JSON body", 415, "unsupported_media_type",
         lambda: raw(b'{"image": "aGVsbG8="}', "application/json")),
    Case("raw_form_urlencoded", "curl --data-binary's default application/x-www-form-urlencoded", 415,
         "unsupported_media_type", lambda: raw(jpeg(), "application/x-www-form-urlencoded")),
    Case("raw_text_as_image", "text bytes with Content-Type image/jpeg", 415, "not_an_image",
         lambda: raw(b"definitely not a jpeg", "image/jpeg")),
    # parameters
    Case("beam_size_0", "beam_size=0", 400, "invalid_parameter", lambda: upload(jpeg(), query="beam_size=0")),
    Case("beam_size_11", "beam_size=11", 400, "invalid_parameter", lambda: upload(jpeg(), query="beam_size=11")),
    Case("beam_size_abc", "beam_size=abc", 400, "invalid_parameter", lambda: upload(jpeg(), query="beam_size=abc")),
    Case("beam_size_float", "beam_size=2.5", 400, "invalid_parameter", lambda: upload(jpeg(), query="beam_size=2.5")),
    Case("strategy_foo", "strategy=foo", 400, "invalid_parameter", lambda: upload(jpeg(), query="strategy=foo")),
    Case("num_captions_over_beam", "num_captions=4 with beam_size=3", 400, "invalid_parameter",
         lambda: upload(jpeg(), query="beam_size=3&num_captions=4")),
    Case("num_captions_greedy", "num_captions=2 with strategy=greedy", 400, "invalid_parameter",
         lambda: upload(jpeg(), query="strategy=greedy&num_captions=2")),
    Case("max_length_0", "max_length=0", 400, "invalid_parameter", lambda: upload(jpeg(), query="max_length=0")),
    Case("max_length_51", "max_length=51", 400, "invalid_parameter", lambda: upload(jpeg(), query="max_length=51")),
    Case("unknown_parameter", "beamsize=3 (a typo)", 400, "invalid_parameter",
         lambda: upload(jpeg(), query="beamsize=3")),
    Case("repeated_parameter", "beam_size=2&beam_size=3", 400, "invalid_parameter",
         lambda: upload(jpeg(), query="beam_size=2&beam_size=3")),
    Case("bad_form_parameter", "beam_size=abc as a form field", 400, "invalid_parameter",
         lambda: upload(jpeg(), extra=[("beam_size", None, b"abc", None)])),
    Case("good_parameters", "strategy=beam&beam_size=5&num_captions=5&max_length=7", 200, None,
         lambda: upload(jpeg(), query="strategy=beam&beam_size=5&num_captions=5&max_length=7"), _n_captions(5)),
    Case("form_parameters", "strategy=greedy as a form field", 200, None,
         lambda: upload(jpeg(), extra=[("strategy", None, b"greedy", None)]),
         lambda body: None if body["options"]["strategy"] == "greedy" else _fail(body)),
    # routes
    Case("get_captions", "GET on the POST-only route", 405, "method_not_allowed",
         lambda: Request(method="GET")),
    Case("unknown_route", "POST to /v1/nope", 404, "not_found", lambda: upload(jpeg(), path="/v1/nope")),
    Case("batch_too_many", "17 files to /v1/captions:batch (limit 16)", 400, "too_many_images",
         lambda: multipart([("image", f"{i}.jpg", jpeg(), "image/jpeg") for i in range(17)]).with_path(
             "/v1/captions:batch")),
    Case("max_predict_not_image", "text to the MAX route /model/predict", 415, "not_an_image",
         lambda: upload(b"hello", path="/model/predict")),
)


def _fail(body: dict) -> None:
    raise AssertionError(body)


CASES_BY_NAME = {case.name: case for case in CASES}
assert len(CASES_BY_NAME) == len(CASES), "case names must be unique"
