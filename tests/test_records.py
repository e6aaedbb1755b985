"""The batch command's record loop in-process and fast: one record per path, in order, each with its own caption.

``test_batch.py`` drives the whole command (a few seconds per run); these call ``captioner.batch.records``
directly with the tiny model whose captions differ per image, so a record given another image's caption, a lost or
repeated record, or a wrong field fails in well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from conftest import varied_tiny_model
from PIL import Image

from captioner.api import Caption, Captioner
from captioner.batch.records import BatchStats, Record, caption_batches, caption_record, error_record, run_batch
from captioner.batch.writers import RecordWriter
from captioner.checkpoint import save_model
from captioner.image_loader import ramp_up_batches
from captioner.tags import Tag


@pytest.fixture(scope="module")
def captioner(tmp_path_factory: pytest.TempPathFactory) -> Captioner:
    path = save_model(varied_tiny_model(), tmp_path_factory.mktemp("models") / "varied")
    return Captioner.load(path, allow_download=False, runtime="torch")


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three good photos (different captions), a missing file, a damaged one, two more good ones."""
    root = tmp_path_factory.mktemp("photos")
    good = []
    for seed in (0, 1, 2, 3, 5):
        rng = np.random.default_rng(seed)  # as test_service_per_image.photo: seeds with different captions
        background = rng.integers(0, 256, (3,))
        pixels = (rng.integers(0, 256, (48, 64, 3)) * 0.5 + background * 0.5).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{seed}.png")
        good.append(str(root / f"{seed}.png"))
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    return [good[0], good[1], str(root / "missing.png"), good[2], str(root / "broken.jpg"), good[3], good[4]]


def _caption(text: str, log_prob: float, score: float) -> Caption:
    return Caption(text, text.split(), log_prob, score)


def test_caption_record_fields_and_rounding() -> None:
    best, second = _caption("a dog", -1.234567, -0.617283), _caption("a cat", -2.0000449, -1.00002)
    assert caption_record("x.jpg", [best, second]) == {
        "image": "x.jpg", "caption": "a dog", "log_prob": -1.2346, "score": -0.6173}
    assert caption_record("x.jpg", [best, second], num_captions=2) == {
        "image": "x.jpg", "caption": "a dog", "log_prob": -1.2346, "score": -0.6173,
        "captions": [{"caption": "a dog", "log_prob": -1.2346, "score": -0.6173},
                     {"caption": "a cat", "log_prob": -2.0, "score": -1.0}]}
    tags = [Tag("espresso", 0.891234, 967), Tag("cup", 0.03, 968)]
    assert caption_record("x.jpg", [best], tags=tags)["tags"] == [
        {"label": "espresso", "probability": 0.8912}, {"label": "cup", "probability": 0.03}]
    assert "tags" not in caption_record("x.jpg", [best], tags=[])
    assert error_record("y.jpg", "not_an_image: empty file") == {"image": "y.jpg", "error": "not_an_image: empty file"}


def test_batch_stats_count_successes_and_failures() -> None:
    stats = BatchStats()
    stats.add([{"image": "a", "caption": "x"}, {"image": "b", "error": "e"}])
    stats.add([{"image": "c", "error": "e"}])
    stats.add([])
    assert (stats.succeeded, stats.failed) == (1, 2)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 32])
def test_caption_batches_one_record_per_path_in_order(
    captioner: Captioner, paths: list[str], batch_size: int
) -> None:
    options = captioner.options(strategy="greedy")
    batches = list(caption_batches(captioner, paths, options, batch_size=batch_size))
    assert [len(b) for b in batches] == [min(batch_size, len(paths) - i) for i in range(0, len(paths), batch_size)]
    records = [r for batch in batches for r in batch]
    assert [r["image"] for r in records] == paths
    assert [("error" in r) for r in records] == [False, False, True, False, True, False, False]
    assert records[2]["error"].startswith("not_found") or "missing.png" in records[2]["error"]
    good = [p for p, r in zip(paths, records, strict=True) if "error" not in r]
    expected = captioner.caption(good, strategy="greedy")
    captions = [r for r in records if "error" not in r]
    assert [r["caption"] for r in captions] == [c[0].text for c in expected]
    assert len({r["caption"] for r in captions}) == len(captions)  # each image its own caption
    assert [r["log_prob"] for r in captions] == pytest.approx([c[0].log_prob for c in expected], abs=2e-4)
    assert all(set(r) == {"image", "caption", "log_prob", "score"} for r in captions)


def test_caption_batches_with_several_captions(captioner: Captioner, paths: list[str]) -> None:
    options = captioner.options(beam_size=3, num_captions=2)
    records = [r for batch in caption_batches(captioner, paths, options, batch_size=4) for r in batch]
    for path, record in zip(paths, records, strict=True):
        if "error" in record:
            continue
        expected = captioner.caption(path, beam_size=3, num_captions=2)[0]
        assert [c["caption"] for c in record["captions"]] == [c.text for c in expected]
        assert record["caption"] == record["captions"][0]["caption"]


class ListWriter(RecordWriter):
    def __init__(self) -> None:
        self.batches: list[list[Record]] = []
        self.closed = False

    def write(self, records: Sequence[Record]) -> None:
        self.batches.append(list(records))

    def close(self) -> None:
        self.closed = True


def test_run_batch_writes_every_batch_then_reports_it(captioner: Captioner, paths: list[str]) -> None:
    writer = ListWriter()
    seen: list[tuple[int, int]] = []  # (batches written when on_batch ran, records in that batch)
    stats = run_batch(captioner, paths, captioner.options(strategy="greedy"), writer, batch_size=3,
                      on_batch=lambda records: seen.append((len(writer.batches), len(records))))
    assert [len(b) for b in writer.batches] == [1, 2, 3, 1]  # ramping up: the first record comes after one image
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 1)]  # each batch is reported after it was written
    assert [r["image"] for b in writer.batches for r in b] == paths
    assert (stats.succeeded, stats.failed) == (5, 2)
    assert not writer.closed  # the caller closes the writer
    assert run_batch(captioner, [], captioner.options(), ListWriter()) == BatchStats()


@pytest.mark.parametrize(("count", "batch_size", "sizes"), [
    (0, 32, []), (1, 32, [1]), (3, 1, [1, 1, 1]), (7, 3, [1, 2, 3, 1]), (40, 32, [1, 2, 4, 8, 16, 9]),
    (100, 32, [1, 2, 4, 8, 16, 32, 32, 5]), (10, 5, [1, 2, 4, 3]),
])
def test_ramp_up_batches_start_at_one_image_and_keep_every_index_once_in_order(
    count: int, batch_size: int, sizes: list[int]
) -> None:
    batches = ramp_up_batches(count, batch_size)
    assert [len(b) for b in batches] == sizes
    assert [i for b in batches for i in b] == list(range(count))


def test_run_batch_defaults_and_passes_its_settings_on(
    captioner: Captioner, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defaults: batches of 32, no loader workers, no tags; and what the caller gives reaches the loader and model."""
    from captioner.batch import records

    loaders: list[tuple[int, int]] = []  # (batch size, workers) of each loader made
    real_loader = records.make_loader

    def spy_loader(paths: list[str], config: object, batch_size: int, workers: int, *rest: object) -> object:
        loaders.append((batch_size, workers))
        return real_loader(paths, config, batch_size, 0, *rest)  # load in this process all the same

    tags_asked: list[int] = []
    real_caption = captioner.caption_tensors

    def spy_caption(batch: object, options: object, num_tags: int = 0) -> list:
        tags_asked.append(num_tags)
        return real_caption(batch, options, 0)  # the tiny model has no tags head

    monkeypatch.setattr(records, "make_loader", spy_loader)
    monkeypatch.setattr(captioner, "caption_tensors", spy_caption)
    missing = [str(tmp_path_factory.mktemp("none") / f"{i}.png") for i in range(40)]  # error records: no model
    writer = ListWriter()
    run_batch(captioner, missing, captioner.options(strategy="greedy"), writer)
    assert [len(b) for b in writer.batches] == [1, 2, 4, 8, 16, 9] and loaders == [(32, 0)]
    good = [str(tmp_path_factory.mktemp("good") / "a.png")]
    Image.new("RGB", (8, 8), (1, 2, 3)).save(good[0])
    run_batch(captioner, good, captioner.options(strategy="greedy"), ListWriter())
    run_batch(captioner, good, captioner.options(strategy="greedy"), ListWriter(), batch_size=5, workers=3,
              num_tags=4)
    assert loaders[1:] == [(32, 0), (5, 3)] and tags_asked == [0, 4]


def test_caption_batches_defaults_pin_memory_and_tags(
    captioner: Captioner, paths: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from captioner.batch import records

    loaders: list[tuple] = []  # (batch size, workers, pin memory) of each loader made
    real_loader = records.make_loader

    def spy_loader(paths: list[str], config: object, batch_size: int, workers: int, pin: bool, *rest: object) -> object:
        loaders.append((batch_size, workers, pin))
        return real_loader(paths, config, batch_size, 0, False, *rest)

    tags_asked: list[int] = []
    real_caption = captioner.caption_tensors

    def tagging_caption(batch: object, options: object, num_tags: int = 0) -> list:
        tags_asked.append(num_tags)
        results = real_caption(batch, options, 0)
        for i, captions in enumerate(results):
            captions.tags = [Tag(f"class {i}", 0.5, i)][:num_tags]
        return results

    monkeypatch.setattr(records, "make_loader", spy_loader)
    monkeypatch.setattr(captioner, "caption_tensors", tagging_caption)
    options = captioner.options(strategy="greedy")
    plain = [r for batch in caption_batches(captioner, paths, options) for r in batch]
    assert loaders == [(32, 0, False)] and tags_asked == [0]
    assert all("tags" not in r for r in plain)
    tagged = [r for batch in caption_batches(captioner, paths, options, num_tags=2) for r in batch]
    assert [r.get("tags") for r in tagged if "error" not in r] == [[{"label": f"class {i}", "probability": 0.5}]
                                                                   for i in range(5)]
    limited = [r for batch in caption_batches(captioner, paths[:2], options, max_pixels=100) for r in batch]
    assert [r["error"].split(":")[0] for r in limited] == ["image_too_large"] * 2  # 64x48 photos, over 100 pixels
    monkeypatch.setattr(captioner, "device", torch.device("cuda"))  # only read, to pin memory for the GPU copy
    list(caption_batches(captioner, [paths[2]], options, batch_size=4, workers=2))  # a missing file: no model call
    assert loaders[-1] == (4, 2, True)
