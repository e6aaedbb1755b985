"""gunicorn workers boot before they take requests: a slow model load is neither served 503s nor killed by the
worker timeout, and a worker SIGKILLed under load costs only its in-flight requests."""

from __future__ import annotations

import http.client
import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

from gunicorn_process import GunicornServer
from upload_corpus import jpeg

TESTS = Path(__file__).resolve().parent
SLOW_APP = "slow_loading_app:create_app()"


def _env(**extra: str) -> dict[str, str]:
    return {"CAPTIONER_TORCH_THREADS": "1", "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            **extra}


def _models_ready(server: GunicornServer) -> int:
    return server.stderr_path.read_text().count('"message": "model ready"')


def _worker_pids(server: GunicornServer) -> list[int]:
    return [int(pid) for pid in re.findall(r"Booting worker with pid: (\d+)", server.stderr_path.read_text())]


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_slow_load_outlives_the_worker_timeout(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The model takes 6 s to load with a 3 s worker timeout: the booting worker's heartbeat keeps it alive."""
    server = GunicornServer(tiny_model_dir, tmp_path, workers=1, threads=2, app=SLOW_APP,
                            env=_env(SLOW_LOAD_S="6", CAPTIONER_WORKER_TIMEOUT="3"))
    try:
        server.wait_ready(timeout=120)
        assert server.request("GET", "/readyz").status == 200
    finally:
        server.stop()
    log = server.stderr_path.read_text()
    assert "WORKER TIMEOUT" not in log
    assert len(_worker_pids(server)) == 1


def test_sigkilled_worker_under_load_loses_only_in_flight_requests(tiny_model_dir: Path, tmp_path: Path) -> None:
    """2 workers under 4 busy clients; one is SIGKILLed; its replacement (3 s model load) takes no request before it
    is ready: no 503 at all, only the killed worker's in-flight requests fail (connection errors)."""
    threads = 4
    server = GunicornServer(tiny_model_dir, tmp_path, workers=2, threads=threads, app=SLOW_APP,
                            env=_env(SLOW_LOAD_S="3"))
    statuses: Counter[str] = Counter()
    lock = threading.Lock()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                response = server.request("POST", "/v1/captions?strategy=greedy&max_length=3", jpeg(),
                                          {"Content-Type": "image/jpeg"}, timeout=30)
                outcome = str(response.status)
                if response.status != 200:
                    outcome += " " + response.json()["error"]["code"]
            except (OSError, http.client.HTTPException) as exc:
                outcome = f"lost: {type(exc).__name__}"
            with lock:
                statuses[outcome] += 1

    try:
        server.wait_ready(timeout=120)
        _wait_for(lambda: _models_ready(server) == 2, 60, "both workers ready")
        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        time.sleep(1.5)
        victim = _worker_pids(server)[0]
        os.kill(victim, signal.SIGKILL)
        _wait_for(lambda: len(_worker_pids(server)) == 3, 30, "a replacement worker")
        _wait_for(lambda: _models_ready(server) == 3, 60, "the replacement's model")
        time.sleep(2.0)  # the replacement now takes its share
        stop.set()
        for thread in clients:
            thread.join(60)
    finally:
        stop.set()
        server.stop()
    lost = sum(n for outcome, n in statuses.items() if outcome.startswith("lost"))
    assert statuses["200"] > 20, statuses
    assert set(statuses) <= {"200"} | {o for o in statuses if o.startswith("lost")}, statuses  # no 503 at all
    assert lost <= threads, statuses  # at most the killed worker's in-flight requests
