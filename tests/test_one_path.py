"""One path through the code: every door gives the same captions and the same image errors.

The doors are the Python API (``Captioner.caption``), the batch command (the real ``captioner`` console script),
``POST /v1/captions`` (which the web page posts to), ``POST /v1/captions:batch`` and the MAX route
``POST /model/predict``. The model records non-default decoding options, so a door that fills in its own defaults
instead of the model's shows up as a different caption.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from conftest import varied_tiny_model
from flask import Flask
from PIL import Image

from captioner.api import Captioner
from captioner.caption_command import add_decoding_arguments
from captioner.checkpoint import save_model
from captioner.cli import main
from captioner.decoding import OPTION_SPECS, DecodingOptions, parse_option
from captioner.errors import ImageError
from service.app import create_app
from service.routes.common import ENGINE_KEY

VENV_BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
# Not DecodingOptions' defaults (beam 3, max length 20, no penalty, no blocking): the shipped model's kind of recipe.
RECORDED = {"beam_size": 5, "length_penalty": 1.0, "no_repeat_ngram_size": 3, "max_length": 12}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight model that records :data:`RECORDED` as its decoding defaults.

    Its encoder is calibrated so that different photos get different captions (see ``varied_tiny_model``).
    """
    model = varied_tiny_model()
    model.decoding = dict(RECORDED)
    return save_model(model, tmp_path_factory.mktemp("models") / "recorded")


@pytest.fixture(scope="module")
def captioner(model_dir: Path) -> Captioner:
    return Captioner.load(model_dir, allow_download=False)


@pytest.fixture(scope="module")
def app(model_dir: Path) -> Iterator[Flask]:
    app = create_app({"model": str(model_dir), "load_in_background": False})
    yield app
    app.extensions[ENGINE_KEY].close()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four random-noise photos, JPEG and PNG, of different sizes."""
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for seed, (fmt, size) in enumerate([("JPEG", (80, 60)), ("PNG", (64, 64)), ("JPEG", (50, 90)), ("PNG", (120, 40))]):
        pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        path = root / f"photo{seed}.{fmt.lower()}"
        Image.fromarray(pixels).save(path, format=fmt)
        paths.append(path)
    return paths


def _cli_captions(model_dir: Path, photos: list[Path], out: Path, *flags: str) -> list[str]:
    """The best captions from the real console script (a subprocess, JSON lines output), in input order."""
    proc = subprocess.run(
        [VENV_BIN / "captioner", "caption", *map(str, photos), "--model", str(model_dir), "--out", str(out),
         "--workers", "0", "--quiet", *flags],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )
    assert proc.returncode == 0, proc.stderr
    records = {r["image"]: r for r in map(json.loads, out.read_text().splitlines())}
    return [records[str(p)]["caption"] for p in photos]


def _http_captions(app: Flask, photos: list[Path], query: str = "") -> list[dict]:
    client = app.test_client()
    bodies = []
    for path in photos:
        response = client.post(f"/v1/captions{query}", data={"image": (io.BytesIO(path.read_bytes()), path.name)})
        assert response.status_code == 200, response.json
        bodies.append(response.json)
    return bodies


def test_every_door_uses_the_models_recorded_options(
    captioner: Captioner, app: Flask, model_dir: Path, photos: list[Path], tmp_path: Path
) -> None:
    api = [captions[0].text for captions in captioner.caption(photos)]
    # The test can tell doors apart: the recorded options give other captions than plain beam 3 (the old HTTP
    # defaults) and than greedy, and the photos get different captions.
    plain = [c[0].text for c in captioner.caption(photos, beam_size=3, max_length=20, length_penalty=0,
                                                  no_repeat_ngram_size=0)]
    assert api != plain and api != [c[0].text for c in captioner.caption(photos, strategy="greedy")]
    assert len(set(api)) > 1

    assert _cli_captions(model_dir, photos, tmp_path / "out.jsonl") == api

    bodies = _http_captions(app, photos)
    assert [body["captions"][0]["text"] for body in bodies] == api
    used = captioner.options()
    assert used == DecodingOptions(**RECORDED)
    expected_options = {"strategy": "beam", "beam_size": 5, "max_length": 12, "num_captions": 1,
                        "length_penalty": 1.0, "no_repeat_ngram_size": 3}
    assert all(body["options"] == expected_options for body in bodies)

    client = app.test_client()
    files = [(io.BytesIO(p.read_bytes()), p.name) for p in photos]
    batch = client.post("/v1/captions:batch", data={"image": files}).json
    assert [r["captions"][0]["text"] for r in batch["results"]] == api and batch["options"] == expected_options

    for path, text in zip(photos, api, strict=True):
        body = client.post("/model/predict", data={"image": (io.BytesIO(path.read_bytes()), path.name)}).json
        assert body["status"] == "ok" and body["predictions"][0]["caption"] == text


@pytest.mark.parametrize(
    ("options", "flags", "query"),
    [
        ({"strategy": "greedy"}, ["--strategy", "greedy"], "?strategy=greedy"),
        ({"beam_size": 2}, ["--beam-size", "2"], "?beam_size=2"),
        ({"beam_size": 4, "length_penalty": 0.0, "no_repeat_ngram_size": 2, "max_length": 9, "num_captions": 2},
         ["--beam-size", "4", "--length-penalty", "0", "--no-repeat-ngram-size", "2", "--max-length", "9",
          "--num-captions", "2"],
         "?beam_size=4&length_penalty=0&no_repeat_ngram_size=2&max_length=9&num_captions=2"),
    ],
    ids=["greedy", "beam2", "every-option"],
)
def test_explicit_options_give_the_same_captions_everywhere(
    captioner: Captioner, app: Flask, model_dir: Path, photos: list[Path], tmp_path: Path,
    options: dict, flags: list[str], query: str,
) -> None:
    api = captioner.caption(photos, **options)
    assert [c[0].text for c in api] != [c[0].text for c in captioner.caption(photos)]  # the options matter
    assert _cli_captions(model_dir, photos, tmp_path / "out.jsonl", *flags) == [c[0].text for c in api]
    bodies = _http_captions(app, photos, query)
    for body, captions in zip(bodies, api, strict=True):
        assert [c["text"] for c in body["captions"]] == [c.text for c in captions]
        assert [c["score"] for c in body["captions"]] == pytest.approx([c.score for c in captions], abs=1e-5)
        assert body["options"] == captioner.options(**options).to_json()


def test_the_web_page_sends_only_the_options_the_user_set(
    captioner: Captioner, app: Flask, photos: list[Path]
) -> None:
    """The page (service/static/app.js) in headless Chromium: it posts to /v1/captions with no decoding parameter
    but how many of the beams to list until the user changes a control, and shows the API's captions."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    queries: list[tuple[str, dict[str, list[str]]]] = []
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.on("request", lambda r: "/v1/" in r.url and queries.append(
                (urlsplit(r.url).path, parse_qs(urlsplit(r.url).query))))
            page.goto(f"http://127.0.0.1:{server.server_port}/")
            sync_api.expect(page.locator("#beam-size")).to_have_value("5")  # the model's recorded beam
            page.set_input_files("#file", str(photos[0]))
            sync_api.expect(page.locator("#status")).to_contain_text("beam size 5", timeout=30_000)
            shown = page.locator("#captions li .text").all_inner_texts()
            assert queries == [("/v1/captions", {"num_captions": ["3"]})]  # the route pinned above
            assert shown == [c.text for c in captioner.caption(photos[0], num_captions=3)[0]]

            page.fill("#beam-size", "2")
            page.locator("#beam-size").dispatch_event("change")
            sync_api.expect(page.locator("#status")).to_contain_text("beam size 2", timeout=30_000)
            assert queries[-1] == ("/v1/captions", {"beam_size": ["2"], "num_captions": ["2"]})
            shown = page.locator("#captions li .text").all_inner_texts()
            assert shown == [c.text for c in captioner.caption(photos[0], beam_size=2, num_captions=2)[0]]
            browser.close()
    finally:
        server.shutdown()
        thread.join(10)


# -- the same damaged files get the same error code from every door ---------------------------------------------


def _damaged() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the error code every door must report)."""
    jpeg, png = io.BytesIO(), io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(jpeg, "JPEG")
    Image.fromarray(pixels).save(png, "PNG")
    return {
        "truncated.jpg": (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "corrupt_image"),
        "header-only.jpg": (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "corrupt_image"),
        "truncated.png": (png.getvalue()[: len(png.getvalue()) // 2], "corrupt_image"),
        "signature-only.png": (png.getvalue()[:20], "corrupt_image"),
        "zero.png": (b"", "not_an_image"),
        "notes.jpg": (b"just some text, not a photo\n", "not_an_image"),
        "page.png": (b"<!doctype html><html><body>not an image</body></html>", "not_an_image"),
    }


def test_damaged_files_get_the_same_error_code_from_every_door(
    captioner: Captioner, app: Flask, model_dir: Path, tmp_path: Path
) -> None:
    damaged = _damaged()
    paths = []
    for name, (data, _) in damaged.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)

    out = tmp_path / "out.jsonl"
    assert main(["caption", *map(str, paths), "--model", str(model_dir), "--out", str(out), "--workers", "0",
                 "--quiet"]) == 1
    records = {Path(r["image"]).name: r for r in map(json.loads, out.read_text().splitlines())}

    client = app.test_client()
    for name, (data, code) in damaged.items():
        for source in (tmp_path / name, data):  # a path and the bytes
            with pytest.raises(ImageError) as caught:
                captioner.caption(source)
            assert caught.value.code == code, (name, source)
        assert records[name]["error"].split(":")[0] == code, records[name]
        response = client.post("/v1/captions", data={"image": (io.BytesIO(data), name)})
        assert response.json["error"]["code"] == code, (name, response.json)
        response = client.post("/v1/captions", data=data, content_type="application/octet-stream")
        if data:  # an empty raw body is "no image" (missing_image), as the README says
            assert response.json["error"]["code"] == code, (name, response.json)


# -- one parser and one list of options for every door ---------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("beam_size", "3", 3), ("beam_size", " 3 ", 3), ("beam_size", "10", 10), ("beam_size", "", None),
        ("beam_size", "1_0", ValueError), ("beam_size", "\u0661\u0660", ValueError), ("beam_size", "+3", ValueError),
        ("beam_size", "-1", ValueError), ("beam_size", "3.0", ValueError), ("beam_size", "11", ValueError),
        ("beam_size", "\uff13", ValueError), ("max_length", "50", 50), ("max_length", "0", ValueError),
        ("length_penalty", "0.5", 0.5), ("length_penalty", "1", 1.0), ("length_penalty", ".5", 0.5),
        ("length_penalty", "1e0", ValueError), ("length_penalty", "nan", ValueError),
        ("length_penalty", "inf", ValueError), ("length_penalty", "2.5", ValueError),
        ("length_penalty", "\u0661", ValueError), ("no_repeat_ngram_size", "0", 0),
        ("strategy", " Greedy ", "greedy"), ("strategy", "sample", ValueError), ("beams", "3", ValueError),
    ],
)
def test_one_strict_parser(name: str, text: str, value: object) -> None:
    """ASCII digits only: Python's int() would take 1_0, +3 and Arabic-Indic or full-width digits."""
    if value is ValueError:
        with pytest.raises(ValueError, match=name):
            parse_option(name, text)
    else:
        assert parse_option(name, text) == value


@pytest.mark.parametrize("text", ["1_0", "\u0661\u0660", "+3", "3.0", "0", "11"])
def test_http_and_cli_refuse_the_same_numbers(app: Flask, model_dir: Path, photos: list[Path], text: str,
                                              capsys: pytest.CaptureFixture) -> None:
    response = app.test_client().post("/v1/captions", query_string={"beam_size": text},
                                      data={"image": (io.BytesIO(photos[0].read_bytes()), "a.jpg")})
    assert response.status_code == 400 and response.json["error"]["code"] == "invalid_parameter"
    assert "beam_size" in response.json["error"]["message"]
    with pytest.raises(SystemExit) as exited:
        main(["caption", str(photos[0]), "--model", str(model_dir), "--beam-size", text])
    assert exited.value.code == 2 and "beam_size must be a whole number from 1 to 10" in capsys.readouterr().err


def test_http_and_cli_accept_the_same_spellings(app: Flask, captioner: Captioner, photos: list[Path]) -> None:
    expected = captioner.caption(photos[0], beam_size=2)[0][0].text
    for text in ("2", " 2", "2 ", "02"):
        response = app.test_client().post("/v1/captions", query_string={"beam_size": text},
                                          data={"image": (io.BytesIO(photos[0].read_bytes()), "a.jpg")})
        assert response.json["captions"][0]["text"] == expected and response.json["options"]["beam_size"] == 2


def test_cli_flags_and_openapi_read_the_one_list_of_options(app: Flask) -> None:
    parser = argparse.ArgumentParser()
    add_decoding_arguments(parser)
    flags = {a.dest: a for a in parser._actions if a.dest != "help"}
    assert list(flags) == [spec.name for spec in OPTION_SPECS]
    spec_doc = app.test_client().get("/openapi.json").json
    parameters = {p["name"]: p for p in spec_doc["paths"]["/v1/captions"]["post"]["parameters"]}
    assert list(parameters) == [spec.name for spec in OPTION_SPECS]
    for spec in OPTION_SPECS:
        assert flags[spec.name].option_strings == [spec.flag] and flags[spec.name].default is None
        assert spec.help in flags[spec.name].help and spec.help in parameters[spec.name]["description"]
        schema = parameters[spec.name]["schema"]
        if spec.choices:
            assert tuple(flags[spec.name].choices) == spec.choices and tuple(schema["enum"]) == spec.choices
        else:
            assert (schema["minimum"], schema["maximum"]) == (spec.low, spec.high)
            assert "default" not in schema  # not given = the model's recorded value, whatever the model
    assert set(spec_doc["components"]["schemas"]["Options"]["properties"]) == {s.name for s in OPTION_SPECS}


def test_max_route_lists_up_to_three_of_the_models_own_captions(tmp_path: Path, photos: list[Path]) -> None:
    """/model/predict keeps MAX's shape (top 3) but decodes with the model's options: a greedy model gives one."""
    model = varied_tiny_model()
    model.decoding = {"strategy": "greedy", "max_length": 7}
    greedy_dir = save_model(model, tmp_path / "greedy")
    app = create_app({"model": str(greedy_dir), "load_in_background": False, "batching": False})
    try:
        data = photos[1].read_bytes()
        body = app.test_client().post("/model/predict", data={"image": (io.BytesIO(data), "a.png")}).json
        expected = Captioner.load(greedy_dir, allow_download=False).caption(data)[0]
        assert [p["caption"] for p in body["predictions"]] == [c.text for c in expected] and len(expected) == 1
    finally:
        app.extensions[ENGINE_KEY].close()
