"""``POST /v1/captions`` (one image) and ``POST /v1/captions:batch`` (several, one result each, in order)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request

from captioner.tags import Tag
from service.errors import ApiError
from service.params import read_uploads, request_options
from service.routes.common import caption_json, elapsed_ms, engine, model_json, read_upload, settings

bp = Blueprint("captions", __name__)


def tags_json(tags: list[Tag]) -> dict:
    """``{"tags": [{"label", "probability"}, ...]}``, most likely first; nothing when the model has no tags."""
    return {"tags": [tag.to_json() for tag in tags]} if tags else {}


@bp.post("/v1/captions")
def create_caption() -> Response:
    """Caption one image sent as multipart field ``image`` or as the raw request body."""
    eng = engine()
    captioner = eng.require()
    upload = read_uploads(request, max_files=1)[0]
    options = request_options(request, captioner)
    with eng.expecting(1) as ticket:
        image = read_upload(upload.data, ticket)
        result = eng.caption([image], options, ticket)[0]
    return jsonify({
        "captions": [caption_json(c) for c in result.captions],
        **tags_json(result.captions.tags),
        "model": model_json(),
        "options": options.to_json(),
        "image": {"format": image.format, "width": image.width, "height": image.height},
        "batch_size": result.batch_size,
        "timing_ms": {
            "preprocess": round(image.preprocess_ms, 2),
            "queue": round(result.queue_ms, 2),
            "inference": round(result.inference_ms, 2),
            "total": elapsed_ms(),
        },
    })


@bp.post("/v1/captions:batch")
def create_captions_batch() -> Response:
    """Caption up to ``max_batch_files`` images (repeated multipart field ``image``); a bad image fails alone."""
    eng = engine()
    captioner = eng.require()
    request.max_content_length = settings().max_batch_upload_bytes
    uploads = read_uploads(request, max_files=settings().max_batch_files)
    options = request_options(request, captioner)
    results: list[dict] = []
    prepared = []
    with eng.expecting(len(uploads)) as ticket:
        for index, upload in enumerate(uploads):
            entry: dict = {"index": index, "filename": upload.filename}
            try:
                image = read_upload(upload.data, ticket)
            except ApiError as error:
                entry["error"] = error.to_json() | {"status": error.status}
            else:
                entry["image"] = {"format": image.format, "width": image.width, "height": image.height}
                prepared.append((entry, image))
            results.append(entry)
        captioned = eng.caption([image for _, image in prepared], options, ticket)
    for (entry, _), result in zip(prepared, captioned, strict=True):
        entry["captions"] = [caption_json(c) for c in result.captions]
        entry |= tags_json(result.captions.tags)
    return jsonify({
        "results": results,
        "model": model_json(),
        "options": options.to_json(),
        "timing_ms": {"total": elapsed_ms()},
    })
