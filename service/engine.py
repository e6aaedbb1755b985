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
from captioner.preprocess import PreparedImage, open_image, prepare_image, to_tensor
from captioner.tags import DEFAULT_NUM_TAGS
from service import metrics
from service.config import Settings
from service.errors import ApiError
from service.memory import BudgetTimeout, PixelBudget, decode_cost
from service.microbatch import BatchResult, MicroBatcher, Ticket

log = logging.getLogger("service.engine")


@dataclass(frozen=True)
class TimedImage(PreparedImage):
    """An upload prepared by the library in the request thread (tensor, format, upright size), and how long it took."""

    preprocess_ms: float = 0.0


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
        self.decode_budget = PixelBudget(settings.pixel_budget)  # bounds the memory of concurrent decodes

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
            captioner = Captioner.load(
                settings.model, device=settings.resolved_device, allow_download=False, runtime=settings.runtime,
                decoder_precision=settings.decoder_precision,
            )
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
                "runtime": captioner.encode.name, "decoder_precision": captioner.decoder_precision,
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
            captioner.caption_tensors(tensor.unsqueeze(0), options)

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

    def read_upload(self, data: bytes) -> TimedImage:
        """Read and resize an upload with the library's one image path (raises its image errors for bad bytes)."""
        captioner = self.require()
        started = time.perf_counter()
        # The header is read first (cheap); the decode itself runs within the worker's pixel budget, which bounds
        # the memory of concurrent decodes (a PNG's getexif() already decodes it all, so it is inside too).
        cost = decode_cost(open_image(data, max_pixels=self.settings.max_pixels), captioner.preprocess_config.size)
        try:
            with self.decode_budget.hold(cost, timeout=self.settings.request_timeout_s):
                prepared = prepare_image(data, captioner.preprocess_config, max_pixels=self.settings.max_pixels)
        except BudgetTimeout as exc:
            raise ApiError(503, "timeout", f"the worker is busy decoding other images: {exc}",
                           {"Retry-After": "1"}) from None
        elapsed = time.perf_counter() - started
        metrics.PREPROCESS.observe(elapsed)
        return TimedImage(prepared.tensor, prepared.format, prepared.width, prepared.height, elapsed * 1000.0)

    def options(self, **given: object) -> DecodingOptions:
        """The model's recorded decoding options with the request's values on top (None: not given)."""
        return self.require().options(**given)

    @contextmanager
    def expecting(self, count: int) -> Iterator[Ticket | None]:
        """Announce ``count`` images this request is about to preprocess, so a forming batch can wait for them."""
        if self.batcher is None:
            yield None
            return
        with self.batcher.expecting(count) as ticket:
            yield ticket

    def caption(
        self, images: list[TimedImage], options: DecodingOptions, ticket: Ticket | None = None
    ) -> list[BatchResult]:
        """Captions and top tags for each prepared image, through the micro-batcher when batching is on."""
        captioner = self.require()
        if not images:
            return []
        if self.batcher is None:
            # One model call at a time: concurrent torch calls would only fight over the same cores.
            with self._model_lock:
                started = time.perf_counter()
                captions = captioner.caption_tensors(torch.stack([i.tensor for i in images]), options, DEFAULT_NUM_TAGS)
                elapsed = time.perf_counter() - started
            metrics.observe_batch(len(images), elapsed)
            return [BatchResult(c, len(images), 0.0, elapsed * 1000.0) for c in captions]
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
