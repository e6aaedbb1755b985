"""The service whose model takes ``SLOW_LOAD_S`` seconds longer to load: gunicorn worker boot tests use it as
``slow_loading_app:create_app()`` (with ``tests/`` on PYTHONPATH), so a booting worker is easy to catch."""

from __future__ import annotations

import os
import time

from flask import Flask

from service.app import create_app as create_service_app
from service.engine import Engine

_load = Engine.load


def _slow_load(self: Engine) -> None:
    time.sleep(float(os.environ.get("SLOW_LOAD_S", "3")))
    _load(self)


Engine.load = _slow_load  # type: ignore[method-assign]


def create_app() -> Flask:
    return create_service_app()
