"""The OpenAPI 3 document served at ``/openapi.json`` (and rendered by ``/docs``)."""

from __future__ import annotations

from typing import Any

from captioner.decoding import OPTION_SPECS, OptionSpec
from captioner.tags import DEFAULT_NUM_TAGS
from service.auth import add_security
from service.config import Settings
from service.params import IMAGE_FIELD

JSON = "application/json"


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict:
    return _json(_ref("Error"), description)


def _parameter(spec: OptionSpec) -> dict:
    """A decoding option (name, type, range and help from the library's one list) as a query parameter."""
    if spec.choices:
        schema: dict[str, Any] = {"type": "string", "enum": list(spec.choices)}
    else:
        schema = {"type": "integer" if spec.kind is int else "number", "minimum": spec.low, "maximum": spec.high}
    description = f"{spec.help}. Default: the model's recorded value (a response's `options` shows what was used)"
    return {"name": spec.name, "in": "query", "required": False, "description": description, "schema": schema}


def _parameters() -> list[dict]:
    return [_parameter(spec) for spec in OPTION_SPECS]


def _multipart(settings: Settings, many: bool) -> dict:
    file = {"type": "string", "format": "binary"}
    image = {"type": "array", "items": file, "maxItems": settings.max_batch_files} if many else file
    properties: dict[str, Any] = {IMAGE_FIELD: image}
    for param in _parameters():
        properties[param["name"]] = param["schema"]
    return {"schema": {"type": "object", "required": [IMAGE_FIELD], "properties": properties}}


def _image_errors(settings: Settings) -> dict:
    return {
        "400": _error("missing image, wrong field name, too many files, unknown or invalid parameter"),
        "413": _error(f"request body over {settings.max_upload_bytes} bytes, or image over "
                      f"{settings.max_pixels} pixels (e.g. a decompression bomb)"),
        "415": _error("the bytes are not an image format the server reads, or an unaccepted Content-Type"),
        "422": _error("the image is truncated or corrupt"),
        "503": _error("the model is still loading, or the worker is overloaded (see Retry-After)"),
    }


TAGS_DESCRIPTION = (
    f"the image's {DEFAULT_NUM_TAGS} most likely ImageNet classes, most likely first, from the encoder's own "
    "classifier; absent when the model has no tags head"
)


def _schemas() -> dict:
    number = {"type": "number"}
    return {
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "example": "corrupt_image",
                             "description": "stable machine-readable code, e.g. missing_image, invalid_parameter, "
                                            "not_an_image, corrupt_image, image_too_large, payload_too_large"},
                    "message": {"type": "string"},
                },
            }},
        },
        "Caption": {"type": "object", "required": ["text", "log_prob", "probability", "score"], "properties": {
            "text": {"type": "string", "example": "a dog runs on the grass"},
            "log_prob": {**number, "description": "summed log-probability of the words and <end>"},
            "probability": {**number, "description": "exp(log_prob)"},
            "score": {**number, "description": "the ranking score, log_prob / (words + 1) ** length_penalty: "
                                               "captions come highest score first"},
        }},
        "Tag": {"type": "object", "required": ["label", "probability"], "properties": {
            "label": {"type": "string", "example": "espresso", "description": "an ImageNet-1k class name"},
            "probability": {**number, "description": "the encoder's ImageNet classifier's softmax probability"},
        }},
        "Model": {"type": "object", "properties": {"name": {"type": "string"}, "version": {"type": "string"}}},
        "Options": {"type": "object", "description": "the decoding options used: the model's recorded defaults, "
                                                     "then the request's parameters",
                    "properties": {p["name"]: p["schema"] for p in _parameters()}},
        "ImageInfo": {"type": "object", "properties": {
            "format": {"type": "string", "nullable": True, "example": "JPEG"},
            "width": {"type": "integer"}, "height": {"type": "integer"},
        }},
        "CaptionResponse": {"type": "object", "required": ["captions", "model", "timing_ms"], "properties": {
            "captions": {"type": "array", "items": _ref("Caption")},
            "tags": {"type": "array", "items": _ref("Tag"), "description": TAGS_DESCRIPTION},
            "model": _ref("Model"),
            "options": _ref("Options"),
            "image": _ref("ImageInfo"),
            "batch_size": {"type": "integer", "description": "images in the model batch this request joined"},
            "timing_ms": {"type": "object", "properties": {
                k: number for k in ("preprocess", "queue", "inference", "total")}},
        }},
        "BatchResult": {"type": "object", "required": ["index"], "properties": {
            "index": {"type": "integer"},
            "filename": {"type": "string", "nullable": True},
            "image": _ref("ImageInfo"),
            "captions": {"type": "array", "items": _ref("Caption")},
            "tags": {"type": "array", "items": _ref("Tag"), "description": TAGS_DESCRIPTION},
            "error": {"type": "object", "description": "instead of captions, when this image failed",
                      "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                     "status": {"type": "integer"}}},
        }},
        "BatchResponse": {"type": "object", "properties": {
            "results": {"type": "array", "items": _ref("BatchResult")},
            "model": _ref("Model"), "options": _ref("Options"),
            "timing_ms": {"type": "object", "properties": {"total": number}},
        }},
        "MaxPrediction": {"type": "object", "properties": {
            "index": {"type": "string", "example": "0"}, "caption": {"type": "string"}, "probability": number,
        }},
        "MaxPredictResponse": {"type": "object", "properties": {
            "status": {"type": "string", "example": "ok"},
            "predictions": {"type": "array", "items": _ref("MaxPrediction")},
        }},
        "MaxMetadata": {"type": "object", "properties": {
            k: {"type": "string"} for k in ("id", "name", "description", "type", "license", "source")}},
    }


def build_spec(settings: Settings, server_url: str | None = None) -> dict:
    """The OpenAPI 3.0 document, with this server's limits in the descriptions."""
    single_body = {
        "required": True,
        "description": f"the image as multipart file field `{IMAGE_FIELD}` (parameters may also be form fields), "
                       "or the raw image bytes with Content-Type image/* or application/octet-stream. The format is "
                       "judged from the bytes, not from the Content-Type or file name.",
        "content": {
            "multipart/form-data": _multipart(settings, many=False),
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    text = {"text/plain": {"schema": {"type": "string"}}}
    html = {"text/html": {"schema": {"type": "string"}}}
    paths = {
        "/v1/captions": {"post": {
            "tags": ["captions"], "summary": "Caption one image", "operationId": "createCaption",
            "parameters": _parameters(), "requestBody": single_body,
            "responses": {"200": _json(_ref("CaptionResponse"), "the captions, best first")} | _image_errors(settings),
        }},
        "/v1/captions:batch": {"post": {
            "tags": ["captions"], "summary": f"Caption up to {settings.max_batch_files} images",
            "operationId": "createCaptionsBatch",
            "description": f"Repeat the multipart field `{IMAGE_FIELD}`. One result per image, in order; a bad image "
                           f"gets its own `error` and does not fail the others. Body limit: "
                           f"{settings.max_batch_upload_bytes} bytes.",
            "parameters": _parameters(),
            "requestBody": {"required": True, "content": {"multipart/form-data": _multipart(settings, many=True)}},
            "responses": {"200": _json(_ref("BatchResponse"), "one result per image")}
            | {k: v for k, v in _image_errors(settings).items() if k in ("400", "413", "415", "503")},
        }},
        "/model/predict": {"post": {
            "tags": ["MAX compatibility"],
            "summary": "IBM MAX Image Caption Generator: the top 3 captions, with the model's decoding options",
            "operationId": "maxPredict",
            "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                "type": "object", "required": [IMAGE_FIELD],
                "properties": {IMAGE_FIELD: {"type": "string", "format": "binary"}}}}}},
            "responses": {"200": _json(_ref("MaxPredictResponse"), "MAX's prediction format")}
            | _image_errors(settings),
        }},
        "/model/metadata": {"get": {
            "tags": ["MAX compatibility"], "summary": "IBM MAX model metadata", "operationId": "maxMetadata",
            "responses": {"200": _json(_ref("MaxMetadata"), "model metadata"), "503": _error("model not loaded")},
        }},
        "/healthz": {"get": {"tags": ["operations"], "summary": "Liveness", "operationId": "healthz",
                             "responses": {"200": _json({"type": "object"}, "the worker answers")}}},
        "/readyz": {"get": {
            "tags": ["operations"], "summary": "Readiness: the model is loaded and warm", "operationId": "readyz",
            "responses": {"200": _json({"type": "object"}, "ready"), "503": _error("loading, or failed to load")},
        }},
        "/metrics": {"get": {"tags": ["operations"], "summary": "Prometheus metrics", "operationId": "metrics",
                             "responses": {"200": {"description": "exposition text", "content": text}}}},
        "/openapi.json": {"get": {"tags": ["documentation"], "summary": "This document", "operationId": "openapi",
                                  "responses": {"200": _json({"type": "object"}, "OpenAPI 3 document")}}},
        "/docs": {"get": {"tags": ["documentation"], "summary": "This document as a web page", "operationId": "docs",
                          "responses": {"200": {"description": "HTML page", "content": html}}}},
        "/": {"get": {"tags": ["documentation"], "summary": "Caption a photo in the browser", "operationId": "index",
                      "responses": {"200": {"description": "HTML page", "content": html}}}},
    }
    spec: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {
            "title": "captioner API",
            "version": "1",
            "description": "Image captioning: a CNN encoder and an LSTM decoder with attention. Every error is "
                           '`{"error": {"code": ..., "message": ...}}` with its HTTP status; requests carry an '
                           "`X-Request-ID` (yours, or a generated one) that is echoed and logged.",
        },
        "paths": paths,
        "components": {"schemas": _schemas()},
    }
    if server_url:
        spec["servers"] = [{"url": server_url}]
    return add_security(spec, settings)
