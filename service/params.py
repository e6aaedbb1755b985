"""Request parameters (query string or form fields) and uploaded image bytes, validated into 400/415 errors.

The decoding parameters are the library's (:data:`captioner.decoding.OPTION_SPECS`), parsed by its one parser; a
parameter the request does not give is the model's recorded default, as at every other door.
"""

from __future__ import annotations

from dataclasses import dataclass

from flask import Request
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.exceptions import RequestEntityTooLarge

from captioner.api import Captioner
from captioner.decoding import OPTIONS_BY_NAME, DecodingOptions, parse_options
from service.errors import ApiError

IMAGE_FIELD = "image"
RAW_CONTENT_TYPES = ("image/", "application/octet-stream")


def _bad(message: str) -> ApiError:
    return ApiError(400, "invalid_parameter", message)


def _values(request: Request) -> MultiDict:
    """Query parameters and (for multipart posts) form fields together; the image field is not a parameter."""
    values: MultiDict = MultiDict(request.args)
    if request.mimetype == "multipart/form-data":
        for key, value in request.form.items(multi=True):
            if key != IMAGE_FIELD:
                values.add(key, value)
    return values


def request_options(request: Request, captioner: Captioner) -> DecodingOptions:
    """The decoding options of ``request``: the model's recorded defaults, then the parameters it gives.

    Unknown or repeated parameters are 400 errors too (typos fail loudly), as are values out of range.
    """
    values = _values(request)
    unknown = sorted(set(values) - set(OPTIONS_BY_NAME))
    if unknown:
        raise _bad(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(OPTIONS_BY_NAME)}")
    repeated = sorted(name for name in values if len(values.getlist(name)) > 1)
    if repeated:
        raise _bad(f"parameter(s) given more than once: {', '.join(repeated)}")
    try:
        return captioner.options(**parse_options(values.to_dict()))
    except ValueError as exc:
        raise _bad(str(exc)) from None


@dataclass(frozen=True)
class Upload:
    """One uploaded image's bytes and the name the client gave it."""

    data: bytes
    filename: str | None


def _file_upload(storage: FileStorage) -> Upload:
    return Upload(storage.read(), storage.filename or None)


def _missing(request: Request, what: str) -> ApiError:
    fields = sorted(set(request.files) | set(request.form))
    got = f"; the request has field(s): {', '.join(fields)}" if fields else ""
    return ApiError(400, "missing_image", f"{what}{got}")


def read_uploads(request: Request, max_files: int) -> list[Upload]:
    """The uploaded images: multipart ``image`` field(s) (at most ``max_files``) or one raw image body."""
    if request.mimetype == "multipart/form-data":
        uploads = [_file_upload(f) for f in request.files.getlist(IMAGE_FIELD)]
        # A browser form with no file chosen sends an empty part without a file name: that is "no image".
        uploads = [u for u in uploads if u.data or u.filename]
        if not uploads:
            if IMAGE_FIELD in request.form:
                raise ApiError(400, "missing_image", f"the {IMAGE_FIELD!r} field must be a file upload, not text")
            raise _missing(request, f"no image: send it as a multipart file field named {IMAGE_FIELD!r}")
        if len(uploads) > max_files:
            code = "too_many_images"
            if max_files == 1:
                raise ApiError(400, code, f"{len(uploads)} images sent; this route takes one (use /v1/captions:batch)")
            raise ApiError(400, code, f"{len(uploads)} images sent; at most {max_files} per request")
        return uploads
    if request.mimetype.startswith(RAW_CONTENT_TYPES):
        data = request.get_data(cache=False)
        limit = request.max_content_length
        if request.content_length is None and limit is not None and len(data) >= limit:
            # A chunked body is cut at the limit by Werkzeug without an error: anything that long is too long.
            raise RequestEntityTooLarge()
        if not data:
            raise ApiError(400, "missing_image", "the request body is empty")
        return [Upload(data, None)]
    if not request.mimetype and not request.content_length and not request.headers.get("Transfer-Encoding"):
        message = f"no image: send a multipart file field {IMAGE_FIELD!r} or a raw image body"
        raise ApiError(400, "missing_image", message)
    raise ApiError(
        415, "unsupported_media_type",
        f"Content-Type {request.mimetype or '(none)'} is not accepted: send multipart/form-data with a file field "
        f"{IMAGE_FIELD!r}, or the raw image bytes with Content-Type image/* or application/octet-stream",
    )
