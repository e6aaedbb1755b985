"""JSON errors: every non-2xx response is ``{"error": {"code": "...", "message": "..."}}``."""

from __future__ import annotations

import logging
import time

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
    431: "headers_too_large",
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
            limit = request.max_content_length
            message = f"request body is larger than the limit of {limit} bytes" if limit else message
            drain_body()
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
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(ApiError(500, "internal_error", "internal server error; see the server log"))
