"""The web page in a real headless browser (Debian's chromium driven by playwright); skipped without chromium."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from upload_corpus import _photo, _save

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    """The app on Werkzeug's threaded server in a background thread, on a free loopback port."""
    from werkzeug.serving import make_server

    from service.app import create_app

    app = create_app({"model": str(tiny_model_dir), "load_in_background": False})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: object, base_url: str) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1100, "height": 720})  # type: ignore[attr-defined]
    page = context.new_page()
    page.errors = []  # console errors (CSP violations included) and requests to anywhere but this server
    page.on("console", lambda msg: msg.type == "error" and page.errors.append(msg.text))
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    page.on("request", lambda req: req.url.startswith((base_url, "data:", "blob:")) or page.errors.append(req.url))
    yield page
    context.close()


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("photos") / "photo.jpg"
    path.write_bytes(_save(_photo(320, 240), "JPEG"))
    return path


def test_pick_a_photo_and_switch_strategy(page: object, base_url: str, photo: Path, tmp_path: Path) -> None:
    page.goto(base_url + "/")  # type: ignore[attr-defined]
    expect(page.locator("#model")).to_contain_text("tiny")  # type: ignore[attr-defined]
    page.set_input_files("#file", str(photo))  # type: ignore[attr-defined]
    page.wait_for_selector("#captions li")  # type: ignore[attr-defined]
    expect(page.locator("#captions li")).to_have_count(3)  # type: ignore[attr-defined]  # beam: 3 captions
    assert page.locator("#captions li .text").first.inner_text().strip()  # type: ignore[attr-defined]
    assert page.locator("#preview").is_visible()  # type: ignore[attr-defined]
    assert "320×240" in page.locator("#status").inner_text()  # type: ignore[attr-defined]
    page.screenshot(path=str(tmp_path / "beam.png"))  # type: ignore[attr-defined]

    page.check("#strategy-greedy")  # type: ignore[attr-defined]
    expect(page.locator("#status")).to_contain_text("greedy")  # type: ignore[attr-defined]
    expect(page.locator("#captions li")).to_have_count(1)  # type: ignore[attr-defined]
    assert page.locator("#beam-size").is_disabled()  # type: ignore[attr-defined]
    page.screenshot(path=str(tmp_path / "greedy.png"))  # type: ignore[attr-defined]
    assert page.errors == []  # type: ignore[attr-defined]


def test_captions_show_the_ranking_score_best_first(page: object, base_url: str, photo: Path) -> None:
    """With a score per caption, the page lists the captions by it, best first, beside the probability; without one
    (a server that sends none) it keeps the server's best-first order and shows log p."""
    import json
    import math

    page.goto(base_url + "/")  # type: ignore[attr-defined]
    page.set_input_files("#file", str(photo))  # type: ignore[attr-defined]
    expect(page.locator("#captions li")).to_have_count(3)  # type: ignore[attr-defined]
    plain = page.locator("#captions li .prob").all_inner_texts()  # type: ignore[attr-defined]
    if "score" not in plain[0]:  # this server's JSON has no score yet: the fallback
        assert all(text.startswith("log p = ") and " · p = " in text for text in plain), plain

    served = [("a dog runs", -6.0, -1.5), ("a dog runs on the grass", -7.2, -1.2), ("a dog", -4.5, -2.25)]

    def handle(route: object) -> None:
        body = {"captions": [{"text": t, "log_prob": lp, "probability": math.exp(lp), "score": sc}
                             for t, lp, sc in served],
                "image": {"format": "JPEG", "width": 320, "height": 240}, "model": {"name": "tiny", "version": "t"},
                "timing_ms": {"total": 5.0}}
        route.fulfill(status=200, content_type="application/json", body=json.dumps(body))  # type: ignore[attr-defined]

    page.route("**/v1/captions?*", handle)  # type: ignore[attr-defined]
    page.check("#strategy-greedy")  # type: ignore[attr-defined]
    page.check("#strategy-beam")  # type: ignore[attr-defined]
    expect(page.locator("#captions li .text").first).to_have_text("a dog runs on the grass")  # type: ignore[attr-defined]
    assert page.locator("#captions li .text").all_inner_texts() == [  # type: ignore[attr-defined]
        "a dog runs on the grass", "a dog runs", "a dog"]
    numbers = page.locator("#captions li .prob").all_inner_texts()  # type: ignore[attr-defined]
    assert numbers == ["score -1.20 · p = 0.00075", "score -1.50 · p = 0.0025", "score -2.25 · p = 0.011"], numbers
    assert page.errors == []  # type: ignore[attr-defined]


def test_drop_a_photo_and_see_an_error_for_a_bad_file(page: object, base_url: str, photo: Path) -> None:
    page.goto(base_url + "/")  # type: ignore[attr-defined]
    drop = """async ([name, type, base64]) => {
        const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type }));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', { dataTransfer: transfer, bubbles: true }));
    }"""
    import base64

    page.evaluate(drop, ["photo.jpg", "image/jpeg", base64.b64encode(photo.read_bytes()).decode()])  # type: ignore[attr-defined]
    page.wait_for_selector("#captions li")  # type: ignore[attr-defined]
    assert page.locator("#preview").is_visible()  # type: ignore[attr-defined]

    page.evaluate(drop, ["notes.jpg", "image/jpeg", base64.b64encode(b"just text").decode()])  # type: ignore[attr-defined]
    page.wait_for_selector("#error:not([hidden])")  # type: ignore[attr-defined]
    assert "not_an_image" in page.locator("#error").inner_text()  # type: ignore[attr-defined]
    assert page.locator("#captions li").count() == 0  # type: ignore[attr-defined]
    unexpected = [e for e in page.errors if "status of 415" not in e]  # type: ignore[attr-defined]
    assert unexpected == []


def test_docs_page_renders_the_spec(page: object, base_url: str, tmp_path: Path) -> None:
    page.goto(base_url + "/docs")  # type: ignore[attr-defined]
    page.wait_for_selector("#createCaption")  # type: ignore[attr-defined]
    for operation in ("createCaption", "createCaptionsBatch", "maxPredict", "maxMetadata", "healthz", "readyz"):
        assert page.locator(f"#{operation}").count() == 1, operation  # type: ignore[attr-defined]
    page.click("#createCaption summary")  # type: ignore[attr-defined]
    assert page.locator("#createCaption").get_by_text("beam_size").first.is_visible()  # type: ignore[attr-defined]
    page.screenshot(path=str(tmp_path / "docs.png"), full_page=False)  # type: ignore[attr-defined]
    assert page.errors == []  # type: ignore[attr-defined]


def test_docs_page_reads_well_and_has_curl_and_python_examples_for_every_route(page: object, base_url: str) -> None:
    import json
    import urllib.request

    with urllib.request.urlopen(base_url + "/openapi.json", timeout=30) as response:
        spec = json.load(response)
    page.goto(base_url + "/docs")  # type: ignore[attr-defined]
    page.wait_for_selector("#createCaption")  # type: ignore[attr-defined]
    title = page.locator("#title").inner_text()  # type: ignore[attr-defined]
    assert title.startswith("captioner API") and "API 1" not in title and "version 1" in title, title
    assert page.title() == "captioner API"  # type: ignore[attr-defined]
    assert "`" not in page.locator("body").text_content()  # type: ignore[attr-defined]  # backticks became <code>
    assert page.locator("#description code").count() >= 1  # type: ignore[attr-defined]
    operations = [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]
    assert len(operations) >= 10
    for path, method, op in operations:
        block = page.locator(f"#{op['operationId']}".replace(":", "\\:"))  # type: ignore[attr-defined]
        curl = block.locator("pre.example.curl").text_content()
        python = block.locator("pre.example.python").text_content()
        assert curl.startswith("curl ") and f"{base_url}{path}" in curl, (path, curl)
        assert python.startswith("import requests") and f'requests.{method}("{base_url}{path}' in python, python
    single = page.locator("#createCaption pre.example.curl").text_content()  # type: ignore[attr-defined]
    assert single == f'curl -F image=@dog.jpg "{base_url}/v1/captions?num_captions=3"'
    batch = page.locator("#createCaptionsBatch pre.example.python").text_content()  # type: ignore[attr-defined]
    assert 'files = [("image", open(name, "rb"))' in batch and "print(response.json())" in batch
    metrics = page.locator("#metrics pre.example.python").text_content()  # type: ignore[attr-defined]
    assert metrics.endswith("print(response.text)")
    assert page.errors == []  # type: ignore[attr-defined]
