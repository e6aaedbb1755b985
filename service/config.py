"""Service settings: environment variables with documented defaults, overridable by ``create_app(config)``.

:class:`Settings` is the one list of settings: each field's environment variable is ``CAPTIONER_`` + its name in
upper case, its help text lives in the field's metadata and its type annotation says how the variable is parsed.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from captioner.fast_decoder import DECODER_PRECISION_HELP
from captioner.preprocess import DEFAULT_MAX_PIXELS

MB = 1024 * 1024
ENV_PREFIX = "CAPTIONER_"


def _setting(default: Any, help: str, secret: bool = False) -> Any:  # noqa: A002 - the field's help text
    """A :class:`Settings` field with its help text; a ``secret`` one never appears in ``repr`` (nor in logs)."""
    return field(default=default, repr=not secret, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    """Everything the app reads from its environment.

    ``create_app(config)`` takes the same names as keys (``{"model": "path", "batching": False}``); config values win
    over environment variables, which win over the defaults.
    """

    model: str | None = _setting(None, "model directory; default: the bundled model (captioner/models/default)")
    device: str = _setting("auto", "torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1")
    max_upload_bytes: int = _setting(10 * MB, "largest request body of the one-image routes (413 above)")
    max_batch_upload_bytes: int = _setting(50 * MB, "largest request body of /v1/captions:batch")
    max_pixels: int = _setting(
        DEFAULT_MAX_PIXELS, "largest width x height, checked from the header before decoding (413 above)")
    decode_pixel_budget: int = _setting(
        0, "most pixels a worker decodes at once, summed over its concurrent uploads (others wait their turn); "
           "0: max_pixels, i.e. one worst-case image at a time")
    max_batch_files: int = _setting(16, "most images in one /v1/captions:batch request")
    max_form_parts: int = _setting(64, "most multipart parts (files and fields) in one request (413 above)")
    batching: bool = _setting(True, "group concurrent requests of a worker into one model batch")
    batch_max_size: int = _setting(16, "most images in one micro-batch")
    batch_max_wait_ms: float = _setting(10.0, "longest a request waits for others to join its batch")
    request_timeout_s: float = _setting(30.0, "longest a request waits for the model (then 503)")
    torch_threads: int = _setting(
        0, "torch intra-op threads per worker; 0: torch's default (gunicorn.conf.py sets cores / workers)")
    load_in_background: bool = _setting(
        True, "load the model in a thread so /healthz answers at once (/readyz is 503 until it is warm)")
    api_keys: tuple[str, ...] = _setting(
        (), "comma-separated API keys; when any is set, the API routes need one (Authorization: Bearer KEY or "
            "X-API-Key: KEY)", secret=True)
    api_keys_file: str | None = _setting(
        None, "a file of API keys, one per line (# comments), added to api_keys", secret=True)
    metrics_api_keys: tuple[str, ...] = _setting(
        (), "comma-separated keys for /metrics only (e.g. the scraper's); unset: /metrics takes the API keys",
        secret=True)
    runtime: str = _setting(
        "auto", "encoder runtime: auto (the fastest installed of openvino, onnxruntime), torch, openvino, onnxruntime")
    decoder_precision: str = _setting("float32", DECODER_PRECISION_HELP)

    def __post_init__(self) -> None:
        positive = ("max_upload_bytes", "max_batch_upload_bytes", "max_pixels", "max_batch_files", "batch_max_size",
                    "max_form_parts")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_max_wait_ms < 0 or self.request_timeout_s <= 0 or self.torch_threads < 0:
            raise ValueError("batch_max_wait_ms and torch_threads must be >= 0, request_timeout_s > 0")
        if self.decode_pixel_budget < 0:
            raise ValueError(f"decode_pixel_budget must be >= 0, got {self.decode_pixel_budget}")
        from captioner.runtime import AUTO, RUNTIMES

        if self.runtime not in (AUTO, *RUNTIMES):
            raise ValueError(f"runtime must be one of {', '.join((AUTO, *RUNTIMES))}, got {self.runtime!r}")
        from captioner.fast_decoder import DECODER_PRECISIONS

        if self.decoder_precision not in DECODER_PRECISIONS:
            raise ValueError(
                f"decoder_precision must be one of {', '.join(DECODER_PRECISIONS)}, got {self.decoder_precision!r}"
            )

    @property
    def resolved_device(self) -> str:
        """``auto`` becomes ``cuda`` when a GPU is visible, else ``cpu``."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def pixel_budget(self) -> int:
        """The decode pixel budget in effect (``decode_pixel_budget``, or ``max_pixels`` when that is 0)."""
        return self.decode_pixel_budget or self.max_pixels


@dataclass(frozen=True)
class Setting:
    """One documented setting: its field name, environment variable, default, type and meaning."""

    name: str
    env: str
    default: Any
    type: Any
    help: str


def _settings_table() -> tuple[Setting, ...]:
    hints = typing.get_type_hints(Settings)
    return tuple(
        Setting(f.name, ENV_PREFIX + f.name.upper(), f.default, hints[f.name], f.metadata["help"])
        for f in fields(Settings)
    )


SETTINGS: tuple[Setting, ...] = _settings_table()

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``(T, optional)`` for an annotation ``T`` or ``T | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _convert(setting: Setting, raw: Any) -> Any:
    """Convert an environment string (or a config value) to the setting's type."""
    kind, optional = _base_type(setting.type)
    if raw is None or (optional and isinstance(raw, str) and raw.strip() == ""):
        return None
    try:
        if typing.get_origin(kind) is tuple:  # a comma-separated list of strings
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(str(item).strip() for item in items if str(item).strip())
        if not isinstance(raw, str):
            return raw
        text = raw.strip()
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError("expected one of 1/0, true/false, yes/no, on/off")
        if kind is int:
            return int(text.replace("_", ""))
        if kind is float:
            return float(text)
    except ValueError as exc:
        raise ValueError(f"{setting.env}: {exc}") from exc  # the value itself may be a secret: never echoed
    return text


def load_settings(config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``config`` (keys are :class:`Settings` field names), then ``environ``, then the defaults."""
    config = dict(config or {})
    environ = os.environ if environ is None else environ
    unknown = set(config) - {s.name for s in SETTINGS}
    if unknown:
        raise ValueError(f"unknown service settings {sorted(unknown)}; known: {sorted(s.name for s in SETTINGS)}")
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.name in config:
            values[setting.name] = _convert(setting, config[setting.name])
        elif setting.env in environ:
            values[setting.name] = _convert(setting, environ[setting.env])
    return Settings(**values)
