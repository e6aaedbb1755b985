"""Exceptions raised by the library.

Every door into the model (HTTP, batch, training) maps these to a clear message: the service turns them into JSON
errors with a status code, the batch command into an ``error`` field in the output record.
"""

from __future__ import annotations


class CaptionerError(Exception):
    """Base class of every error the library raises on purpose."""


class ImageError(CaptionerError, ValueError):
    """An input image could not be used.

    ``code`` is the same stable word at every door: the exception here, the ``error`` of a batch record (``str()``
    of the exception: ``"corrupt_image: ..."``) and the HTTP error's ``code``; ``message`` is the text alone.
    """

    code = "bad_image"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class NotAnImageError(ImageError):
    """The bytes are not an image format Pillow can read (HTTP 415)."""

    code = "not_an_image"


class CorruptImageError(ImageError):
    """The bytes start like an image but cannot be decoded: truncated or damaged (HTTP 422)."""

    code = "corrupt_image"


class ImageTooLargeError(ImageError):
    """The image has more pixels than the configured limit, e.g. a decompression bomb (HTTP 413)."""

    code = "image_too_large"


class CheckpointError(CaptionerError):
    """A model directory is missing, inconsistent or corrupted."""


class WeightsError(CaptionerError):
    """Encoder weights are missing or do not match their recorded sha256."""
