"""Pages for people: the captioning page at ``/``, the API docs at ``/docs`` and the spec at ``/openapi.json``.

Both pages are static files in ``service/static`` with no external resources (the service may run offline), served
with a Content-Security-Policy that only allows this origin.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from service.openapi import build_spec
from service.routes.common import settings

bp = Blueprint("web", __name__)

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def _page(name: str) -> Response:
    response = current_app.send_static_file(name)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Cache-Control"] = "no-cache"
    return response


@bp.get("/")
def index() -> Response:
    """Pick or drop a photo, see its captions."""
    return _page("index.html")


@bp.get("/docs")
def docs() -> Response:
    """A human-readable rendering of /openapi.json."""
    return _page("docs.html")


@bp.get("/openapi.json")
def openapi() -> Response:
    """The OpenAPI 3 document of this API (with this server's limits)."""
    return jsonify(build_spec(settings(), server_url=request.host_url.rstrip("/")))
