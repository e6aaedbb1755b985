"""Service settings: environment variables with documented defaults, overridable by ``create_app(config)``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from captioner.preprocess import DEFAULT_MAX_PIXELS

MB = 1024 * 1024


@dataclass(frozen=True)
class Setting:
    """One documented setting: its environment variable, default and meaning."""

    name: str
    env: str
    default: Any
    help: str


@dataclass(frozen=True)
class Settings:
    """Everything the app reads from its environment.

    ``create_app(config)`` takes the same names as keys (``{"model": "path", "batching": False}``); config values win
    over environment variables, which win over the defaults.
    """

    model: str | None = None
    device: str = "auto"
    max_upload_bytes: int = 10 * MB
    max_batch_upload_bytes: int = 50 * MB
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch_files: int = 16
    batching: bool = True
    batch_max_size: int = 16
    batch_max_wait_ms: float = 10.0
    request_timeout_s: float = 30.0
    torch_threads: int = 0
    load_in_background: bool = True
    runtime: str = "auto"

    def __post_init__(self) -> None:
        positive = ("max_upload_bytes", "max_batch_upload_bytes", "max_pixels", "max_batch_files", "batch_max_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_max_wait_ms < 0 or self.request_timeout_s <= 0 or self.torch_threads < 0:
            raise ValueError("batch_max_wait_ms and torch_threads must be >= 0, request_timeout_s > 0")
        from captioner.runtime import AUTO, RUNTIMES

        if self.runtime not in (AUTO, *RUNTIMES):
            raise ValueError(f"runtime must be one of {', '.join((AUTO, *RUNTIMES))}, got {self.runtime!r}")

    @property
    def resolved_device(self) -> str:
        """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


SETTINGS: tuple[Setting, ...] = (
    Setting("model", "CAPTIONER_MODEL", None,
            "model directory; default: the bundled model (captioner/models/default)"),
    Setting("device", "CAPTIONER_DEVICE", "auto",
            "torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1"),
    Setting("max_upload_bytes", "CAPTIONER_MAX_UPLOAD_BYTES", 10 * MB,
            "largest request body of the one-image routes (413 above)"),
    Setting("max_batch_upload_bytes", "CAPTIONER_MAX_BATCH_UPLOAD_BYTES", 50 * MB,
            "largest request body of /v1/captions:batch"),
    Setting("max_pixels", "CAPTIONER_MAX_PIXELS", DEFAULT_MAX_PIXELS,
            "largest width x height, checked from the header before decoding (413 above)"),
    Setting("max_batch_files", "CAPTIONER_MAX_BATCH_FILES", 16,
            "most images in one /v1/captions:batch request"),
    Setting("batching", "CAPTIONER_BATCHING", True,
            "group concurrent requests of a worker into one model batch"),
    Setting("batch_max_size", "CAPTIONER_BATCH_MAX_SIZE", 16,
            "most images in one micro-batch"),
    Setting("batch_max_wait_ms", "CAPTIONER_BATCH_MAX_WAIT_MS", 10.0,
            "longest a request waits for others to join its batch"),
    Setting("request_timeout_s", "CAPTIONER_REQUEST_TIMEOUT_S", 30.0,
            "longest a request waits for the model (then 503)"),
    Setting("torch_threads", "CAPTIONER_TORCH_THREADS", 0,
            "torch intra-op threads per worker; 0: torch's default (gunicorn.conf.py sets cores / workers)"),
    Setting("load_in_background", "CAPTIONER_LOAD_IN_BACKGROUND", True,
            "load the model in a thread so /healthz answers at once (/readyz is 503 until it is warm)"),
    Setting("runtime", "CAPTIONER_RUNTIME", "auto",
            "encoder runtime: auto (the fastest installed of openvino, onnxruntime), torch, openvino, onnxruntime"),
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(setting: Setting, field_type: str, raw: Any) -> Any:
    """Convert an environment string (or a config value) to the setting's type."""
    if raw is None or (isinstance(raw, str) and raw.strip() == "" and setting.default is None):
        return None
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    try:
        if "bool" in field_type:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
        if "int" in field_type:
            return int(text.replace("_", ""))
        if "float" in field_type:
            return float(text)
    except ValueError as exc:
        raise ValueError(f"{setting.env}={raw!r}: {exc}") from exc
    return text


def load_settings(config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``config`` (keys are :class:`Settings` field names), then ``environ``, then the defaults."""
    config = dict(config or {})
    environ = os.environ if environ is None else environ
    types = {f.name: str(f.type) for f in fields(Settings)}
    unknown = set(config) - set(types)
    if unknown:
        raise ValueError(f"unknown service settings {sorted(unknown)}; known: {sorted(types)}")
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.name in config:
            values[setting.name] = _convert(setting, types[setting.name], config[setting.name])
        elif setting.env in environ:
            values[setting.name] = _convert(setting, types[setting.name], environ[setting.env])
    return Settings(**values)
