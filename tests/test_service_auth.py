"""Optional API keys: every route with no key, a wrong key and a right key; keys files; /metrics keys; the OpenAPI
document; and (under a real gunicorn) keys never reach the logs."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient
from gunicorn_process import GunicornServer
from upload_corpus import jpeg

from service.app import create_app
from service.auth import KeySet, read_keys_file
from service.config import load_settings
from service.routes.common import ENGINE_KEY

KEY = "k-3f9a1c2d7e"
OTHER = "k-second-key"
SCRAPER = "m-scraper-key"
OPEN = {"/healthz", "/readyz", "/", "/docs", "/openapi.json"}


def _request(client: FlaskClient, method: str, path: str, headers: dict[str, str]):
    if method == "POST":
        data = {"image": (io.BytesIO(jpeg()), "a.jpg")}
        query = "?strategy=greedy&max_length=3" if path.startswith("/v1/") else ""
        return client.post(path + query, data=data, headers=headers, content_type="multipart/form-data")
    return client.get(path, headers=headers)


def _routes(app: Flask) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, from its URL map (so a new route is covered by these tests)."""
    routes = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            routes.append((method, rule.rule))
    return routes


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path) -> Iterator[Flask]:
    app = create_app({"model": str(tiny_model_dir), "load_in_background": False, "api_keys": f"{KEY},{OTHER}",
                      "metrics_api_keys": SCRAPER})
    yield app
    app.extensions[ENGINE_KEY].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def test_every_route_with_no_key_a_wrong_key_and_a_right_key(app: Flask, client: FlaskClient) -> None:
    routes = _routes(app)
    assert ("POST", "/v1/captions") in routes and ("GET", "/metrics") in routes and len(routes) >= 10
    for method, path in routes:
        right = SCRAPER if path == "/metrics" else KEY
        wrong = KEY if path == "/metrics" else SCRAPER  # the other door's key is a wrong key here
        for headers, expect_ok in [
            ({}, False), ({"Authorization": "Bearer nope"}, False), ({"X-API-Key": wrong}, False),
            ({"Authorization": f"Basic {right}"}, False),
            ({"Authorization": f"Bearer {right}"}, True), ({"X-API-Key": right}, True),
            ({"authorization": f"bearer {right}"}, True),
        ]:
            response = _request(client, method, path, headers)
            if path in OPEN or expect_ok:
                assert response.status_code == 200, (method, path, headers, response.data[:200])
            else:
                assert response.status_code == 401, (method, path, headers, response.data[:200])
                assert response.headers["WWW-Authenticate"].startswith("Bearer")
                assert response.json["error"]["code"] == "unauthorized"
                assert response.headers["X-Request-ID"]
                if path == "/model/predict":
                    assert response.json["status"] == "error"  # MAX clients see their error shape
    assert _request(client, "POST", "/v1/captions", {"X-API-Key": OTHER}).status_code == 200  # either key works


def test_unknown_route_is_still_404(client: FlaskClient) -> None:
    assert client.get("/nope").status_code == 404


def test_keys_off_by_default(tiny_model_dir: Path) -> None:
    settings = load_settings({"model": str(tiny_model_dir)}, environ={})
    assert settings.api_keys == () and settings.api_keys_file is None
    app = create_app({"model": str(tiny_model_dir), "load_in_background": False})
    try:
        client = app.test_client()
        assert client.get("/metrics").status_code == 200
        assert _request(client, "POST", "/v1/captions", {}).status_code == 200
        assert "securitySchemes" not in client.get("/openapi.json").json["components"]
    finally:
        app.extensions[ENGINE_KEY].close()


def test_keys_from_environment_and_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# operators\nfile-key-1\n\n  file-key-2  # the CI runner\n")
    assert read_keys_file(keys_file) == ("file-key-1", "file-key-2")
    settings = load_settings(environ={"CAPTIONER_API_KEYS": " a-1 , b-2 ,", "CAPTIONER_API_KEYS_FILE": str(keys_file)})
    assert settings.api_keys == ("a-1", "b-2")
    assert KEY not in repr(settings) and "a-1" not in repr(settings) and "file-key" not in repr(settings)
    app = create_app({"model": str(tiny_model_dir), "load_in_background": False, "api_keys_file": str(keys_file)})
    try:
        client = app.test_client()
        assert client.get("/model/metadata", headers={"X-API-Key": "file-key-2"}).status_code == 200
        assert client.get("/model/metadata", headers={"X-API-Key": "operators"}).status_code == 401
        # no separate metrics keys: /metrics takes the API keys
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer file-key-1"}).status_code == 200
    finally:
        app.extensions[ENGINE_KEY].close()
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        create_app({"model": str(tiny_model_dir), "api_keys_file": str(tmp_path / "empty.txt")})
    with pytest.raises(ValueError, match="cannot read"):
        create_app({"model": str(tiny_model_dir), "api_keys_file": str(tmp_path / "missing.txt")})
    with pytest.raises(ValueError, match="printable ASCII"):
        create_app({"model": str(tiny_model_dir), "api_keys": ["has space"]})


def test_metrics_only_keys_protect_metrics_alone(tiny_model_dir: Path) -> None:
    app = create_app({"model": str(tiny_model_dir), "load_in_background": False, "metrics_api_keys": SCRAPER})
    try:
        client = app.test_client()
        assert _request(client, "POST", "/v1/captions", {}).status_code == 200
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"X-API-Key": SCRAPER}).status_code == 200
    finally:
        app.extensions[ENGINE_KEY].close()


def test_keyset_compares_every_key() -> None:
    keys = KeySet.of(("alpha", "beta"), "test")
    assert keys.accepts("beta") and keys.accepts("alpha")
    assert not keys.accepts("alph") and not keys.accepts("alphaa") and not keys.accepts("")
    assert not KeySet.of((), "test")


def test_openapi_declares_the_schemes(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").json
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"] == {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"}
    assert schemes["apiKey"]["in"] == "header" and schemes["apiKey"]["name"] == "X-API-Key"
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            if path in OPEN:
                assert operation["security"] == [], path
            else:
                assert operation["security"] == [{"bearer": []}, {"apiKey": []}], path
                assert "401" in operation["responses"], path


def test_web_page_can_send_a_key(client: FlaskClient) -> None:
    page = client.get("/").data.decode()
    script = client.get("/static/app.js").data.decode()
    assert 'id="api-key"' in page
    assert "Authorization" in script and "api-key" in script


def test_keys_never_reach_the_logs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A real gunicorn, requests with right, wrong and malformed keys: no key appears in the access or error log."""
    wrong = "wrong-key-7b2e9d"
    server = GunicornServer(tiny_model_dir, tmp_path, workers=1, threads=2,
                            env={"CAPTIONER_TORCH_THREADS": "1", "CAPTIONER_API_KEYS": KEY,
                                 "CAPTIONER_LOG_LEVEL": "debug"})
    try:
        server.wait_ready()
        headers = {"Content-Type": "image/jpeg"}
        for auth in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": KEY}, {"Authorization": f"Bearer {wrong}"},
                     {"X-API-Key": wrong}, {"Authorization": f"Basic {wrong}"}, {}):
            status = server.request("POST", "/v1/captions?strategy=greedy&max_length=3", jpeg(), headers | auth).status
            assert status == (200 if KEY in auth.get("Authorization", auth.get("X-API-Key", "")) else 401)
        assert server.request("GET", "/metrics", headers={"X-API-Key": wrong}).status == 401
        assert server.request("GET", "/metrics", headers={"X-API-Key": KEY}).status == 200
        assert server.request("GET", "/readyz").status == 200
    finally:
        server.stop()
    logs = server.stdout_path.read_text() + server.stderr_path.read_text()
    statuses = [entry["status"] for entry in server.access_log()]
    assert statuses.count(401) == 5 and statuses.count(200) >= 4  # the requests were logged...
    assert KEY not in logs and wrong not in logs  # ...without their keys
