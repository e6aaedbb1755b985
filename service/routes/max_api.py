"""IBM MAX Image Caption Generator compatible routes: ``POST /model/predict`` and ``GET /model/metadata``.

Existing MAX clients keep working: ``predict`` takes a multipart ``image`` and answers with its top 3 captions (the
model's recorded decoding options, as at every door; 3 of its beams, or 1 caption for a greedy model) as
``{"status": "ok", "predictions": [{"index": "0", "caption": ..., "probability": ...}, ...]}``.
Errors use the service's error object plus MAX's ``"status": "error"``.
"""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from service.errors import ApiError, error_response
from service.params import read_uploads
from service.routes.common import engine, read_upload

bp = Blueprint("max_api", __name__)

MAX_PREDICTIONS = 3


@bp.errorhandler(ApiError)
def _max_error(error: ApiError) -> Response:
    return error_response(error, {"status": "error"})


@bp.post("/model/predict")
def predict() -> Response:
    """The top 3 captions of one image, with the model's recorded decoding options."""
    eng = engine()
    eng.require()
    upload = read_uploads(request, max_files=1)[0]
    options = eng.options(num_captions=min(MAX_PREDICTIONS, eng.options().width))
    with eng.expecting(1) as ticket:
        result = eng.caption([read_upload(upload.data, ticket)], options, ticket)[0]
    predictions = [
        {"index": str(i), "caption": c.text, "probability": c.probability} for i, c in enumerate(result.captions)
    ]
    return jsonify({"status": "ok", "predictions": predictions})


@bp.get("/model/metadata")
def metadata() -> Response:
    """MAX's model metadata document, describing the loaded model."""
    captioner = engine().require()
    return jsonify({
        "id": f"captioner-{captioner.name}",
        "name": f"captioner {captioner.name} {captioner.version}",
        "description": f"CNN encoder ({captioner.model.encoder.name}) + LSTM decoder with attention, "
                       "greedy or beam-search decoding",
        "type": "Image-to-Text Translation",
        "license": "MIT",
        "source": "captioner (this service); model directory trained with `captioner train`",
    })
