"""Request parameters (query string or form fields) and uploaded image bytes, validated into 400/415 errors."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Request
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.exceptions import RequestEntityTooLarge

from service.errors import ApiError

IMAGE_FIELD = "image"
STRATEGIES = ("greedy", "beam")
RAW_CONTENT_TYPES = ("image/", "application/octet-stream")


@dataclass(frozen=True)
class IntRange:
    """An integer parameter's bounds and default."""

    low: int
    high: int
    default: int


BEAM_SIZE = IntRange(1, 10, 3)
MAX_LENGTH = IntRange(1, 50, 20)
NUM_CAPTIONS = IntRange(1, 10, 1)
DEFAULT_STRATEGY = "beam"
PARAMETERS = ("strategy", "beam_size", "max_length", "num_captions")


@dataclass(frozen=True)
class CaptionParams:
    """Validated decoding parameters of one request."""

    strategy: str = DEFAULT_STRATEGY
    beam_size: int = BEAM_SIZE.default
    max_length: int = MAX_LENGTH.default
    num_captions: int = NUM_CAPTIONS.default

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "beam_size": self.beam_size, "max_length": self.max_length,
                "num_captions": self.num_captions}


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


def _int(values: MultiDict, name: str, bounds: IntRange) -> int:
    raw = values.get(name)
    if raw is None or raw.strip() == "":
        return bounds.default
    try:
        value = int(raw.strip())
    except ValueError:
        raise _bad(f"{name} must be an integer from {bounds.low} to {bounds.high}, got {raw!r}") from None
    if not bounds.low <= value <= bounds.high:
        raise _bad(f"{name} must be from {bounds.low} to {bounds.high}, got {value}")
    return value


def parse_params(request: Request, allowed_extra: tuple[str, ...] = ()) -> CaptionParams:
    """The decoding parameters of ``request``; unknown or repeated parameters are 400 errors too (typos fail loudly)."""
    values = _values(request)
    unknown = sorted(set(values) - set(PARAMETERS) - set(allowed_extra))
    if unknown:
        raise _bad(f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(PARAMETERS)}")
    repeated = sorted(name for name in values if len(values.getlist(name)) > 1)
    if repeated:
        raise _bad(f"parameter(s) given more than once: {', '.join(repeated)}")
    strategy = (values.get("strategy") or DEFAULT_STRATEGY).strip().lower()
    if strategy not in STRATEGIES:
        raise _bad(f"strategy must be one of {', '.join(STRATEGIES)}, got {values.get('strategy')!r}")
    beam_size = _int(values, "beam_size", BEAM_SIZE)
    max_length = _int(values, "max_length", MAX_LENGTH)
    num_captions = _int(values, "num_captions", NUM_CAPTIONS)
    width = beam_size if strategy == "beam" else 1
    if num_captions > width:
        limit = f"beam_size ({beam_size})" if strategy == "beam" else "1 with strategy=greedy"
        raise _bad(f"num_captions must be at most {limit}, got {num_captions}")
    return CaptionParams(strategy, beam_size, max_length, num_captions)


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
