"""Gunicorn settings for the captioner service.

    gunicorn -c service/gunicorn.conf.py "service.app:create_app()"

Every value can be changed with an environment variable (below) or a command-line flag, which wins over this file
(``-b 127.0.0.1:9000 -w 1``). Workers are ``gthread``: each worker holds one model and serves ``threads``
concurrent requests, which its micro-batcher groups into shared model batches. ``preload_app`` stays off so each
worker loads its own model after the fork (torch does not like being forked with live threads).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

_cpus = os.cpu_count() or 1

bind = os.environ.get("CAPTIONER_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("CAPTIONER_WORKERS", "2"))
worker_class = "gthread"
threads = int(os.environ.get("CAPTIONER_THREADS", "16"))
timeout = int(os.environ.get("CAPTIONER_WORKER_TIMEOUT", "60"))  # a worker silent this long is restarted
# The timeout counts from a worker's first heartbeat, which gunicorn (27) sends when the worker enters its request
# loop: a slow model load at boot is not taken for a hung worker (tests/test_service_workers.py pins this).
graceful_timeout = int(os.environ.get("CAPTIONER_GRACEFUL_TIMEOUT", "30"))  # in-flight requests finish on SIGTERM
keepalive = int(os.environ.get("CAPTIONER_KEEPALIVE", "5"))
# Workers are recycled (one at a time, thanks to the jitter; a new worker takes requests only once its model is
# ready) so that whatever memory a long run leaves behind is returned. 0 turns recycling off.
max_requests = int(os.environ.get("CAPTIONER_MAX_REQUESTS", "20000"))
max_requests_jitter = max_requests // 10
preload_app = False
worker_tmp_dir = "/dev/shm" if Path("/dev/shm").is_dir() else None
limit_request_line = 8190
limit_request_fields = 100
control_socket_disable = True  # no gunicornc socket: several servers may share a host (tests, benchmarks)

# Structured logs: JSON lines on stderr (errors) and stdout (access, with the X-Request-ID of each response).
logger_class = "service.logs.GunicornLogger"
accesslog = os.environ.get("CAPTIONER_ACCESS_LOG", "-")
errorlog = "-"
loglevel = os.environ.get("CAPTIONER_LOG_LEVEL", "info")

# Prometheus multiprocess mode: every worker writes its metrics to this folder and /metrics on any worker reports
# the sum. It must be set before workers import prometheus_client, i.e. here, in the master.
if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(tempfile.gettempdir(), f"captioner-metrics-{os.getpid()}")
    os.environ["CAPTIONER_OWNS_METRICS_DIR"] = "1"  # survives a config reload (HUP) that re-runs this file


def on_starting(server: Any) -> None:
    """Start with an empty metrics folder (stale files from a previous run would be summed in)."""
    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()


def post_fork(server: Any, worker: Any) -> None:
    """Each worker's torch gets its share of the cores (unless CAPTIONER_TORCH_THREADS is set), so workers do not
    fight over them; runs in the new worker before it loads the app. Errors gunicorn answers itself are JSON."""
    os.environ.setdefault("CAPTIONER_TORCH_THREADS", str(max(1, _cpus // max(1, server.cfg.workers))))
    from service.errors import install_gunicorn_json_errors
    from service.memory import limit_malloc_arenas

    install_gunicorn_json_errors()
    limit_malloc_arenas(int(os.environ.get("MALLOC_ARENA_MAX", "2")))


def post_worker_init(worker: Any) -> None:
    """Accept no request before this worker's model is loaded and warm: the worker enters its request loop (and
    starts taking connections from the shared socket) only after this returns, so while it boots, e.g. after a
    crash or a max_requests recycle, the other workers serve everything instead of it answering 503 not_ready."""
    from service.app import wait_until_ready

    wait_until_ready(worker.wsgi, alive=lambda: worker.alive)


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges (in-flight requests, model ready) from the sums."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    """Remove the metrics folder this file created."""
    if os.environ.get("CAPTIONER_OWNS_METRICS_DIR") == "1":
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
