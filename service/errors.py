"""JSON errors: every non-2xx response is ``{"error": {"code": "...", "message": "..."}}``."""

from __future__ import annotations

import json
import logging
import time
import traceback

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from captioner.errors import CorruptImageError, ImageError, ImageTooLargeError, NotAnImageError

log = logging.getLogger("service.errors")

# Werkzeug's HTTP errors, by status, as stable machine-readable codes.
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}


# A body over the size limit is read and thrown away (up to this much, for at most this long) before the 413 goes
# out: most clients (curl aside) send the whole body before they read the response, and gunicorn closes a connection
# with more than 64 KiB unread, so without this they would see a reset connection instead of the JSON error.
DRAIN_MAX_BYTES = 64 * 1024 * 1024
DRAIN_MAX_SECONDS = 10.0


class ApiError(Exception):
    """An error the API reports on purpose, with its HTTP status and a stable code."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def to_json(self) -> dict:
        return {"code": self.code, "message": self.message}


def image_error(exc: ImageError) -> ApiError:
    """The API error for a library image error (judged from the bytes, never the file name or content type)."""
    if isinstance(exc, NotAnImageError):
        return ApiError(415, "not_an_image", exc.message)
    if isinstance(exc, ImageTooLargeError):
        return ApiError(413, "image_too_large", exc.message)
    if isinstance(exc, CorruptImageError):
        return ApiError(422, "corrupt_image", exc.message)
    return ApiError(422, "bad_image", exc.message)


def error_response(error: ApiError, extra: dict | None = None) -> Response:
    """The JSON response of ``error``; ``extra`` adds top-level keys (MAX's ``"status": "error"``)."""
    response = jsonify((extra or {}) | {"error": error.to_json()})
    response.status_code = error.status
    for name, value in error.headers.items():
        response.headers[name] = value
    return response


def drain_body() -> None:
    """Read and discard the rest of an over-limit request body, within :data:`DRAIN_MAX_BYTES` and seconds."""
    declared = request.content_length
    if declared is not None and declared > DRAIN_MAX_BYTES:
        return  # too much to read for nothing: the connection is closed on the client instead
    stream = request.environ.get("wsgi.input")
    if stream is None:
        return
    deadline = time.monotonic() + DRAIN_MAX_SECONDS
    drained = 0
    try:
        while drained < DRAIN_MAX_BYTES and time.monotonic() < deadline:
            chunk = stream.read(64 * 1024)
            if not chunk:
                break
            drained += len(chunk)
    except (OSError, ValueError):
        pass


def _too_large(exc: HTTPException) -> ApiError:
    """Which limit a 413 hit: Werkzeug raises the same exception for the body size, the number of multipart parts
    and the size of a form text field, so the frame that raised it tells them apart."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    raised_in = frames[-1].name if frames else ""
    if raised_in == "next_event":  # werkzeug.sansio.multipart.MultipartDecoder counting parts
        return ApiError(413, "too_many_parts",
                        f"the form has more than {request.max_form_parts} parts (files and fields)")
    if raised_in in ("receive_data", "parse"):  # the multipart decoder / parser measuring a text field
        return ApiError(413, "form_field_too_large",
                        f"a form text field is larger than the limit of {request.max_form_memory_size} bytes")
    limit = request.max_content_length
    message = f"request body is larger than the limit of {limit} bytes" if limit else "request body is too large"
    return ApiError(413, "payload_too_large", message)


def write_gunicorn_error(sock: object, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's ``util.write_error`` with the API's JSON error body instead of an HTML page: gunicorn answers
    malformed requests itself (bad Content-Length or chunking 400, request line over 414, headers over 431) before
    Flask sees them. ``service/gunicorn.conf.py`` installs it in each worker."""
    from gunicorn import util

    error = {"code": _HTTP_CODES.get(status_int, "bad_request"), "message": mesg or reason}
    body = json.dumps({"error": error}).encode()
    head = (f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Content-Type-Options: nosniff\r\n\r\n")
    util.write_nonblock(sock, head.encode("latin-1") + body)


def install_gunicorn_json_errors() -> None:
    """Make this gunicorn worker write :func:`write_gunicorn_error`'s JSON for the errors it answers itself."""
    from gunicorn import util

    util.write_error = write_gunicorn_error


def _is_malformed_body(exc: Exception) -> bool:
    """Whether ``exc`` is gunicorn's parser refusing the request body (only under gunicorn)."""
    try:
        from gunicorn.http.errors import ParseException
    except ImportError:  # pragma: no cover - gunicorn is a dependency
        return False
    return isinstance(exc, ParseException)


def register_error_handlers(app: Flask) -> None:
    """Turn every error, expected or not, into the JSON error shape; unexpected ones are logged as 500s."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc)

    @app.errorhandler(ImageError)
    def _image_error(exc: ImageError) -> Response:
        return error_response(image_error(exc))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = exc.description or exc.name
        if status == 413:
            drain_body()
            return error_response(_too_large(exc))
        if status == 405:
            allowed = exc.get_response().headers.get("Allow", "")
            message = f"method {request.method} is not allowed here; allowed: {allowed}"
            response = error_response(ApiError(405, "method_not_allowed", message))
            response.headers["Allow"] = allowed
            return response
        if status == 404:
            message = f"no such route: {request.path}"
        return error_response(ApiError(status, _HTTP_CODES.get(status, "http_error"), message))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        if _is_malformed_body(exc):  # gunicorn found the body's framing broken (bad chunk size...) while Flask read it
            response = error_response(ApiError(400, "bad_request", f"malformed request body: {exc}"))
            response.headers["Connection"] = "close"  # the rest of the stream cannot be parsed
            return response
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal_error", "internal server error; see the server log"))
