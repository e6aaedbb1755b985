"""Helpers shared by the blueprints: the worker's engine and the JSON shapes of captions."""

from __future__ import annotations

import time

from flask import current_app, g

from captioner.api import Caption
from captioner.errors import ImageError
from service import metrics
from service.config import Settings
from service.engine import Engine, TimedImage
from service.errors import image_error
from service.microbatch import Ticket

ENGINE_KEY = "captioner_engine"


def engine() -> Engine:
    """This app's (this worker's) model engine."""
    return current_app.extensions[ENGINE_KEY]


def settings() -> Settings:
    return engine().settings


def read_upload(data: bytes, ticket: Ticket | None = None) -> TimedImage:
    """Decode an upload in the request thread; bad bytes become 413/415/422 API errors (and are counted)."""
    try:
        prepared = engine().read_upload(data)
    except ImageError as exc:
        if ticket is not None:
            ticket.release()  # no batch should wait for this image
        error = image_error(exc)
        metrics.IMAGES.labels(outcome=error.code).inc()
        raise error from exc
    metrics.IMAGES.labels(outcome="ok").inc()
    return prepared


def caption_json(caption: Caption) -> dict:
    return {"text": caption.text, "log_prob": caption.log_prob, "probability": caption.probability,
            "score": caption.score}


def model_json() -> dict:
    captioner = engine().require()
    return {"name": captioner.name, "version": captioner.version}


def elapsed_ms() -> float:
    """Milliseconds since this request started (set by the app's before_request hook)."""
    return round((time.perf_counter() - g.started) * 1000.0, 2)
