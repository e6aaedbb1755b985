"""scripts/paired_bootstrap.py: the paired difference, its interval, and the share of resamples a model is ahead."""

from __future__ import annotations

import shutil

import pytest
from scripts_loader import load_script

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


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")
def test_per_photo_scores_average_to_the_official_cider(tmp_path) -> None:  # noqa: ANN001 - pytest fixture
    import json

    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    references = {1: ["a dog runs on the grass", "a brown dog running"], 2: ["two kids play in the snow",
                  "children in the snow"], 3: ["a man rides a bike", "a cyclist on a road"]}
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": 1, "caption": "a dog runs on grass"},
                                   {"image_id": 2, "caption": "kids in the snow"},
                                   {"image_id": 3, "caption": "a man on a bike"}]))
    scores = bootstrap.per_photo_cider(references, results)
    tok = PTBTokenizer()
    expected, _ = Cider().compute_score(
        tok.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()}),
        tok.tokenize({r["image_id"]: [{"caption": r["caption"]}] for r in json.loads(results.read_text())}))
    assert sorted(scores) == [1, 2, 3]
    assert sum(scores.values()) / 3 == pytest.approx(expected)
