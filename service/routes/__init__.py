"""The app's blueprints, registered in this order by :func:`service.app.create_app`."""

from __future__ import annotations

from flask import Blueprint

from service.routes.captions import bp as captions
from service.routes.max_api import bp as max_api
from service.routes.ops import bp as ops
from service.routes.web import bp as web

BLUEPRINTS: tuple[Blueprint, ...] = (captions, max_api, ops, web)
