"""``captioner caption``: discovery, error records, formats, resume, sharding, and one decoding path."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import varied_tiny_model
from PIL import Image

from captioner.api import Captioner
from captioner.batch import (
    Completed,
    PathTable,
    Shard,
    coco_image_id,
    collate,
    discover_images,
    load_item,
    rank_output_path,
    read_completed,
    repair_partial_line,
)
from captioner.checkpoint import save_model
from captioner.cli import main
from captioner.preprocess import PreprocessConfig

VENV_BIN = Path(sys.executable).parent


def _photo(path: Path, seed: int, size: tuple[int, int] = (80, 60), fmt: str | None = None) -> Path:
    """A random-noise image (different for every seed, so captions differ)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """A folder of good images (several formats, odd-case extensions), broken files and a nested folder."""
    root = tmp_path / "photos"
    _photo(root / "a.jpg", 1)
    _photo(root / "b.PNG", 2)
    _photo(root / "c.JpEg", 3, fmt="JPEG")
    _photo(root / "000000042.jpg", 4)
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)  # a JPEG header and nothing else
    (root / "empty.png").write_bytes(b"")
    (root / "fake.gif").write_text("this is not a gif")
    (root / "notes.txt").write_text("not an image, and no image extension: ignored in folders")
    _photo(root / "nested" / "d.png", 5)
    _photo(root / "nested" / "deeper" / "e.bmp", 6, fmt="BMP")
    return root


TOP_LEVEL = ["000000042.jpg", "a.jpg", "b.PNG", "c.JpEg", "corrupt.jpg", "empty.png", "fake.gif"]
BROKEN = {"corrupt.jpg", "empty.png", "fake.gif"}
NESTED = ["nested/d.png", "nested/deeper/e.bmp"]


@pytest.fixture(scope="module")
def varied_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its encoder calibrated so that different images get different captions."""
    model = varied_tiny_model()
    return save_model(model, tmp_path_factory.mktemp("models") / "varied")


def _caption(*args: str | Path) -> int:
    return main(["caption", *map(str, args)])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _names(records: list[dict], root: Path) -> list[str]:
    return [Path(r["image"]).relative_to(root).as_posix() for r in records]


# --- discovery, sharding and small pieces ---------------------------------------------------------------------------


def test_discover_filters_folders_by_extension_and_keeps_explicit_files(mixed: Path) -> None:
    flat = discover_images([str(mixed)])
    assert _names([{"image": p} for p in flat], mixed) == TOP_LEVEL
    deep = discover_images([str(mixed)], recursive=True)
    assert _names([{"image": p} for p in deep], mixed) == sorted(TOP_LEVEL + NESTED)
    # An explicit file is always attempted, whatever its extension; duplicates collapse; a missing path is kept.
    explicit = discover_images([str(mixed / "notes.txt"), str(mixed / "a.jpg"), f"{mixed}/./a.jpg", "missing.jpg"])
    assert explicit == sorted([str(mixed / "notes.txt"), str(mixed / "a.jpg"), "missing.jpg"])


def test_discover_globs(mixed: Path) -> None:
    assert discover_images([f"{mixed}/*.jpg"]) == [str(mixed / n) for n in ["000000042.jpg", "a.jpg", "corrupt.jpg"]]
    # Globs are case-sensitive (b.PNG is not *.png); ** descends with --recursive.
    deep_png = discover_images([f"{mixed}/**/*.png"], recursive=True)
    assert deep_png == [str(mixed / "empty.png"), str(mixed / "nested/d.png")]
    assert discover_images([f"{mixed}/nest*"]) == [str(mixed / "nested/d.png")]  # a matched folder is scanned
    assert discover_images([f"{mixed}/*.none"]) == [f"{mixed}/*.none"]  # no match: reported as a missing file


def test_shards_partition_the_inputs() -> None:
    paths = [f"img/{i:05d}.jpg" for i in range(1000)]
    shards = [Shard(i, 4).select(paths) for i in range(4)]
    assert sorted(p for shard in shards for p in shard) == paths
    assert all(150 < len(shard) < 350 for shard in shards)
    assert Shard.parse(" 2/4 ") == Shard(2, 4)
    for bad in ["4/4", "1", "-1/3", "a/b"]:
        with pytest.raises(ValueError):
            Shard.parse(bad)
    assert Shard.from_env({"RANK": "1", "WORLD_SIZE": "3"}) == Shard(1, 3)
    assert Shard.from_env({"WORLD_SIZE": "1"}) is None and Shard.from_env({}) is None
    assert rank_output_path("out/caps.jsonl", 3) == Path("out/caps.rank3.jsonl")


def test_small_pieces(tmp_path: Path) -> None:
    table = PathTable(["b", "é/ü.jpg", "", "a\udcff"])
    assert list(table) == ["b", "é/ü.jpg", "", "a\udcff"] and table[-1] == "a\udcff" and len(PathTable([])) == 0
    assert coco_image_id("x/000000123.jpg") == 123
    assert coco_image_id("1000268201_693b08cb0e.jpg") == "1000268201_693b08cb0e"
    config = PreprocessConfig(size=64)
    good = load_item(str(_photo(tmp_path / "g.png", 0)), config)
    bad = load_item(str(tmp_path / "missing.jpg"), config)
    assert good.error is None and good.tensor is not None and good.tensor.shape == (3, 64, 64)
    assert bad.tensor is None and "missing.jpg" in bad.error
    batch = collate([bad, good, bad])
    assert batch.images is not None and batch.images.shape == (1, 3, 64, 64) and batch.errors[1] is None
    assert collate([bad]).images is None


def test_repair_partial_line(tmp_path: Path) -> None:
    file = tmp_path / "out.jsonl"
    file.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    assert repair_partial_line(file) == len(b'{"c": ')
    assert file.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    assert repair_partial_line(file) == 0
    file.write_bytes(b"no newline at all")
    assert repair_partial_line(file) == len(b"no newline at all") and file.read_bytes() == b""


# --- the command ----------------------------------------------------------------------------------------------------


def test_mixed_folder_gives_one_record_per_input_and_error_records(
    mixed: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "caps.jsonl"
    status = _caption(mixed, "--recursive", "--model", tiny_model_dir, "--out", out, "--workers", "2",
                      "--batch-size", "3", "--strategy", "greedy")
    records = _jsonl(out)
    assert _names(records, mixed) == sorted(TOP_LEVEL + NESTED)
    for record, name in zip(records, _names(records, mixed), strict=True):
        if name in BROKEN:
            assert set(record) == {"image", "error"} and record["error"]
        else:
            assert set(record) == {"image", "caption", "log_prob", "score"} and record["caption"]
    assert status == 1
    assert "captioned 6 images, 3 failed" in capsys.readouterr().err

    # Without --recursive the nested folder is skipped; only good images: exit status 0.
    status = _caption(mixed / "a.jpg", mixed / "nested", "--model", tiny_model_dir, "--out", out, "--workers", "0")
    assert status == 0 and _names(_jsonl(out), mixed) == ["a.jpg", "nested/d.png"]


def test_missing_and_non_image_explicit_files_are_errors(
    mixed: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = _caption(mixed / "notes.txt", mixed / "gone.jpg", mixed / "a.jpg", "--model", tiny_model_dir,
                      "--workers", "0", "--quiet")
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]  # stdout: JSON lines
    assert [("error" in r) for r in records] == [False, True, True]  # a.jpg, gone.jpg, notes.txt
    assert "no such image file" in records[1]["error"] and "not an image" in records[2]["error"]
    assert status == 1 and "1 images, 2 failed" in captured.err


def test_same_captions_as_the_python_api(mixed: Path, varied_model_dir: Path, tmp_path: Path) -> None:
    good = [mixed / n for n in TOP_LEVEL if n not in BROKEN] + [mixed / n for n in NESTED]
    captioner = Captioner.load(varied_model_dir)
    for strategy, num in [("greedy", 1), ("beam", 2)]:
        out = tmp_path / f"{strategy}.jsonl"
        # Batches of 3 mix good and broken files: the good images' captions must not depend on their neighbours.
        _caption(mixed, "-r", "--model", varied_model_dir, "--out", out, "--strategy", strategy, "--num-captions",
                 str(num), "--batch-size", "3", "--workers", "1")
        records = {r["image"]: r for r in _jsonl(out) if "error" not in r}
        expected = captioner.caption(good, strategy=strategy, num_captions=num)
        assert len({c[0].text for c in expected}) > 1  # the images really get different captions
        for path, captions in zip(good, expected, strict=True):
            record = records[str(path)]
            assert record["caption"] == captions[0].text
            assert record["log_prob"] == pytest.approx(captions[0].log_prob, abs=2e-3)
            assert record["score"] == pytest.approx(captions[0].score, abs=2e-3)
            if num > 1:
                assert [c["caption"] for c in record["captions"]] == [c.text for c in captions]
                assert [c["score"] for c in record["captions"]] == pytest.approx([c.score for c in captions], abs=2e-3)


def test_every_format_parses(mixed: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    common = [mixed, "--model", tiny_model_dir, "--workers", "0", "--quiet"]
    assert _caption(*common, "--out", tmp_path / "c.csv", "--num-captions", "2") == 1  # format from the extension
    with open(tmp_path / "c.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "caption", "log_prob", "score", "caption_2", "log_prob_2", "score_2", "error"]
    assert _names(rows, mixed) == TOP_LEVEL
    assert all(bool(r["error"]) == (Path(r["image"]).name in BROKEN) for r in rows)
    assert all(float(r["log_prob"]) >= float(r["log_prob_2"]) for r in rows if not r["error"])
    assert all(float(r["score"]) >= float(r["score_2"]) for r in rows if not r["error"])  # ranked by score

    assert _caption(*common, "--out", tmp_path / "coco.json") == 1
    results = json.loads((tmp_path / "coco.json").read_text())
    assert [set(r) for r in results] == [{"image_id", "caption"}] * 4  # broken files have no place in it
    assert [r["image_id"] for r in results] == [42, "a", "b", "c"]
    assert not list(tmp_path.glob(".coco.json.*"))  # the temporary file was renamed away

    assert _caption(*common, "--out", tmp_path / "j.out", "--num-captions", "3") == 1  # unknown extension: jsonl
    records = [r for r in _jsonl(tmp_path / "j.out") if "error" not in r]
    assert all(len(r["captions"]) == 3 and r["captions"][0]["caption"] == r["caption"] for r in records)


def test_coco_to_stdout(mixed: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _caption(mixed / "a.jpg", mixed / "corrupt.jpg", "--model", tiny_model_dir, "--format", "coco",
                    "--workers", "0") == 1
    captured = capsys.readouterr()
    assert [r["image_id"] for r in json.loads(captured.out)] == ["a"]
    assert "failed: " in captured.err and "corrupt.jpg" in captured.err


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_after_a_killed_run(
    fmt: str, mixed: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"caps.{fmt}"
    args = [mixed, "-r", "--model", tiny_model_dir, "--workers", "0", "--out", out, "--format", fmt]
    assert _caption(*args) == 1
    complete = out.read_bytes()
    lines = complete.splitlines(keepends=True)
    # A killed run: the first 4 lines (header included for csv) made it, the 5th was cut mid-write.
    out.write_bytes(b"".join(lines[:4]) + lines[4][:7])
    capsys.readouterr()

    assert _caption(*args, "--resume") == 1  # corrupt.jpg failed (in the first part or now): still non-zero
    err = capsys.readouterr().err
    assert "removed a cut-off last line (7 bytes)" in err
    # Only the rest was captioned: jsonl had 4 records (042, a, b, c), csv a header and 3 (042, a, b).
    expected = "captioned 2 images, 3 failed" if fmt == "jsonl" else "captioned 3 images, 3 failed"
    assert expected in err and f"{4 if fmt == 'jsonl' else 3} already in" in err
    # Exactly the same file as the uninterrupted run: one record per image, nothing lost or repeated.
    assert out.read_bytes() == complete

    # Resuming a finished file does nothing.
    assert _caption(*args, "--resume") == 1
    assert "captioned 0 images, 0 failed" in capsys.readouterr().err and out.read_bytes() == complete


def test_usage_errors_and_resume_refusals(
    mixed: Path, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [mixed, "--model", tiny_model_dir, "--workers", "0", "--resume"]
    assert _caption(*base, "--out", tmp_path / "r.json") == 2  # coco: refused clearly
    assert "not supported for --format coco" in capsys.readouterr().err
    assert _caption(*base) == 2  # no --out
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text('{"image": "x", "caption": "c"}\nnot json\n{"image": "y", "caption": "c"}\n')
    assert _caption(*base, "--out", damaged) == 2
    assert "damaged.jsonl:2 is not a captioner record" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("image,caption,log_prob,error\n")
    assert _caption(*base, "--out", other, "--num-captions", "2") == 2
    assert "another --num-captions" in capsys.readouterr().err
    assert _caption("--model", str(tiny_model_dir)) == 2  # no PATH at all
    assert _caption(mixed, "--model", tiny_model_dir, "--device", "tpu") == 2
    assert "--device must be cpu, cuda or cuda:N" in capsys.readouterr().err
    assert read_completed(tmp_path / "absent.jsonl", "jsonl") == Completed()


def test_shards_cover_every_input_exactly_once(mixed: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    seen: list[str] = []
    for i in range(3):
        out = tmp_path / f"shard{i}.jsonl"
        _caption(mixed, "-r", "--model", tiny_model_dir, "--workers", "0", "--shard", f"{i}/3", "--out", out)
        seen += [r["image"] for r in _jsonl(out)] if out.exists() else []
    assert sorted(seen) == discover_images([str(mixed)], recursive=True)


def test_torchrun_rank_writes_its_own_file(
    mixed: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    images: list[str] = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        _caption(mixed, "--model", tiny_model_dir, "--workers", "0", "--out", tmp_path / "caps.jsonl", "-q")
        images += [r["image"] for r in _jsonl(tmp_path / f"caps.rank{rank}.jsonl")]
    assert sorted(images) == discover_images([str(mixed)]) and not (tmp_path / "caps.jsonl").exists()
    assert _caption(mixed, "--model", tiny_model_dir) == 2  # a rank needs --out


def test_from_list_and_globs(mixed: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos to caption\n{mixed / 'a.jpg'}\n\n  {mixed / 'nested'}  \n{mixed}/*.PNG\n")
    out = tmp_path / "caps.jsonl"
    assert _caption("--from-list", listing, f"{mixed}/c.*", "--model", tiny_model_dir, "--workers", "0",
                    "--out", out) == 0
    assert _names(_jsonl(out), mixed) == ["a.jpg", "b.PNG", "c.JpEg", "nested/d.png"]


def test_console_script(mixed: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "caps.csv"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")} | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [VENV_BIN / "captioner", "caption", mixed, "--model", tiny_model_dir, "--out", out, "--batch-size", "4"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 1, proc.stderr
    assert "captioned 4 images, 3 failed" in proc.stderr and proc.stdout == ""
    with open(out, newline="") as f:
        assert len(list(csv.DictReader(f))) == len(TOP_LEVEL)


# --- resume integrity: one image per file, whatever the spelling (issue #13 point 6) ---------------------------------


def _spell(path: Path, how: str, root: Path) -> str:
    """``path`` (under ``root``, the working directory) spelled relative, absolute, or through ``root/link``."""
    if how == "relative":
        return os.path.relpath(path, root)
    if how == "absolute":
        return str(path)
    return str(root / "link" / path.relative_to(root))


@pytest.fixture()
def spelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with photos/ (4 good images, 1 broken), out/ and link -> the directory itself."""
    for i, name in enumerate(["a.jpg", "b.png", "c.jpg", "d.png"]):
        _photo(tmp_path / "photos" / name, i)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)
    (tmp_path / "out").mkdir()
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("first", "second", "third"), [
    ("relative", "absolute", "symlinked"),
    ("absolute", "relative", "symlinked"),
    ("symlinked", "absolute", "relative"),
])
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_resume_with_other_spellings_of_out_and_inputs(
    first: str, second: str, third: str, fmt: str, spelled: Path, tiny_model_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    photos, out = spelled / "photos", spelled / "out" / f"caps.{fmt}"

    def run(how: str, *extra: str) -> int:
        return _caption(_spell(photos, how, spelled), "--out", _spell(out, how, spelled), "--model", tiny_model_dir,
                        "--workers", "0", "--batch-size", "2", *extra)

    assert run(first) == 1
    complete = out.read_bytes()
    lines = complete.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:3]) + lines[3][:5])  # killed: 3 lines (csv: header + 2), the 4th cut
    capsys.readouterr()

    assert run(second, "--resume") == 1
    assert "already in" in capsys.readouterr().err
    if fmt == "jsonl":
        images = [r["image"] for r in _jsonl(out)]
    else:
        with open(out, newline="") as f:
            images = [r["image"] for r in csv.DictReader(f)]
    # Every file exactly once: no duplicates, no gaps; the records that were there keep their spelling.
    assert sorted(os.path.realpath(i) for i in images) == sorted(str(p.resolve()) for p in photos.iterdir())
    assert out.read_bytes().startswith(b"".join(lines[:3]))

    assert run(third, "--resume") == 1  # a third spelling: nothing left to do
    assert "captioned 0 images, 0 failed" in capsys.readouterr().err
    assert len(out.read_bytes().splitlines()) == len(lines)


def test_resume_refuses_a_file_whose_records_match_no_input(
    spelled: Path, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = spelled / "out" / "caps.jsonl"
    common = ["--out", str(out), "--model", tiny_model_dir, "--workers", "0", "-q"]
    assert _caption("photos", *common) == 1
    before = out.read_bytes()
    capsys.readouterr()
    other = tmp_path / "other"
    _photo(other / "x.jpg", 9)
    # Another folder: not one record matches, so appending would only mix two jobs.
    assert _caption(other, *common, "--resume") == 2
    err = capsys.readouterr().err
    assert "refusing to append" in err and "'photos/a.jpg'" in err and len(err.strip().splitlines()) == 1
    # Relative records read from another directory name other files (none of them an input): refused.
    monkeypatch.chdir(spelled / "out")
    _photo(spelled / "out" / "photos" / "z.jpg", 1)
    assert _caption("photos", *common, "--resume") == 2
    assert "refusing to append" in capsys.readouterr().err
    assert out.read_bytes() == before
    # A subset of the inputs is fine: nothing to do.
    monkeypatch.chdir(spelled)
    assert _caption(str(spelled / "photos" / "a.jpg"), *common, "--resume") == 1  # the earlier failure counts
    assert out.read_bytes() == before


def test_spellings_of_one_file_are_one_image(spelled: Path) -> None:
    spellings = ["photos/a.jpg", str(spelled / "photos" / "a.jpg"), "link/photos/a.jpg", "photos/../photos/a.jpg"]
    assert discover_images(spellings) == [str(spelled / "photos" / "a.jpg")]  # the first in sorted order
    assert len(discover_images(["photos", "link/photos", str(spelled / "photos")])) == 5


def test_csv_written_before_the_score_column_resumes_in_its_own_layout(
    mixed: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "old.csv"
    args = [mixed, "--model", tiny_model_dir, "--workers", "0", "--out", out, "-q"]
    assert _caption(*args) == 1
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    # The layout of earlier versions (no score), with the first two images done.
    old = [[v for c, v in zip(rows[0], row, strict=True) if c != "score"] for row in rows[:3]]
    with open(out, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(old)
    assert _caption(*args, "--resume") == 1
    with open(out, newline="") as f:
        resumed = list(csv.reader(f))
    assert resumed[0] == ["image", "caption", "log_prob", "error"] and all(len(r) == 4 for r in resumed)
    assert [r[0] for r in resumed[1:]] == [r[0] for r in rows[1:]]
