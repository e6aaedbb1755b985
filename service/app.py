"""The Flask app factory.

Production::

    gunicorn -c service/gunicorn.conf.py "service.app:create_app()"

Development: ``captioner serve --model DIR``. Each gunicorn worker calls :func:`create_app` once (``preload_app`` is
off), so each worker loads its own model, warms it up, and only then reports ready on ``/readyz``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, request

from captioner.api import DEFAULT_MODEL_DIR
from captioner.checkpoint import read_config
from captioner.errors import CheckpointError
from service import metrics
from service.auth import register_auth
from service.config import Settings, load_settings
from service.engine import Engine
from service.errors import register_error_handlers
from service.logs import REQUEST_ID_HEADER, configure_logging, request_id_from
from service.routes import BLUEPRINTS
from service.routes.common import ENGINE_KEY


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """A configured app: settings from ``config``, then ``CAPTIONER_*`` environment variables, then defaults.

    The model directory is checked at once (a wrong path fails the worker's boot, so gunicorn stops with a clear
    error); the model itself loads and warms up in a background thread unless ``load_in_background`` is false.
    """
    settings = load_settings(config)
    configure_logging()
    _check_model_dir(settings)
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes
    app.config["MAX_FORM_PARTS"] = settings.max_form_parts
    app.json.sort_keys = False  # type: ignore[attr-defined]
    engine = Engine(settings)
    app.extensions[ENGINE_KEY] = engine
    register_error_handlers(app)
    _register_request_hooks(app)
    register_auth(app, settings)  # after the request hooks: a 401 has its request id and is counted
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    engine.start()
    return app


def wait_until_ready(app: Flask, alive: Callable[[], bool] = lambda: True, poll_s: float = 0.5) -> bool:
    """Block until the app's model is loaded and warm (True), its loading failed, or ``alive()`` turns false.

    gunicorn.conf.py calls it in each worker before the worker accepts connections.
    """
    engine: Engine = app.extensions[ENGINE_KEY]
    while alive():
        if engine.wait_ready(poll_s):
            return True
        if engine.error:
            return False
    return False


def _check_model_dir(settings: Settings) -> None:
    path = Path(settings.model) if settings.model else DEFAULT_MODEL_DIR
    if settings.model is None and not (path / "config.json").is_file():
        raise CheckpointError(
            f"the bundled default model is missing from {path}; set CAPTIONER_MODEL (or --model) to a model directory"
        )
    read_config(path)


def _register_request_hooks(app: Flask) -> None:
    """Request ids, in-flight gauge, per-route counters and latency histograms."""

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()
        g.request_id = request_id_from(request.headers.get(REQUEST_ID_HEADER))
        metrics.IN_FLIGHT.inc()
        g.in_flight = True

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers[REQUEST_ID_HEADER] = g.get("request_id") or request_id_from(None)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        route = request.url_rule.rule if request.url_rule is not None else "<unmatched>"
        metrics.REQUESTS.labels(route=route, method=request.method, status=str(response.status_code)).inc()
        if "started" in g:
            metrics.LATENCY.labels(route=route).observe(time.perf_counter() - g.started)
        return response

    @app.teardown_request
    def _teardown(_exc: BaseException | None) -> None:
        if g.pop("in_flight", False):
            metrics.IN_FLIGHT.dec()
