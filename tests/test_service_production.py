"""``captioner serve --production``: nginx in front of gunicorn, for real (skipped without nginx). JSON errors from
nginx too, slow clients do not slow a normal client down, and both processes stop together."""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from production_stack import CAPTIONER, ProductionStack, SlowClients, alive, descendants
from upload_corpus import jpeg, multipart

from service.production import nginx_binary

needs_nginx = pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (apt-get install nginx)")

CAPTION = "/v1/captions?strategy=greedy&max_length=3"


def test_bad_bind_is_one_line_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run([str(CAPTIONER), "serve", "--production", "--bind", "no-port"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and ("HOST:PORT" in lines[0] or "nginx is not installed" in lines[0]), result.stderr


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProductionStack]:
    stack = ProductionStack(tiny_model_dir, tmp_path_factory.mktemp("production"))
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


def _caption(stack: ProductionStack) -> float:
    started = time.perf_counter()
    status, body = stack.request("POST", CAPTION, jpeg(), {"Content-Type": "image/jpeg"})
    assert status == 200, body[:200]
    return time.perf_counter() - started


def _raw(stack: ProductionStack, data: bytes) -> tuple[int, str, bytes]:
    with socket.create_connection((stack.host, stack.port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
            if b"\r\n\r\n" in received and b'"}}' in received:
                break
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    content_type = next((line.split(": ", 1)[1] for line in lines if line.lower().startswith("content-type:")), "")
    return int(lines[0].split()[1]), content_type, body


@needs_nginx
def test_serves_through_nginx(stack: ProductionStack) -> None:
    _caption(stack)
    status, body = stack.request("GET", "/readyz")
    assert status == 200 and b"ready" in body


@needs_nginx
@pytest.mark.parametrize(("data", "status", "code"), [
    (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 40000 + b"\r\n\r\n", 431, "headers_too_large"),
    (b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 60000000\r\n\r\n",
     413, "payload_too_large"),
    (b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n", 400, "bad_request"),
], ids=["bad_request_line", "uri_too_long", "header_too_large", "body_over_limit", "bad_content_length"])
def test_errors_nginx_answers_are_json(stack: ProductionStack, data: bytes, status: int, code: str) -> None:
    got, content_type, body = _raw(stack, data)
    assert (got, content_type) == (status, "application/json"), body[:300]
    assert f'"code": "{code}"'.encode() in body, body[:300]


@needs_nginx
def test_app_errors_pass_through_nginx(stack: ProductionStack) -> None:
    request = multipart([("image", "a.jpg", jpeg(), "image/jpeg")] + [(f"f{i}", None, b"x", None) for i in range(100)])
    status, body = stack.request("POST", request.path, request.body, request.all_headers())
    assert status == 413 and b"too_many_parts" in body
    status, body = stack.request("GET", "/nope")
    assert status == 404 and b"not_found" in body


@needs_nginx
def test_slow_clients_do_not_starve_the_service(stack: ProductionStack) -> None:
    """64 slow-header and 16 slow-body connections for 15 s: a normal client's median latency stays within 2x its
    idle median, and /readyz answers throughout (the 60 s version is benchmarks/hardening.py slow-clients)."""
    for _ in range(3):
        _caption(stack)  # warm
    idle = statistics.median(_caption(stack) for _ in range(20))
    loaded: list[float] = []
    with SlowClients(stack.host, stack.port, headers=64, bodies=16, interval=1.0):
        time.sleep(2.0)  # let every slow connection open
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            loaded.append(_caption(stack))
            assert stack.request("GET", "/readyz", timeout=5)[0] == 200
    assert len(loaded) >= 20
    assert statistics.median(loaded) <= 2 * idle, (statistics.median(loaded), idle)


@needs_nginx
def test_sigterm_stops_nginx_and_gunicorn_together(tiny_model_dir: Path, tmp_path: Path) -> None:
    stack = ProductionStack(tiny_model_dir, tmp_path)
    try:
        stack.wait_ready()
        processes = descendants(stack.process.pid)
        pids = stack.child_pids()
        assert set(pids.values()) <= processes and len(processes) >= 4  # 2 masters, their workers
    finally:
        status = stack.stop(signal.SIGTERM)
    assert status == 0, stack.log_path.read_text()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in processes if alive(pid)], "processes left behind"
    prefix = Path(re.search(r"on (\S+)/gunicorn\.sock", stack.log_path.read_text()).group(1))
    assert not prefix.exists(), "the temporary nginx prefix was left behind"


@needs_nginx
def test_when_gunicorn_dies_the_stack_stops(tiny_model_dir: Path, tmp_path: Path) -> None:
    stack = ProductionStack(tiny_model_dir, tmp_path)
    try:
        stack.wait_ready()
        processes = descendants(stack.process.pid)
        os.kill(stack.child_pids()["gunicorn"], signal.SIGKILL)
        stack.process.wait(60)
    finally:
        status = stack.stop()
    assert status != 0
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in processes) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in processes if alive(pid)], "processes left behind"
    assert "gunicorn exited" in stack.log_path.read_text()
