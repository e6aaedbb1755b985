"""Operations: ``/healthz`` (alive), ``/readyz`` (model loaded and warm) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from service import metrics
from service.errors import ApiError, error_response
from service.routes.common import engine

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz() -> Response:
    """Liveness: the worker answers (the model may still be loading)."""
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz() -> Response:
    """Readiness: 200 once this worker's model is loaded and warmed up, 503 before (or if loading failed)."""
    eng = engine()
    try:
        captioner = eng.require()
    except ApiError as error:
        return error_response(error, {"status": "failed" if eng.error else "loading"})
    return jsonify({
        "status": "ready",
        "model": {"name": captioner.name, "version": captioner.version},
        "device": str(captioner.device),
        "runtime": captioner.encode.name,  # the encoder's
        "decoder_precision": captioner.decoder_precision,
        "batching": eng.settings.batching,
        "options": captioner.options().to_json(),  # the model's recorded decoding options (the web page's start)
    })


@bp.get("/metrics")
def prometheus_metrics() -> Response:
    """Prometheus exposition text (summed over all gunicorn workers in multiprocess mode)."""
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)
