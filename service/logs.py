"""Structured logs: one JSON object per line, with the request id, for gunicorn's and the app's loggers.

Gunicorn uses :class:`GunicornLogger` (``logger_class`` in ``service/gunicorn.conf.py``): its access log lines are
JSON objects (method, path, status, duration, request id...) instead of Apache's combined format. This module must
stay importable without torch or Flask's app: gunicorn's master imports it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
import uuid
from typing import Any

REQUEST_ID_HEADER = "X-Request-ID"
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]{1,128}$")
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def request_id_from(header: str | None) -> str:
    """The client's X-Request-ID when it is a sane token (<= 128 safe characters), else a fresh random id."""
    if header and _VALID_REQUEST_ID.match(header):
        return header
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON line: ts, level, logger, message, request_id, extra ``fields``, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class RequestIdFilter(logging.Filter):
    """Adds the current Flask request's id (``g.request_id``) to records logged while handling it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            try:
                from flask import g, has_request_context

                record.request_id = g.get("request_id") if has_request_context() else None
            except ImportError:  # pragma: no cover - Flask is a dependency
                record.request_id = None
        return True


def configure_logging(level: int = logging.INFO, force: bool = False) -> None:
    """JSON logs on stderr for the app's loggers, unless the host (pytest, an embedding app) already set up logging."""
    root = logging.getLogger()
    if root.handlers and not force:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    if force:
        for old in list(root.handlers):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


try:
    from gunicorn.glogging import Logger as _GunicornBaseLogger
except ImportError:  # pragma: no cover - gunicorn is a dependency
    _GunicornBaseLogger = object  # type: ignore[assignment,misc]


class GunicornLogger(_GunicornBaseLogger):  # type: ignore[misc,valid-type]
    """Gunicorn's logger with JSON error and access logs (the access line carries the response's request id)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(JsonFormatter())

    def access(self, resp: Any, req: Any, environ: dict, request_time: dt.timedelta) -> None:
        if not getattr(self, "access_log_enabled", self.cfg.accesslog):
            return
        headers = {str(name).lower(): value for name, value in (resp.headers or [])}
        fields = {
            "request_id": headers.get(REQUEST_ID_HEADER.lower()),
            "method": req.method,
            "path": req.path,
            "query": req.query or None,
            "status": getattr(resp, "status_code", None),
            "bytes": getattr(resp, "sent", None),
            "duration_ms": round(request_time.total_seconds() * 1000.0, 2),
            "remote": environ.get("REMOTE_ADDR"),
            "user_agent": environ.get("HTTP_USER_AGENT"),
        }
        try:
            self.access_log.info("request", extra={"fields": fields})
        except Exception:  # never let logging break a response
            self.error(f"failed to write the access log for {req.path}")
