"""The HTTP service under a real gunicorn (1 worker, tiny model): the bad-upload corpus, batching, ids, shutdown."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gunicorn_process import GunicornServer
from upload_corpus import CASES, Case, Request, jpeg, multipart, upload

ENV = {"CAPTIONER_TORCH_THREADS": "1"}  # the CI machine is small and shared


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GunicornServer]:
    """One gunicorn master + 1 gthread worker (4 threads) with the tiny model, stopped after this module."""
    server = GunicornServer(tiny_model_dir, tmp_path_factory.mktemp("gunicorn"), workers=1, threads=4, env=ENV)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def _good(server: GunicornServer) -> dict:
    """A cheap good request; the worker must still answer it."""
    response = server.request("POST", "/v1/captions?strategy=greedy&max_length=3", jpeg(),
                              {"Content-Type": "image/jpeg"})
    assert response.status == 200, response.body
    return response.json()


def _worker_pids(server: GunicornServer) -> list[str]:
    return re.findall(r"Booting worker with pid: (\d+)", server.stderr_path.read_text())


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_upload_corpus(server: GunicornServer, case: Case) -> None:
    request = case.build()
    response = server.request(request.method, request.path, request.body, request.all_headers())
    assert response.status == case.status, (case.description, response.body[:300])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    if case.code is None:
        assert body["captions"] and all(c["text"] for c in body["captions"])
        if case.check:
            case.check(body)
    else:
        assert set(body) >= {"error"} and set(body["error"]) == {"code", "message"}, body
        assert body["error"]["code"] == case.code, body
    _good(server)  # the worker keeps serving after every case


def test_worker_survived_the_corpus(server: GunicornServer) -> None:
    _good(server)
    assert len(_worker_pids(server)) == 1, "the worker was restarted"
    metrics = server.request("GET", "/metrics").body.decode()
    assert 'status="500"' not in metrics
    assert "Traceback" not in server.stderr_path.read_text()


def test_concurrent_requests_are_batched_and_match_sequential(server: GunicornServer) -> None:
    queries = [
        "strategy=greedy", "strategy=beam&beam_size=3&num_captions=2", "strategy=beam&beam_size=5&num_captions=5",
        "strategy=greedy&max_length=4", "strategy=beam&beam_size=2&max_length=6", "strategy=beam&beam_size=10",
        "strategy=greedy&max_length=50", "strategy=beam&beam_size=4&num_captions=3&max_length=9",
    ]

    def caption(query: str) -> list[tuple[str, float]]:
        response = server.request("POST", f"/v1/captions?{query}", jpeg(), {"Content-Type": "image/jpeg"})
        assert response.status == 200, response.body
        return [(c["text"], c["log_prob"]) for c in response.json()["captions"]]

    def batches() -> tuple[float, float]:
        text = server.request("GET", "/metrics").body.decode()
        count = float(re.search(r"^captioner_batch_size_count (\S+)", text, re.M).group(1))
        size_one = float(re.search(r'^captioner_batch_size_bucket\{le="1.0"\} (\S+)', text, re.M).group(1))
        return count, size_one

    sequential = [caption(query) for query in queries]
    before = batches()
    with ThreadPoolExecutor(len(queries)) as pool:
        for _ in range(3):  # a few rounds, so some requests surely meet in a batch
            concurrent = list(pool.map(caption, queries))
            for got, expected in zip(concurrent, sequential, strict=True):
                assert [text for text, _ in got] == [text for text, _ in expected]
                assert [lp for _, lp in got] == pytest.approx([lp for _, lp in expected], abs=1e-4)
    after = batches()
    multi_image_batches = (after[0] - after[1]) - (before[0] - before[1])
    assert multi_image_batches >= 1, "no batch of more than one image under concurrency"


def test_batch_route_mixes_good_and_bad_images(server: GunicornServer) -> None:
    request = multipart([
        ("image", "a.jpg", jpeg(), "image/jpeg"),
        ("image", "b.txt", b"not an image", "text/plain"),
        ("image", "c.jpg", jpeg()[:300], "image/jpeg"),
        ("image", "d.jpg", jpeg(), "image/jpeg"),
    ])
    response = server.request("POST", "/v1/captions:batch?strategy=greedy", request.body, request.all_headers())
    assert response.status == 200, response.body
    results = response.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert [r["filename"] for r in results] == ["a.jpg", "b.txt", "c.jpg", "d.jpg"]
    assert results[0]["captions"] and results[3]["captions"]
    assert results[1]["error"]["status"] == 415 and results[2]["error"]["status"] == 422


def test_max_compatible_routes(server: GunicornServer) -> None:
    request = upload(jpeg(), path="/model/predict")
    response = server.request("POST", request.path, request.body, request.all_headers())
    assert response.status == 200, response.body
    body = response.json()
    assert body["status"] == "ok"
    assert [p["index"] for p in body["predictions"]] == ["0", "1", "2"]
    assert all(isinstance(p["caption"], str) and 0 <= p["probability"] <= 1 for p in body["predictions"])
    metadata = server.request("GET", "/model/metadata").json()
    assert set(metadata) == {"id", "name", "description", "type", "license", "source"}


def test_request_id_is_echoed_and_logged(server: GunicornServer) -> None:
    response = server.request("GET", "/healthz", headers={"X-Request-ID": "test-id-42"})
    assert response.headers["x-request-id"] == "test-id-42"
    generated = server.request("GET", "/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    replaced = server.request("GET", "/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        entries = [e for e in server.access_log() if e.get("request_id") == "test-id-42"]
        if entries:
            break
        time.sleep(0.1)
    assert entries and entries[0]["path"] == "/healthz" and entries[0]["status"] == 200
    assert {"ts", "level", "method", "duration_ms"} <= set(entries[0])


@pytest.mark.parametrize("kind", ["raw", "multipart"])
def test_chunked_body_over_the_limit_is_413(server: GunicornServer, kind: str) -> None:
    """No Content-Length to check up front: the limit is enforced while reading."""
    payload = b"\xff\xd8\xff" + bytes(12 * 1024 * 1024)
    request = upload(payload) if kind == "multipart" else Request(payload, "image/jpeg")
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    chunks = (request.body[i : i + 1024 * 1024] for i in range(0, len(request.body), 1024 * 1024))
    try:
        connection.request("POST", "/v1/captions", body=chunks, headers=request.all_headers(), encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413
        assert b"payload_too_large" in response.read()
    finally:
        connection.close()
    _good(server)


def raw_exchange(host: str, port: int, data: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the server closes): status, lower-case headers, body."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


# Requests gunicorn refuses before Flask sees them: each answer is the API's JSON error, not an HTML page.
MALFORMED = {
    "bad_content_length": (b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n", 400),
    "two_content_lengths": (b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n"
                            b"\r\nab", 400),
    "bad_chunk_size": (b"POST /v1/captions HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    "uri_too_long": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "too_many_headers": (b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(150))
                         + b"\r\n", 431),
    "header_too_large": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n", 431),
    "bad_request_line": (b"GARBAGE\r\n\r\n", 400),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_errors_gunicorn_answers_itself_are_json(server: GunicornServer, name: str) -> None:
    data, status = MALFORMED[name]
    got, headers, body = raw_exchange(server.host, server.port, data)
    assert got == status, body[:200]
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message"} and error["code"] and error["message"]
    _good(server)


def test_too_many_form_parts_get_an_accurate_413(server: GunicornServer) -> None:
    """1,001 small form fields (about 129 kB, far under the body limit): the message names the parts limit."""
    fields = [(f"f{i}", None, b"x" * 20, None) for i in range(1001)]
    request = multipart([("image", "a.jpg", jpeg(), "image/jpeg"), *fields])
    assert len(request.body) < 200_000
    response = server.request("POST", request.path, request.body, request.all_headers())
    assert response.status == 413
    error = response.json()["error"]
    assert error["code"] == "too_many_parts" and "64 parts" in error["message"], error
    assert "body" not in error["message"]
    _good(server)


def test_oversized_form_field_gets_an_accurate_413(server: GunicornServer) -> None:
    """A 600 kB text field in a 610 kB body (under the 10 MiB body limit): the message names the field limit."""
    request = multipart([("image", "a.jpg", jpeg(), "image/jpeg"), ("strategy", None, b"g" * 600_000, None)])
    response = server.request("POST", request.path, request.body, request.all_headers())
    assert response.status == 413
    error = response.json()["error"]
    assert error["code"] == "form_field_too_large" and "500000 bytes" in error["message"], error
    _good(server)


def test_sigterm_lets_an_in_flight_request_finish(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A request whose body is still arriving when the master gets SIGTERM is answered, then gunicorn exits."""
    server = GunicornServer(tiny_model_dir, tmp_path, workers=1, threads=2, graceful_timeout=20, env=ENV)
    try:
        server.wait_ready()
        request = upload(jpeg(), query="strategy=greedy")
        half = len(request.body) // 2
        sock = http.client.HTTPConnection(server.host, server.port, timeout=30)
        sock.putrequest("POST", request.path)
        for name, value in request.all_headers().items():
            sock.putheader(name, value)
        sock.putheader("Content-Length", str(len(request.body)))
        sock.endheaders(request.body[:half])
        time.sleep(0.5)  # the worker is now reading the body
        server.signal(signal.SIGTERM)
        time.sleep(1.0)
        assert server.process.poll() is None, "gunicorn exited with a request in flight"
        sock.send(request.body[half:])
        response = sock.getresponse()
        assert response.status == 200, response.read()
        assert b"captions" in response.read()
        sock.close()
        done = threading.Event()
        threading.Thread(target=lambda: (server.process.wait(30), done.set()), daemon=True).start()
        assert done.wait(30), "gunicorn did not exit after the in-flight request finished"
        assert server.process.returncode == 0
    finally:
        server.stop()
