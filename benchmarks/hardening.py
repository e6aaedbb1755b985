"""Hardening benchmarks against real processes on loopback: slow clients, a memory burst, a soak, a worker SIGKILL.

    .venv/bin/python benchmarks/hardening.py slow-clients [--seconds 60]   # gunicorn alone vs serve --production
    .venv/bin/python benchmarks/hardening.py memory                         # 16 worst-case uploads at once
    .venv/bin/python benchmarks/hardening.py soak [--seconds 120 --clients 8]
    .venv/bin/python benchmarks/hardening.py sigkill                        # a worker SIGKILLed under load
    .venv/bin/python benchmarks/hardening.py all

Every run uses the bundled model (``--model DIR`` for another) and gunicorn's production settings (2 workers x 16
threads) unless told otherwise, and prints its figures. The fast versions of these checks are tests
(tests/test_service_production.py, test_service_memory.py, test_service_workers.py).
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from gunicorn_process import GunicornServer  # noqa: E402
from PIL import Image  # noqa: E402
from production_stack import ProductionStack, SlowClients  # noqa: E402

from service.config import Settings  # noqa: E402
from service.memory import peak_growth_bound  # noqa: E402

PHOTO = (REPO / "captioner" / "samples" / "cat.jpg").read_bytes()
CAPTION = "/v1/captions"
JPEG = {"Content-Type": "image/jpeg"}


def _request(host: str, port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
             timeout: float = 30.0) -> int:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request(method, path, body=body or None, headers=headers or {})
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _timed_caption(host: str, port: int) -> float | None:
    """Seconds for one caption request, or None if it failed or timed out (30 s)."""
    started = time.perf_counter()
    try:
        status = _request(host, port, "POST", CAPTION, PHOTO, JPEG)
    except (OSError, http.client.HTTPException):
        return None
    return time.perf_counter() - started if status == 200 else None


def _worker_pids(log: Path) -> list[int]:
    return [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", log.read_text())]


def _kib(pid: int, field: str) -> int:
    try:
        return int(re.search(rf"{field}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
    except (OSError, AttributeError):
        return 0


def _gunicorn(model: str | None, folder: Path, **env: str) -> GunicornServer:
    server = GunicornServer(model, folder, workers=2, threads=16, env=env)
    server.wait_ready(timeout=300)
    deadline = time.monotonic() + 300
    while server.stderr_path.read_text().count('"message": "model ready"') < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    return server


# -- slow clients ----------------------------------------------------------------------------------------------------


def _slow_clients_run(name: str, host: str, port: int, seconds: float) -> None:
    for _ in range(3):
        _timed_caption(host, port)
    idle = [t for t in (_timed_caption(host, port) for _ in range(20)) if t is not None]
    loaded: list[float | None] = []
    ready = Counter()
    with SlowClients(host, port, headers=64, bodies=16, interval=1.0) as attack:
        time.sleep(2.0)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            loaded.append(_timed_caption(host, port))
            try:
                ready[_request(host, port, "GET", "/readyz", timeout=5)] += 1
            except (OSError, http.client.HTTPException):
                ready["timeout"] += 1
    done = [t for t in loaded if t is not None]
    idle_p50 = statistics.median(idle) * 1000
    loaded_p50 = statistics.median(done) * 1000 if done else float("nan")
    print(f"{name:>12} idle p50 {idle_p50:7.1f} ms | under 64 slow-header + 16 slow-body clients for {seconds:g} s: "
          f"{len(done)}/{len(loaded)} requests ok, p50 {loaded_p50:7.1f} ms ({loaded_p50 / idle_p50:.2f}x idle), "
          f"/readyz {dict(ready)}, slow connections reopened {attack.reconnects}")


def slow_clients(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        server = _gunicorn(args.model, Path(folder) / "gunicorn")
        try:
            _slow_clients_run("gunicorn", server.host, server.port, args.seconds)
        finally:
            server.stop()
        stack = ProductionStack(Path(args.model) if args.model else None, Path(folder) / "stack",
                                env={"CAPTIONER_WORKERS": "2", "CAPTIONER_THREADS": "16"})
        try:
            stack.wait_ready(timeout=300)
            _slow_clients_run("nginx+gunicorn", stack.host, stack.port, args.seconds)
        finally:
            stack.stop()


# -- memory ----------------------------------------------------------------------------------------------------------


def _worst_case(mode: str, side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (side, side), (10, 20, 30, 128) if mode == "RGBA" else 30000).save(buffer, "PNG")
    return buffer.getvalue()


def memory(args: argparse.Namespace) -> None:
    max_pixels = Settings().max_pixels
    side = int(max_pixels**0.5)
    uploads = [_worst_case("RGBA", side), _worst_case("I;16", side)]
    print(f"uploads: RGBA PNG {side}x{side} ({len(uploads[0]) / 1e3:.0f} kB), 16-bit PNG {side}x{side} "
          f"({len(uploads[1]) / 1e3:.0f} kB); 16 at once, 8 of each")
    with tempfile.TemporaryDirectory() as folder:
        server = _gunicorn(args.model, Path(folder))
        try:
            workers = _worker_pids(server.stderr_path)
            for data in uploads:  # one of each first: every worker's allocator warm
                for _ in workers:
                    _request(server.host, server.port, "POST", CAPTION, data, {"Content-Type": "image/png"}, 300)
            idle = {pid: _kib(pid, "VmRSS") for pid in workers}
            for pid in workers:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            started = time.perf_counter()
            with ThreadPoolExecutor(16) as pool:
                statuses = Counter(pool.map(lambda d: _request(server.host, server.port, "POST", CAPTION, d,
                                                               {"Content-Type": "image/png"}, 300), uploads * 8))
            elapsed = time.perf_counter() - started
            peak = {pid: _kib(pid, "VmHWM") for pid in workers}
            time.sleep(5)
            after = {pid: _kib(pid, "VmRSS") for pid in workers}
        finally:
            server.stop()
    bound = peak_growth_bound(max_pixels) / 2**20
    print(f"statuses {dict(statuses)} in {elapsed:.1f} s; documented bound: idle + {bound:.0f} MiB per worker")
    for pid in workers:
        growth = (peak[pid] - idle[pid]) / 1024
        print(f"  worker {pid}: idle {idle[pid] / 1024:.0f} MiB, peak {peak[pid] / 1024:.0f} MiB (+{growth:.0f}, "
              f"{'within' if growth <= bound else 'OVER'} the bound), 5 s after {after[pid] / 1024:.0f} MiB")


# -- soak ------------------------------------------------------------------------------------------------------------


def soak(args: argparse.Namespace) -> None:
    warm_up = min(20.0, args.seconds / 4)
    with tempfile.TemporaryDirectory() as folder:
        server = _gunicorn(args.model, Path(folder))
        outcomes: Counter[str] = Counter()
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                outcomes["ok" if _timed_caption(server.host, server.port) is not None else "error"] += 1

        try:
            workers = _worker_pids(server.stderr_path)
            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            time.sleep(warm_up)
            rss_warm = {pid: _kib(pid, "VmRSS") for pid in workers}
            time.sleep(args.seconds - warm_up)
            rss_end = {pid: _kib(pid, "VmRSS") for pid in workers}
            stop.set()
            for thread in threads:
                thread.join(60)
        finally:
            stop.set()
            server.stop()
    print(f"soak {args.seconds:g} s, {args.clients} clients: {outcomes['ok']} ok, {outcomes['error']} errors "
          f"({outcomes['ok'] / args.seconds:.1f} req/s)")
    for pid in workers:
        growth = (rss_end[pid] - rss_warm[pid]) / rss_warm[pid] * 100
        print(f"  worker {pid}: RSS after {warm_up:g} s warm-up {rss_warm[pid] / 1024:.0f} MiB, at the end "
              f"{rss_end[pid] / 1024:.0f} MiB ({growth:+.1f}%)")


# -- worker SIGKILL --------------------------------------------------------------------------------------------------


def sigkill(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder:
        server = _gunicorn(args.model, Path(folder))
        outcomes: Counter[str] = Counter()
        stop = threading.Event()

        def client() -> None:
            while not stop.is_set():
                try:
                    status = _request(server.host, server.port, "POST", CAPTION, PHOTO, JPEG)
                    outcomes[str(status)] += 1
                except (OSError, http.client.HTTPException) as exc:
                    outcomes[f"lost ({type(exc).__name__})"] += 1

        try:
            threads = [threading.Thread(target=client) for _ in range(args.clients)]
            for thread in threads:
                thread.start()
            time.sleep(5)
            victim = _worker_pids(server.stderr_path)[0]
            killed_at = time.perf_counter()
            os.kill(victim, signal.SIGKILL)
            while server.stderr_path.read_text().count('"message": "model ready"') < 3:
                time.sleep(0.1)
            replaced_in = time.perf_counter() - killed_at
            time.sleep(5)
            stop.set()
            for thread in threads:
                thread.join(60)
        finally:
            stop.set()
            server.stop()
    print(f"worker SIGKILL under {args.clients} clients: replacement ready {replaced_in:.1f} s later; "
          f"outcomes {dict(outcomes)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["slow-clients", "memory", "soak", "sigkill", "all"])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--seconds", type=float, default=None, help="slow-clients: 60, soak: 120")
    parser.add_argument("--clients", type=int, default=8, help="soak and sigkill client threads (default 8)")
    args = parser.parse_args()
    steps = {"slow-clients": (slow_clients, 60.0), "memory": (memory, 0.0), "soak": (soak, 120.0),
             "sigkill": (sigkill, 0.0)}
    chosen = list(steps) if args.what == "all" else [args.what]
    seconds = args.seconds
    for name in chosen:
        function, default_seconds = steps[name]
        args.seconds = seconds or default_seconds
        print(f"== {name}", flush=True)
        function(args)


if __name__ == "__main__":
    main()
