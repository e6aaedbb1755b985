"""Dataset loaders, write_coco and ``captioner prepare``, on the real Flickr8k/COCO files and synthetic ones."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import COCO_VAL
from PIL import Image

from captioner.cli import main
from training.data import load_coco, load_flickr8k, load_karpathy, write_coco


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(path)
    return path


def _coco(path: Path, images: list[dict], annotations: list[dict]) -> Path:
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def _karpathy(tmp_path: Path) -> Path:
    """A COCO-style Karpathy file: 5 images over train/restval/val/test, in subfolders."""
    entries = []
    for n, split in enumerate(["train", "train", "restval", "val", "test"]):
        folder = "val2014" if split in ("restval", "val", "test") else "train2014"
        _image(tmp_path / "images" / folder / f"img{n}.jpg")
        sentences = [{"raw": f"caption {k} of image {n}", "tokens": []} for k in range(2)]
        entries.append({"filepath": folder, "filename": f"img{n}.jpg", "imgid": n, "cocoid": 100 + n,
                        "split": split, "sentences": sentences})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"dataset": "coco", "images": entries}))
    return path


def test_flickr8k_real_splits(flickr8k_dir: Path) -> None:
    token = flickr8k_dir / "Flickr8k.token.txt"
    splits = {s: load_flickr8k(token, flickr8k_dir / "splits" / f"{s}.txt", flickr8k_dir / "images")
              for s in ("train", "dev", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"train": 6000, "dev": 1000, "test": 1000}
    ids: set[int] = set()
    for dataset in splits.values():
        assert dataset.report.problems == 0
        assert all(len(r.captions) == 5 and r.path.is_file() for r in dataset.images)
        ids |= {r.image_id for r in dataset.images}
    assert len(ids) == 8000  # disjoint splits, distinct ids
    # Ids are positions in the sorted list of all 8091 names, whatever split reads them.
    all_names = sorted({line.split("#")[0] for line in token.read_text().splitlines()})
    assert all(all_names[r.image_id] == r.path.name for d in splits.values() for r in d.images)
    first = splits["train"].images[0]
    assert first.captions[0].startswith("A child in a pink dress")


def test_coco_val2017_without_images_reports_missing(tmp_path: Path) -> None:
    if not COCO_VAL.is_file():
        pytest.skip("../shared/data/coco/captions_val2017.json is not available")
    dataset = load_coco(COCO_VAL, tmp_path)
    assert (len(dataset), dataset.num_captions) == (5000, 25014)
    assert len(dataset.report.missing_images) == 5000
    assert "5000 image files missing" in dataset.report.summary()
    assert dataset.images[0].width and dataset.images[0].height
    assert len(load_coco(COCO_VAL, tmp_path, skip_missing_images=True)) == 0


def test_coco_problems_are_counted_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _image(tmp_path / "ok.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "folder.jpg").mkdir()
    images = [{"id": i, "file_name": name} for i, name in
              enumerate(["ok.jpg", "missing.jpg", "empty.jpg", "folder.jpg", "ok.jpg"], start=1)]
    annotations = [
        {"id": 1, "image_id": 1, "caption": "  a red square  "}, {"id": 2, "image_id": 1, "caption": " "},
        {"id": 3, "image_id": 2, "caption": "gone"}, {"id": 4, "image_id": 3, "caption": "empty file"},
        {"id": 5, "image_id": 4, "caption": "a folder"}, {"id": 6, "image_id": 5, "caption": None},
        {"id": 7, "image_id": 99, "caption": "no such image"},
    ]
    path = _coco(tmp_path / "captions.json", images, annotations)
    dataset = load_coco(path, tmp_path)
    report = dataset.report
    assert [r.image_id for r in dataset.images] == [1, 2, 3, 4]
    assert dataset.images[0].captions == ["a red square"]
    assert (report.empty_captions, report.orphan_captions, report.uncaptioned_images) == (2, 1, [5])
    assert (report.missing_images, report.unreadable_images) == ([2], [3, 4])
    assert "image files missing" in caplog.text
    cleaned = load_coco(path, tmp_path, skip_missing_images=True)
    assert [r.image_id for r in cleaned.images] == [1] and cleaned.report.skipped_images == 3


def test_karpathy_splits(tmp_path: Path) -> None:
    path = _karpathy(tmp_path)
    train = load_karpathy(path, tmp_path / "images", "train")
    assert [r.image_id for r in train.images] == [100, 101, 102]  # cocoid; restval counts as train
    assert train.images[2].path == tmp_path / "images" / "val2014" / "img2.jpg"
    assert train.images[0].captions == ["caption 0 of image 0", "caption 1 of image 0"]
    assert train.report.problems == 0
    assert len(load_karpathy(path, tmp_path / "images", "train", include_restval=False)) == 2
    assert [r.image_id for r in load_karpathy(path, tmp_path / "images", "test").images] == [104]
    with pytest.raises(ValueError, match="unknown Karpathy split"):
        load_karpathy(path, tmp_path / "images", "dev")


def test_karpathy_flickr_style(tmp_path: Path) -> None:
    """Flickr files have no filepath and no cocoid: paths are image_dir/filename, ids are imgid."""
    _image(tmp_path / "a.jpg")
    entries = [{"filename": "a.jpg", "imgid": 7, "split": "val", "sentences": [{"raw": "x"}, {"raw": ""}]}]
    dataset = load_karpathy({"images": entries}, tmp_path, "val")
    assert (dataset.images[0].image_id, dataset.images[0].path) == (7, tmp_path / "a.jpg")
    assert dataset.report.empty_captions == 1
    with pytest.raises(ValueError, match="splits present: val"):
        load_karpathy({"images": entries}, tmp_path, "test")
    with pytest.raises(ValueError, match="image entry 0 is malformed"):
        load_karpathy({"images": [{"imgid": 1, "split": "val"}]}, tmp_path, "val")


def test_flickr8k_token_file_quirks(tmp_path: Path) -> None:
    _image(tmp_path / "b.jpg")
    token = tmp_path / "tokens.txt"
    token.write_text("b.jpg#1\tsecond\nb.jpg#0\tfirst\nnot a token line\na.jpg#0\tother image\n\n")
    split = tmp_path / "split.txt"
    split.write_text("b.jpg\nc.jpg\n")
    dataset = load_flickr8k(token, split, tmp_path)
    assert [(r.image_id, r.captions) for r in dataset.images] == [(1, ["first", "second"])]
    assert dataset.report.malformed_lines == 1 and len(dataset.report.uncaptioned_images) == 1


def test_write_coco_round_trip(tmp_path: Path) -> None:
    dataset = load_karpathy(_karpathy(tmp_path), tmp_path / "images", "train")
    path = write_coco(dataset, tmp_path / "out" / "captions_train.json")
    data = json.loads(path.read_text())
    assert data["type"] == "captions" and data["licenses"] == []
    assert data["images"][0] == {"id": 100, "file_name": "train2014/img0.jpg"}
    assert data["info"]["image_dir"] == str((tmp_path / "images").resolve())
    assert [a["id"] for a in data["annotations"]] == list(range(1, 7))
    assert load_coco(path, "").image_dir == (tmp_path / "images").resolve()  # "": an unset config value
    again = load_coco(path)  # image folder from info.image_dir
    assert [(r.image_id, r.path.resolve(), r.captions) for r in again.images] == [
        (r.image_id, r.path.resolve(), r.captions) for r in dataset.images
    ]
    assert again.report.problems == 0


def test_prepare_flickr8k(flickr8k_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["prepare", "flickr8k", "--root", str(flickr8k_dir), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "captions_train.json: 6000 images, 30000 captions" in out
    assert f"images: {os.path.abspath(flickr8k_dir / 'images')}" in out  # as given: symlinks are not resolved
    for split, size in (("train", 6000), ("dev", 1000), ("test", 1000)):
        dataset = load_coco(tmp_path / f"captions_{split}.json")
        assert len(dataset) == size and dataset.num_captions == 5 * size and dataset.report.problems == 0
    expected = load_flickr8k(flickr8k_dir / "Flickr8k.token.txt", flickr8k_dir / "splits" / "dev.txt",
                             flickr8k_dir / "images")
    dev = load_coco(tmp_path / "captions_dev.json", flickr8k_dir / "images")
    assert [(r.image_id, r.path, r.captions) for r in dev.images] == [
        (r.image_id, r.path, r.captions) for r in expected.images
    ]


def test_prepare_karpathy(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = _karpathy(tmp_path)
    out = tmp_path / "prepared"
    assert main(["prepare", "karpathy", "--json", str(path), "--images", str(tmp_path / "images"),
                 "--out", str(out)]) == 0
    assert "captions_train.json: 3 images, 6 captions" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["captions_test.json", "captions_train.json", "captions_val.json"]
    assert load_coco(out / "captions_val.json").images[0].path.is_file()


def test_prepare_coco_cleans(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _image(tmp_path / "ok.jpg")
    images = [{"id": 1, "file_name": "ok.jpg", "width": 8, "height": 8}, {"id": 2, "file_name": "missing.jpg"}]
    annotations = [{"id": 10, "image_id": 1, "caption": "a red square"}, {"id": 11, "image_id": 1, "caption": ""},
                   {"id": 12, "image_id": 2, "caption": "gone"}]
    source = _coco(tmp_path / "captions_val2017.json", images, annotations)
    out = tmp_path / "clean"
    assert main(["prepare", "coco", "--annotations", str(source), "--images", str(tmp_path), "--out", str(out)]) == 0
    assert "captions_val2017.json: 1 images, 1 captions" in capsys.readouterr().out
    data = json.loads((out / "captions_val2017.json").read_text())
    assert data["images"] == [{"id": 1, "file_name": "ok.jpg", "width": 8, "height": 8}]
    assert main(["prepare", "coco", "--annotations", str(source), "--images", str(tmp_path), "--out", str(out),
                 "--split-name", "all", "--keep-missing-images"]) == 0
    assert len(load_coco(out / "captions_all.json")) == 2
    # Nothing usable: the split is not written and the exit status says so.
    assert main(["prepare", "coco", "--annotations", str(source), "--images", str(tmp_path / "nowhere"),
                 "--out", str(out), "--split-name", "none"]) == 1
    assert not (out / "captions_none.json").exists()
    # The cleaned copy never replaces its input.
    assert main(["prepare", "coco", "--annotations", str(source), "--images", str(tmp_path),
                 "--out", str(tmp_path)]) == 1
