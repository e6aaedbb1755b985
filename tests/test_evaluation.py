"""Caption metrics, COCO results files and ``captioner evaluate`` (with a tiny random model)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.cli import main
from training.data import load_coco
from training.evaluation import (
    ResultsFileError,
    check_metrics,
    compute_metrics,
    distinct_caption_share,
    format_metrics,
    is_unfinished,
    load_results,
    match_results,
    repeated_pair_share,
    unfinished_share,
    write_results,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="METEOR and the PTB tokenizer need Java")
ALL_KEYS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
REFERENCES = {
    1: ["a dog runs on the grass", "a brown dog is running across a field"],
    2: ["a cat sits on a red mat", "the cat is sitting on the mat"],
    3: ["two children play in the snow", "kids are playing in the snow"],
    4: ["a man rides a bike down the street", "a cyclist on a city road"],
}
IDENTICAL = {i: refs[0] for i, refs in REFERENCES.items()}


def test_identical_captions_score_perfectly_with_the_python_tokenizer() -> None:
    scores = compute_metrics(IDENTICAL, REFERENCES, metrics=("bleu", "rouge", "cider"), java_tokenizer=False)
    assert list(scores) == ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0)
    assert scores["CIDEr"] > 1.0  # 0-1 scale for the others; CIDEr is not bounded by 1
    worse = compute_metrics({**IDENTICAL, 1: "a cat in the snow"}, REFERENCES, ("cider",), java_tokenizer=False)
    assert worse["CIDEr"] < scores["CIDEr"]


def test_cider_alone_never_starts_java(monkeypatch: pytest.MonkeyPatch) -> None:
    """The training loop's per-epoch validation path."""
    monkeypatch.setenv("PATH", "")
    assert compute_metrics(IDENTICAL, REFERENCES, ("cider",), java_tokenizer=False)["CIDEr"] > 0
    with pytest.raises(RuntimeError, match="the PTB tokenizer needs Java"):
        compute_metrics(IDENTICAL, REFERENCES, ("cider",))
    with pytest.raises(RuntimeError, match="METEOR needs Java"):  # what evaluate_model checks before captioning
        check_metrics(("bleu", "meteor"), java_tokenizer=False)


@needs_java
def test_meteor_and_ptb_tokenizer() -> None:
    scores = compute_metrics({i: c.upper() + "." for i, c in IDENTICAL.items()}, REFERENCES)
    assert list(scores) == ALL_KEYS
    assert scores["METEOR"] == pytest.approx(1.0, abs=1e-6)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_bad_requests(caplog: pytest.LogCaptureFixture) -> None:
    scores = compute_metrics(IDENTICAL, REFERENCES, ("rouge", "spice"), java_tokenizer=False)
    assert list(scores) == ["ROUGE-L"] and "SPICE skipped" in caplog.text
    with pytest.raises(ValueError, match="unknown metrics"):
        compute_metrics(IDENTICAL, REFERENCES, ("bleu", "wer"))
    with pytest.raises(ValueError, match="no reference"):
        compute_metrics({**IDENTICAL, 9: "a caption"}, REFERENCES, ("bleu",), java_tokenizer=False)
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics({}, REFERENCES, ("bleu",), java_tokenizer=False)


def test_distinct_caption_share_and_table() -> None:
    assert distinct_caption_share({1: "a dog", 2: "A dog.", 3: "a cat", 4: "a cat"}) == 0.5
    assert distinct_caption_share({}) == 0.0
    table = format_metrics({"CIDEr": 0.4567, "distinct_caption_share": 0.25, "unfinished_share": 0.125})
    assert "CIDEr" in table and "45.67" in table and "distinct captions (%)      25.00" in table
    assert "unfinished (%)" in table and "12.50" in table


def test_repeated_pair_share_finds_decoding_loops() -> None:
    captions = {1: "a man riding a bike on a bike", 2: "A man is riding a bike.", 3: "a dog, a dog", 4: "dog dog"}
    assert repeated_pair_share(captions) == 0.5  # "a bike" and "a dog" twice; a word twice is not a pair twice
    assert repeated_pair_share({1: ""}) == 0.0 and repeated_pair_share({}) == 0.0


def test_unfinished_share_finds_captions_that_stop_mid_phrase() -> None:
    unfinished = ["a young boy is holding a", "two dogs play in the", "a man sits on a bench with", "",
                  "a boy wearing a blue shirt is holding a blue", "girls are playing in a red and white"]
    whole = ["a dog runs.", "a woman looks on", "a man dressed in blue", "a black and white dog", "a man walks by"]
    assert [is_unfinished(c) for c in unfinished] == [True] * 6
    assert [is_unfinished(c) for c in whole] == [False] * 5
    assert unfinished_share(dict(enumerate(unfinished + whole))) == pytest.approx(6 / 11)
    assert unfinished_share({}) == 0.0


def test_results_file_round_trip_and_validation(tmp_path: Path) -> None:
    path = write_results({3: "a cat", 1: "a dog \u00e9"}, tmp_path / "results.json")
    assert json.loads(path.read_text()) == [{"image_id": 1, "caption": "a dog \u00e9"},
                                            {"image_id": 3, "caption": "a cat"}]
    assert load_results(path) == {1: "a dog \u00e9", 3: "a cat"}
    bad = tmp_path / "bad.json"
    for content, message in [
        ("{", "not valid JSON"),
        ('{"image_id": 1}', "JSON list"),
        ('[{"image_id": 1}]', "entry 0: expected an object"),
        ('[{"image_id": 1.5, "caption": "x"}]', "image_id must be an integer"),
        ('[{"image_id": true, "caption": "x"}]', "image_id must be an integer"),
        ('[{"image_id": 1, "caption": null}]', "caption must be a string"),
        ('[{"image_id": 1, "caption": "x"}, {"image_id": 1, "caption": "y"}]', "entry 1: image_id 1 appears more"),
    ]:
        bad.write_text(content)
        with pytest.raises(ResultsFileError, match=message):
            load_results(bad)
    with pytest.raises(ResultsFileError, match="cannot read"):
        load_results(tmp_path / "absent.json")


def _tiny_split(tmp_path: Path) -> tuple[Path, Path]:
    """Four noise images (one more listed but missing) and a COCO file whose captions need HTML escaping."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    entries, annotations = [], []
    for n in range(5):
        name = f"photo_{n}.jpg"
        if n < 4:
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(images / name)
        entries.append({"id": 10 + n, "file_name": name})
        for k, caption in enumerate(["a dog runs on the grass", f"<b>cat</b> & dog {n}"]):
            annotations.append({"id": 100 + 2 * n + k, "image_id": 10 + n, "caption": caption})
    annotation_file = tmp_path / "captions_tiny.json"
    annotation_file.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return annotation_file, images


@needs_java
def test_evaluate_command_end_to_end(tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    annotations, images = _tiny_split(tmp_path)
    out = tmp_path / "eval"
    status = main(["evaluate", "--model", str(tiny_model_dir), "--annotations", str(annotations), "--images",
                   str(images), "--out-dir", str(out), "--strategy", "beam", "--beam-size", "2", "--max-length", "6",
                   "--batch-size", "3", "--html", "--device", "cpu"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "CIDEr" in printed and "4 of 5 images scored" in printed  # the missing image is skipped, not fatal
    summary = json.loads((out / "metrics.json").read_text())
    assert list(summary["metrics"]) == [*ALL_KEYS, "distinct_caption_share", "repeated_pair_share",
                                         "unfinished_share"]
    assert all(0.0 <= v for v in summary["metrics"].values())
    assert summary["decoding"]["beam_size"] == 2 and summary["images_scored"] == 4
    assert set(load_results(out / "results.json")) == {10, 11, 12, 13}
    page = (out / "report.html").read_text()
    assert "&lt;b&gt;cat&lt;/b&gt; &amp; dog 0" in page and "<b>cat</b>" not in page
    assert page.count("data:image/jpeg;base64,") == 4


def test_evaluate_results_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Score an existing results file (string ids, as the batch command writes them, match file stems)."""
    annotations, images = _tiny_split(tmp_path)
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"image_id": "photo_0", "caption": "a dog runs on the grass"},
                                   {"image_id": 11, "caption": "a dog on grass"}]))
    out = tmp_path / "eval"
    assert main(["evaluate", "--results", str(results), "--annotations", str(annotations), "--out-dir", str(out),
                 "--python-tokenizer", "--metrics", "bleu", "rouge", "cider", "--html"]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["images_scored"] == 2 and summary["metrics"]["BLEU-1"] > 0.5
    assert "results" in summary and (out / "report.html").is_file()
    capsys.readouterr()
    results.write_text(json.dumps([{"image_id": 99, "caption": "x"}]))
    assert main(["evaluate", "--results", str(results), "--annotations", str(annotations), "--out-dir", str(out),
                 "--python-tokenizer", "--metrics", "bleu"]) == 2  # a usage error: one line, exit 2
    assert "match no annotated image" in capsys.readouterr().err


def test_match_results_by_file_stem(tmp_path: Path) -> None:
    annotations, images = _tiny_split(tmp_path)
    dataset = load_coco(annotations, images)
    assert match_results({"photo_1": "x", 12: "y"}, dataset) == {11: "x", 12: "y"}
    with pytest.raises(ValueError, match="two results are for image 11"):
        match_results({"photo_1": "x", 11: "y"}, dataset)
