"""Optional API keys: off by default, on as soon as one key is configured.

A client sends ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. Keys are compared in constant time (each
candidate is hashed, then compared with every key with :func:`hmac.compare_digest`, so neither the position of the
first wrong character nor a key's length shows in the timing). Keys never reach a log: the settings hide them from
``repr``, the access log has no headers, and failures log only the route.

``/healthz``, ``/readyz``, the web page, the docs and the OpenAPI document stay open (the page asks the user for a
key; the document declares the schemes). ``/metrics`` takes ``CAPTIONER_METRICS_API_KEYS`` when set (a scraper's key
that cannot caption), else the API keys.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, request

from service.config import Settings
from service.errors import ApiError, drain_body

log = logging.getLogger("service.auth")

# Endpoints anyone may call: probes, and the pages that let a person find out how to authenticate.
OPEN_ENDPOINTS = frozenset({"ops.healthz", "ops.readyz", "web.index", "web.docs", "web.openapi", "static"})
METRICS_ENDPOINT = "ops.prometheus_metrics"
API_KEY_HEADER = "X-API-Key"


def read_keys_file(path: str | Path) -> tuple[str, ...]:
    """The keys in ``path``: one per line; blank lines and ``#`` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"CAPTIONER_API_KEYS_FILE: cannot read {path}: {exc}") from exc
    keys = tuple(line.split("#", 1)[0].strip() for line in text.splitlines())
    keys = tuple(key for key in keys if key)
    if not keys:
        raise ValueError(f"CAPTIONER_API_KEYS_FILE: {path} holds no key")
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def _check_key(key: str, source: str) -> None:
    """A key must be printable ASCII without spaces or commas (so headers and the env list carry it unchanged)."""
    if not key.isascii() or not key.isprintable() or any(c in key for c in " ,"):
        raise ValueError(f"{source}: API keys must be printable ASCII without spaces or commas")


@dataclass(frozen=True)
class KeySet:
    """SHA-256 digests of accepted keys; empty means open."""

    digests: tuple[bytes, ...]

    @classmethod
    def of(cls, keys: tuple[str, ...], source: str) -> KeySet:
        for key in keys:
            _check_key(key, source)
        return cls(tuple(_digest(key) for key in dict.fromkeys(keys)))

    def __bool__(self) -> bool:
        return bool(self.digests)

    def accepts(self, candidate: str) -> bool:
        """Whether ``candidate`` is one of the keys, comparing with every key (constant time)."""
        given = _digest(candidate)
        found = False
        for digest in self.digests:
            found |= hmac.compare_digest(given, digest)
        return found


@dataclass(frozen=True)
class Keys:
    """The keys of the API routes and of ``/metrics``."""

    api: KeySet
    metrics: KeySet

    @classmethod
    @functools.lru_cache(maxsize=8)  # the keys file is read once per settings
    def from_settings(cls, settings: Settings) -> Keys:
        api_keys = settings.api_keys
        if settings.api_keys_file:
            api_keys += read_keys_file(settings.api_keys_file)
        api = KeySet.of(api_keys, "CAPTIONER_API_KEYS")
        metrics = KeySet.of(settings.metrics_api_keys, "CAPTIONER_METRICS_API_KEYS") or api
        return cls(api, metrics)

    def for_endpoint(self, endpoint: str | None) -> KeySet | None:
        """The keys guarding ``endpoint``; ``None`` when it is open (or no such route: it answers 404)."""
        if endpoint is None or endpoint in OPEN_ENDPOINTS:
            return None
        keyset = self.metrics if endpoint == METRICS_ENDPOINT else self.api
        return keyset or None


def presented_key() -> str | None:
    """The key the request carries: ``Authorization: Bearer KEY``, else ``X-API-Key: KEY``."""
    authorization = request.headers.get("Authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    key = request.headers.get(API_KEY_HEADER, "").strip()
    return key or None


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="captioner"'})


def register_auth(app: Flask, settings: Settings) -> Keys:
    """Check the key of every request to a guarded route before its body is read; returns the keys in force."""
    keys = Keys.from_settings(settings)
    app.extensions["captioner_keys"] = keys
    if not keys.api and not keys.metrics:
        return keys
    log.info("API keys required", extra={"fields": {
        "api_keys": len(keys.api.digests), "metrics_keys": len(keys.metrics.digests)}})

    @app.before_request
    def _authenticate() -> None:
        keyset = keys.for_endpoint(request.endpoint)
        if keyset is None:
            return
        key = presented_key()
        if key is not None and keyset.accepts(key):
            return
        declared = request.content_length
        if declared is not None and declared <= (request.max_content_length or 0):
            drain_body()  # let the client finish sending, so it reads the 401 rather than a reset connection
        log.info("rejected request without a valid API key", extra={"fields": {"path": request.path}})
        if key is None:
            raise unauthorized("this route needs an API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
        raise unauthorized("the API key is not valid")

    return keys


def add_security(spec: dict, settings: Settings) -> dict:
    """Declare the key schemes in an OpenAPI document when keys are configured: guarded operations list them and
    their 401, open ones an empty ``security``."""
    keys = Keys.from_settings(settings)
    if not keys.api and not keys.metrics:
        return spec
    spec["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
        "apiKey": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
    }
    open_paths = {"/healthz", "/readyz", "/", "/docs", "/openapi.json"}
    for path, operations in spec["paths"].items():
        guarded = bool(keys.metrics if path == "/metrics" else keys.api) and path not in open_paths
        for operation in operations.values():
            operation["security"] = [{"bearer": []}, {"apiKey": []}] if guarded else []
            if guarded:
                operation["responses"]["401"] = {
                    "description": "no API key, or not a valid one (WWW-Authenticate: Bearer)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
    return spec
