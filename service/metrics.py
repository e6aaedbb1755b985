"""Prometheus metrics, shared by every gunicorn worker when ``PROMETHEUS_MULTIPROC_DIR`` is set.

``service/gunicorn.conf.py`` sets ``PROMETHEUS_MULTIPROC_DIR`` (to a fresh temporary folder unless you set it) before
the workers start, so ``/metrics`` on any worker reports the sum over all of them. Without it (``captioner serve``,
tests) each process reports its own numbers.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

REQUESTS = Counter(
    "captioner_http_requests", "HTTP requests by route, method and status", ["route", "method", "status"]
)
LATENCY = Histogram(
    "captioner_http_request_duration_seconds", "HTTP request latency by route", ["route"], buckets=_LATENCY_BUCKETS
)
IN_FLIGHT = Gauge("captioner_http_requests_in_flight", "HTTP requests being handled", multiprocess_mode="livesum")
IMAGES = Counter("captioner_images", "Uploaded images by outcome (ok or an error code)", ["outcome"])
PREPROCESS = Histogram(
    "captioner_preprocess_seconds", "Image decode + resize time per image (request thread)", buckets=_LATENCY_BUCKETS
)
QUEUE_WAIT = Histogram(
    "captioner_queue_wait_seconds", "Time an image waited for its model batch", buckets=_LATENCY_BUCKETS
)
INFERENCE = Histogram("captioner_inference_seconds", "Encoder + decoder time per model batch", buckets=_LATENCY_BUCKETS)
BATCH_SIZE = Histogram("captioner_batch_size", "Images per model batch", buckets=_BATCH_BUCKETS)
MODEL_READY = Gauge(
    "captioner_model_ready", "1 once the worker's model is loaded and warm", multiprocess_mode="livemin"
)


def observe_batch(size: int, seconds: float) -> None:
    """Record one model batch (the micro-batcher's observer)."""
    BATCH_SIZE.observe(size)
    INFERENCE.observe(seconds)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type: all workers' metrics in multiprocess mode, else this process'."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
