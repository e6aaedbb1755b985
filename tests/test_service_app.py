"""The HTTP service in-process (Flask test client): settings, routes, docs, readiness, micro-batching."""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from flask import Flask
from flask.testing import FlaskClient
from upload_corpus import jpeg, png

from captioner.api import Captioner
from captioner.errors import CheckpointError
from captioner.preprocess import known_signature
from service.app import create_app
from service.config import SETTINGS, Settings, load_settings
from service.microbatch import MicroBatcher
from service.routes.common import ENGINE_KEY

STATIC = Path(__file__).resolve().parents[1] / "service" / "static"


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path) -> Iterator[Flask]:
    app = create_app({"model": str(tiny_model_dir), "load_in_background": False})
    yield app
    app.extensions[ENGINE_KEY].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def captioner(tiny_model_dir: Path) -> Captioner:
    return Captioner.load(tiny_model_dir, allow_download=False)


# -- settings ------------------------------------------------------------------------------------------------------


def test_settings_defaults_env_and_config() -> None:
    assert load_settings(environ={}) == Settings()
    env = {"CAPTIONER_BATCHING": "off", "CAPTIONER_BATCH_MAX_SIZE": "4", "CAPTIONER_BATCH_MAX_WAIT_MS": "2.5",
           "CAPTIONER_MAX_UPLOAD_BYTES": "1_000_000", "CAPTIONER_MODEL": "/m"}
    settings = load_settings(environ=env)
    assert (settings.batching, settings.batch_max_size, settings.batch_max_wait_ms) == (False, 4, 2.5)
    assert (settings.max_upload_bytes, settings.model) == (1_000_000, "/m")
    assert load_settings({"batch_max_size": 8}, environ=env).batch_max_size == 8  # config wins over env
    with pytest.raises(ValueError, match="CAPTIONER_BATCHING"):
        load_settings(environ={"CAPTIONER_BATCHING": "maybe"})
    with pytest.raises(ValueError, match="unknown service settings"):
        load_settings({"batch_size": 3}, environ={})
    with pytest.raises(ValueError, match="max_batch_files"):
        load_settings(environ={"CAPTIONER_MAX_BATCH_FILES": "0"})


def test_every_setting_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert {s.name for s in SETTINGS} == set(Settings.__dataclass_fields__)
    missing = [s.env for s in SETTINGS if s.env not in readme]
    assert not missing, f"README lacks {missing}"


def test_serve_command_is_registered() -> None:
    from captioner.cli import build_parser
    from service import serve_command as cli

    args = build_parser().parse_args(["serve", "--model", "m", "--port", "9001", "--no-batching"])
    assert (args.run, args.model, args.port, args.host, args.no_batching) == (cli.run, "m", 9001, "127.0.0.1", True)


def test_missing_model_dir_fails_at_once(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError):
        create_app({"model": str(tmp_path / "nope")})


# -- routes --------------------------------------------------------------------------------------------------------


def test_caption_response_shape(client: FlaskClient) -> None:
    response = client.post("/v1/captions?num_captions=2", data={"image": (io.BytesIO(jpeg()), "a.jpg")})
    assert response.status_code == 200, response.json
    body = response.json
    assert set(body) == {"captions", "model", "options", "image", "batch_size", "timing_ms"}
    assert len(body["captions"]) == 2
    for caption in body["captions"]:
        assert set(caption) == {"text", "log_prob", "probability", "score"} and caption["text"]
        assert caption["probability"] == pytest.approx(2.718281828 ** caption["log_prob"], rel=1e-6)
    assert body["model"] == {"name": "tiny", "version": "test"}
    # The options used: the tiny model records none, so DecodingOptions' defaults, and the request's num_captions.
    assert body["options"] == {"strategy": "beam", "beam_size": 3, "max_length": 20, "num_captions": 2,
                               "length_penalty": 0.0, "no_repeat_ngram_size": 0}
    assert body["image"] == {"format": "JPEG", "width": 96, "height": 64}
    assert set(body["timing_ms"]) == {"preprocess", "queue", "inference", "total"}


def test_same_captions_as_the_python_api(client: FlaskClient, captioner: Captioner) -> None:
    for strategy, num in (("greedy", 1), ("beam", 3)):
        body = client.post(f"/v1/captions?strategy={strategy}&beam_size=3&num_captions={num}", data=png(),
                           content_type="image/png").json
        expected = captioner.caption(png(), strategy=strategy, beam_size=3, num_captions=num)[0]
        assert [c["text"] for c in body["captions"]] == [c.text for c in expected]
        assert [c["log_prob"] for c in body["captions"]] == pytest.approx([c.log_prob for c in expected], abs=1e-5)


def test_404_and_405_are_json(client: FlaskClient) -> None:
    response = client.get("/v2/anything")
    assert response.status_code == 404 and response.json["error"]["code"] == "not_found"
    response = client.delete("/v1/captions")
    assert response.status_code == 405 and response.json["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["Allow"]


def test_upload_limits_follow_the_settings(tiny_model_dir: Path) -> None:
    app = create_app({"model": str(tiny_model_dir), "load_in_background": False, "max_upload_bytes": 100_000,
                      "max_pixels": 1000, "batching": False})
    client = app.test_client()
    response = client.post("/v1/captions", data=b"\xff" * 100_001, content_type="image/jpeg")
    assert response.status_code == 413 and response.json["error"]["code"] == "payload_too_large"
    response = client.post("/v1/captions", data=jpeg(), content_type="image/jpeg")  # 96x64 = 6144 pixels
    assert response.status_code == 413 and response.json["error"]["code"] == "image_too_large"


def test_batch_route(client: FlaskClient) -> None:
    files = [(io.BytesIO(jpeg()), "a.jpg"), (io.BytesIO(b"GIF89a-broken"), "b.gif"), (io.BytesIO(png()), "c.png")]
    response = client.post("/v1/captions:batch?strategy=beam&num_captions=2", data={"image": files})
    assert response.status_code == 200
    results = response.json["results"]
    assert [len(r.get("captions", [])) for r in results] == [2, 0, 2]
    assert results[1]["error"] == {"code": "corrupt_image", "message": results[1]["error"]["message"], "status": 422}
    response = client.post("/v1/captions:batch", data={"file": (io.BytesIO(jpeg()), "a.jpg")})
    assert response.status_code == 400 and response.json["error"]["code"] == "missing_image"


def test_max_routes(client: FlaskClient) -> None:
    response = client.post("/model/predict", data={"image": (io.BytesIO(jpeg()), "a.jpg")})
    assert response.status_code == 200
    assert [p["index"] for p in response.json["predictions"]] == ["0", "1", "2"]
    response = client.post("/model/predict", data={"image": (io.BytesIO(b"text"), "a.jpg")})
    assert response.status_code == 415
    assert response.json["status"] == "error" and response.json["error"]["code"] == "not_an_image"
    assert client.get("/model/metadata").json["type"] == "Image-to-Text Translation"


def test_health_ready_metrics(client: FlaskClient) -> None:
    assert client.get("/healthz").json == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json["status"] == "ready"
    client.post("/v1/captions", data=jpeg(), content_type="image/jpeg")
    text = client.get("/metrics").get_data(as_text=True)
    for name in ("captioner_http_requests_total", "captioner_http_request_duration_seconds_bucket",
                 "captioner_http_requests_in_flight", "captioner_inference_seconds_bucket",
                 "captioner_batch_size_bucket", "captioner_queue_wait_seconds_bucket", "captioner_images_total",
                 "captioner_preprocess_seconds_bucket", "captioner_model_ready"):
        assert name in text, name
    assert re.search(r'captioner_http_requests_total\{method="POST",route="/v1/captions",status="200"\}', text)


def test_request_id(client: FlaskClient) -> None:
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", client.get("/healthz", headers={"X-Request-ID": "x" * 200}).headers[
        "X-Request-ID"])


def test_not_ready_until_the_model_is_loaded(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_load = Captioner.load

    def slow_load(*args: object, **kwargs: object) -> Captioner:
        assert release.wait(30)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(Captioner, "load", slow_load)
    app = create_app({"model": str(tiny_model_dir), "load_in_background": True})
    client = app.test_client()
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json["error"]["code"] == "not_ready"
    response = client.post("/v1/captions", data=jpeg(), content_type="image/jpeg")
    assert response.status_code == 503 and response.headers["Retry-After"]
    release.set()
    engine = app.extensions[ENGINE_KEY]
    assert engine.wait_ready(60)
    assert client.get("/readyz").status_code == 200
    assert client.post("/v1/captions", data=jpeg(), content_type="image/jpeg").status_code == 200
    engine.close()


def test_failed_load_is_reported(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> Captioner:
        raise RuntimeError("weights are gone")

    monkeypatch.setattr(Captioner, "load", broken)
    app = create_app({"model": str(tiny_model_dir), "load_in_background": True})
    engine = app.extensions[ENGINE_KEY]
    for _ in range(100):
        if engine.error:
            break
        threading.Event().wait(0.05)
    response = app.test_client().get("/readyz")
    assert response.status_code == 503 and response.json["status"] == "failed"
    assert "weights are gone" in response.json["error"]["message"]


# -- docs and pages ------------------------------------------------------------------------------------------------


def test_openapi_documents_every_route(app: Flask, client: FlaskClient) -> None:
    spec = client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        assert rule.rule in spec["paths"], rule.rule
        methods = set(rule.methods or ()) - {"HEAD", "OPTIONS"}
        assert {m.upper() for m in spec["paths"][rule.rule]} == methods, rule.rule
    refs = set(re.findall(r'"\$ref": "#/components/schemas/(\w+)"', client.get("/openapi.json").get_data(as_text=True)
                          .replace('"$ref":"', '"$ref": "')))
    assert refs and refs <= set(spec["components"]["schemas"])


@pytest.mark.parametrize("path", ["/", "/docs"])
def test_pages_are_self_contained(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    for src in re.findall(r'(?:src|href)="([^"]+)"', response.get_data(as_text=True)):
        assert src.startswith(("/", "#", "data:")), src
        if src.startswith("/static/"):
            assert client.get(src).status_code == 200, src
    for file in STATIC.iterdir():
        assert not re.search(r"https?://", file.read_text()), f"{file.name} refers to an external resource"


# -- micro-batching ------------------------------------------------------------------------------------------------


def _tensors(captioner: Captioner, count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = captioner.preprocess_config.size
    return [torch.randn(3, size, size, generator=generator) for _ in range(count)]


def test_per_image_options_match_one_by_one(captioner: Captioner) -> None:
    tensors = _tensors(captioner, 5)
    options = [captioner.options(strategy="greedy"), captioner.options(beam_size=3, num_captions=2),
               captioner.options(strategy="greedy", max_length=3), captioner.options(beam_size=3, num_captions=2),
               captioner.options(beam_size=5, num_captions=5, max_length=6)]
    mixed = captioner.caption_tensors(torch.stack(tensors), options)
    for tensor, opts, got in zip(tensors, options, mixed, strict=True):
        expected = captioner.caption_tensors(tensor.unsqueeze(0), opts)[0]
        assert [c.text for c in got] == [c.text for c in expected]
        assert [c.log_prob for c in got] == pytest.approx([c.log_prob for c in expected], abs=1e-5)


def test_micro_batcher_groups_concurrent_requests(captioner: Captioner) -> None:
    sizes: list[int] = []
    batcher = MicroBatcher(captioner, max_size=8, max_wait_ms=2000, observer=lambda n, s: sizes.append(n))
    tensors = _tensors(captioner, 4)
    options = [captioner.options(strategy="greedy"), captioner.options(beam_size=2, num_captions=2),
               captioner.options(beam_size=4, max_length=5), captioner.options(strategy="greedy", max_length=2)]
    results: list = [None] * 4
    try:
        with batcher.expecting(4) as ticket:  # four images announced: the batch waits for all of them

            def submit(i: int) -> None:
                results[i] = batcher.submit(tensors[i], options[i], ticket).result(10)

            threads = [threading.Thread(target=submit, args=(i,)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
        assert sizes == [4]
        for tensor, opts, result in zip(tensors, options, results, strict=True):
            assert result.batch_size == 4
            assert [c.text for c in result.captions] == [
                c.text for c in captioner.caption_tensors(tensor.unsqueeze(0), opts)[0]]
        # A lone request is not held back waiting for company.
        single = batcher.submit(tensors[0], options[0]).result(10)
        assert single.batch_size == 1 and single.queue_ms < 1000
    finally:
        batcher.close()


def test_micro_batcher_respects_max_size_and_survives_errors(captioner: Captioner) -> None:
    sizes: list[int] = []
    batcher = MicroBatcher(captioner, max_size=2, max_wait_ms=500, observer=lambda n, s: sizes.append(n))
    try:
        with batcher.expecting(5) as ticket:
            futures = [batcher.submit(t, captioner.options(strategy="greedy"), ticket) for t in _tensors(captioner, 5)]
        assert all(f.result(10).captions for f in futures)
        assert max(sizes) == 2 and sum(sizes) == 5
        bad = batcher.submit(torch.zeros(1, 2, 3), captioner.options())  # wrong shape: the model raises
        with pytest.raises(RuntimeError):
            bad.result(10)
        assert batcher.submit(_tensors(captioner, 1)[0], captioner.options()).result(10).captions
    finally:
        batcher.close()


def test_known_signature() -> None:
    assert known_signature(png()[:10]) == "PNG"
    assert known_signature(jpeg()[:3]) == "JPEG"
    assert known_signature(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "WebP"
    assert known_signature(b"hello") is None
