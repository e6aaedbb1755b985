"""The worker's model: loaded once, warmed up, then shared by all request threads of the worker."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from captioner.api import Captioner
from captioner.decoding import DecodingOptions
from captioner.errors import CorruptImageError, ImageError, NotAnImageError
from captioner.preprocess import load_image, open_image, to_tensor
from service import metrics
from service.batching import BatchResult, MicroBatcher, Ticket, caption_mixed
from service.config import Settings
from service.errors import ApiError

log = logging.getLogger("service.engine")

EXIF_ORIENTATION = 0x0112
# Unambiguous magic numbers of formats Pillow reads: bytes starting with one are a damaged image, not a non-image.
SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def known_signature(data: bytes) -> str | None:
    """The image format ``data`` declares by its magic number, if any (WebP: RIFF....WEBP)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in SIGNATURES if data.startswith(magic)), None)


@dataclass(frozen=True)
class PreparedImage:
    """An uploaded image, decoded and resized in the request thread."""

    tensor: torch.Tensor
    format: str | None
    width: int  # the upload's upright size (after EXIF rotation), not the decoded size
    height: int
    preprocess_ms: float


class Engine:
    """Loads the model (in the background by default), warms it up, and captions prepared images."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.captioner: Captioner | None = None
        self.batcher: MicroBatcher | None = None
        self.error: str | None = None
        self._ready = threading.Event()
        self._started = False
        self._lock = threading.Lock()
        self._model_lock = threading.Lock()  # batching off: serialises model calls

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model, in a thread when ``settings.load_in_background``; safe to call more than once."""
        with self._lock:
            if self._started:
                return
            self._started = True
        if self.settings.load_in_background:
            threading.Thread(target=self._load_logged, name="model-loader", daemon=True).start()
        else:
            self.load()

    def _load_logged(self) -> None:
        try:
            self.load()
        except Exception:  # reported by /readyz; the worker keeps answering /healthz
            log.exception("model failed to load")

    def load(self) -> None:
        """Load and warm up the model, then mark the engine ready."""
        settings = self.settings
        started = time.perf_counter()
        try:
            if settings.torch_threads:
                torch.set_num_threads(settings.torch_threads)
            captioner = Captioner.load(settings.model, device=settings.resolved_device, allow_download=False)
            self._warm_up(captioner)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            raise
        if settings.batching:
            self.batcher = MicroBatcher(
                captioner, settings.batch_max_size, settings.batch_max_wait_ms, observer=metrics.observe_batch
            )
        self.captioner = captioner
        self._ready.set()
        metrics.MODEL_READY.set(1)
        log.info(
            "model ready",
            extra={"fields": {
                "model": captioner.name, "version": captioner.version, "device": str(captioner.device),
                "batching": settings.batching, "load_s": round(time.perf_counter() - started, 3),
                "torch_threads": torch.get_num_threads(),
            }},
        )

    @staticmethod
    def _warm_up(captioner: Captioner) -> None:
        """One dummy caption per strategy, so the first real request does not pay for lazy initialisation."""
        size = captioner.preprocess_config.size
        tensor = to_tensor(Image.new("RGB", (size, size), (128, 128, 128)), captioner.preprocess_config)
        for strategy in ("greedy", "beam"):
            options = captioner.options(strategy=strategy, beam_size=3, num_captions=1, max_length=5)
            caption_mixed(captioner, [tensor], [options])

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    # -- requests --------------------------------------------------------------------------------------------------

    def require(self) -> Captioner:
        """The captioner, or a 503 while it is loading (or failed to load)."""
        if self.captioner is None:
            if self.error:
                raise ApiError(503, "model_unavailable", f"the model failed to load: {self.error}")
            raise ApiError(503, "not_ready", "the model is still loading; retry shortly", {"Retry-After": "5"})
        return self.captioner

    def prepare(self, data: bytes) -> PreparedImage:
        """Decode and resize an upload (raises the library's image errors for bad bytes)."""
        captioner = self.require()
        started = time.perf_counter()
        try:
            image = open_image(data, max_pixels=self.settings.max_pixels)
            image_format, (width, height) = image.format, image.size
            if image.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                width, height = height, width
            rgb = load_image(image, captioner.preprocess_config, max_pixels=self.settings.max_pixels)
            tensor = to_tensor(rgb, captioner.preprocess_config)
        except NotAnImageError as exc:
            signature = known_signature(data)
            if signature:  # Pillow gave up, but the bytes say which format it is: a damaged file, not a non-image
                raise CorruptImageError(f"{signature} data is truncated or corrupt: {exc}") from exc
            raise
        except ImageError:
            raise
        except Exception as exc:  # a decoder bug on hostile bytes (struct.error, IndexError...) is still bad input
            log.warning("image decoder failed unexpectedly: %r", exc)
            raise CorruptImageError(f"image data cannot be decoded: {type(exc).__name__}: {exc}") from exc
        elapsed = time.perf_counter() - started
        metrics.PREPROCESS.observe(elapsed)
        return PreparedImage(tensor, image_format, width, height, elapsed * 1000.0)

    def options(self, **values: object) -> DecodingOptions:
        """The model's decoding defaults with the request's values on top."""
        return self.require().options(**values)

    @contextmanager
    def expecting(self, count: int) -> Iterator[Ticket | None]:
        """Announce ``count`` images this request is about to preprocess, so a forming batch can wait for them."""
        if self.batcher is None:
            yield None
            return
        with self.batcher.expecting(count) as ticket:
            yield ticket

    def caption(
        self, images: list[PreparedImage], options: DecodingOptions, ticket: Ticket | None = None
    ) -> list[BatchResult]:
        """Captions for each prepared image, through the micro-batcher when batching is on."""
        captioner = self.require()
        if not images:
            return []
        if self.batcher is None:
            # One model call at a time: concurrent torch calls would only fight over the same cores.
            with self._model_lock:
                started = time.perf_counter()
                captions, tags = caption_mixed(captioner, [i.tensor for i in images], [options] * len(images))
                elapsed = time.perf_counter() - started
            metrics.observe_batch(len(images), elapsed)
            return [BatchResult(c, len(images), 0.0, elapsed * 1000.0, t) for c, t in zip(captions, tags, strict=True)]
        futures = [self.batcher.submit(image.tensor, options, ticket) for image in images]
        return [self._wait(future) for future in futures]

    def _wait(self, future: Future) -> BatchResult:
        try:
            result: BatchResult = future.result(timeout=self.settings.request_timeout_s)
        except FutureTimeout:
            future.cancel()
            raise ApiError(
                503, "timeout", f"no model time within {self.settings.request_timeout_s:g} s; the worker is overloaded",
                {"Retry-After": "1"},
            ) from None
        metrics.QUEUE_WAIT.observe(result.queue_ms / 1000.0)
        return result
