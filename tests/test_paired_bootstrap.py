"""scripts/paired_bootstrap.py: the paired difference, its interval, and the share of resamples a model is ahead."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from scripts_loader import load_script

from training.evaluation import compute_metrics, per_image_cider, write_results

bootstrap = load_script("paired_bootstrap")


def test_a_constant_lead_has_a_point_interval_and_is_always_ahead() -> None:
    a = {i: 0.1 * (i % 7) for i in range(50)}
    b = {i: score + 0.02 for i, score in a.items()}
    s = bootstrap.paired_bootstrap(a, b, resamples=200)
    assert s["photos"] == 50 and s["b_ahead"] == 1.0
    assert [s["difference"], s["low"], s["high"]] == pytest.approx([0.02, 0.02, 0.02])


def test_only_shared_photos_count_and_a_mixed_difference_spans_zero() -> None:
    a = {i: 1.0 for i in range(100)}
    b = {i: 1.0 + (0.5 if i % 2 else -0.5) for i in range(100)} | {1000: 9.0}  # photo 1000: only B captioned it
    s = bootstrap.paired_bootstrap(a, b, resamples=1000, seed=3)
    assert s["photos"] == 100 and s["difference"] == pytest.approx(0.0)
    assert s["low"] < 0 < s["high"] and 0.2 < s["b_ahead"] < 0.8


@pytest.mark.parametrize("java", [False, pytest.param(True, marks=pytest.mark.skipif(
    shutil.which("java") is None, reason="the PTB tokenizer needs Java"))])
def test_per_image_cider_averages_to_the_corpus_cider(java: bool) -> None:
    references = {1: ["a dog runs on the grass", "a brown dog running"], 2: ["two kids play in the snow",
                  "children in the snow"], 3: ["a man rides a bike", "a cyclist on a road"]}
    predictions = {1: "a dog runs on grass", 2: "kids in the snow", 3: "a man on a bike"}
    scores = per_image_cider(predictions, references, java_tokenizer=java)
    assert sorted(scores) == [1, 2, 3] and len(set(scores.values())) == 3
    corpus = compute_metrics(predictions, references, ("cider",), java_tokenizer=java)["CIDEr"]
    assert sum(scores.values()) / 3 == pytest.approx(corpus)


def test_per_image_cider_refuses_what_compute_metrics_refuses() -> None:
    with pytest.raises(ValueError, match="no predictions"):
        per_image_cider({}, {1: ["a dog"]}, java_tokenizer=False)
    with pytest.raises(ValueError, match="1 predicted images have no reference captions"):
        per_image_cider({1: "a dog", 2: "a cat"}, {1: ["a dog"]}, java_tokenizer=False)


def test_the_script_reads_evaluate_results_files(tmp_path: Path) -> None:
    """Results files as `captioner evaluate` writes them, matched to the annotations' photos."""
    annotations = tmp_path / "captions.json"
    annotations.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.jpg"} for i in (1, 2)],
        "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(
            [(1, "a dog runs on the grass"), (1, "a brown dog running"), (2, "two kids play in the snow"),
             (2, "children in the snow")])],
    }))
    a, b = write_results({1: "a cat", 2: "kids in the snow"}, tmp_path / "a.json"), write_results(
        {1: "a dog runs on the grass", 2: "kids in the snow"}, tmp_path / "b.json")
    dataset = bootstrap.load_coco(annotations)
    scores_a, scores_b = bootstrap.per_photo_cider(dataset, a), bootstrap.per_photo_cider(dataset, b)
    assert scores_a[2] == pytest.approx(scores_b[2]) and scores_b[1] > scores_a[1]
