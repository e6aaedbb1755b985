"""``--resume`` matches records to inputs by the file they name, however either side spells the path.

A record written as ``photos/a.jpg`` and an input given as ``/abs/photos/a.jpg``, ``./photos/a.jpg``,
``photos/../photos/a.jpg`` or through a symbolic link are one image: it must not be captioned again, and the output
must not get a second record for it. Unit tests over every pair of spellings (both on the record side and on the
input side), then the command itself with spellings the other resume test does not use (``./``, a list file, a
symbolic link to one file).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.batch import Completed, image_key, read_completed
from captioner.batch.writers import csv_columns
from captioner.cli import main

SPELLINGS = ["relative", "dot", "absolute", "dotdot", "linked-folder", "linked-file"]


def spell(root: Path, name: str, how: str) -> str:
    """``photos/NAME`` under ``root`` (the working directory) in one of :data:`SPELLINGS`."""
    if how == "relative":
        return f"photos/{name}"
    if how == "dot":
        return f"./photos/{name}"
    if how == "absolute":
        return str(root / "photos" / name)
    if how == "dotdot":
        return f"photos/../photos/{name}"
    if how == "linked-folder":
        return f"link/photos/{name}"  # link -> the working directory itself
    return f"file-links/{name}"  # file-links/NAME -> photos/NAME


def _photo(path: Path, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "photos").mkdir()
    (tmp_path / "file-links").mkdir()
    for seed, name in enumerate(["a.jpg", "b.jpg", "c.jpg"]):
        _photo(tmp_path / "photos" / name, seed)
        (tmp_path / "file-links" / name).symlink_to(tmp_path / "photos" / name)
    (tmp_path / "link").symlink_to(tmp_path, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("written", SPELLINGS)
@pytest.mark.parametrize("given", SPELLINGS)
def test_completed_matches_every_spelling_pair(workdir: Path, written: str, given: str) -> None:
    done = Completed()
    done.add(spell(workdir, "a.jpg", written), failed=False)
    done.add(spell(workdir, "b.jpg", written), failed=True)  # a failed image counts as done too
    inputs = [spell(workdir, name, given) for name in ("a.jpg", "b.jpg", "c.jpg")]
    assert done.remaining(inputs) == [inputs[2]]  # only c, in the input's own spelling
    assert done.failed == 1
    assert image_key(spell(workdir, "a.jpg", written)) == image_key(spell(workdir, "a.jpg", given))
    assert image_key(spell(workdir, "a.jpg", written)) != image_key(spell(workdir, "b.jpg", given))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@pytest.mark.parametrize(("written", "given"), [("relative", "absolute"), ("absolute", "dot"),
                                                ("dot", "linked-folder"), ("linked-file", "relative")])
def test_read_completed_keys_records_by_file(workdir: Path, fmt: str, written: str, given: str) -> None:
    out = workdir / f"out.{fmt}"
    images = [spell(workdir, "a.jpg", written), spell(workdir, "b.jpg", written)]
    if fmt == "jsonl":
        out.write_text("".join(json.dumps({"image": i, "caption": "x", "log_prob": -1.0, "score": -1.0}) + "\n"
                               for i in images))
    else:
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(csv_columns(1, tags=False))
            writer.writerow([images[0], "x", -1.0, -1.0, ""])
            writer.writerow([images[1], "", "", "", "not_an_image: damaged"])
    done = read_completed(out, fmt)
    assert done.images == {str((workdir / "photos" / n).resolve()) for n in ("a.jpg", "b.jpg")}
    assert done.failed == (1 if fmt == "csv" else 0)
    inputs = [spell(workdir, n, given) for n in ("c.jpg", "b.jpg", "a.jpg")]
    assert done.remaining(inputs) == [inputs[0]]


def test_remaining_keeps_order_and_refuses_a_file_that_matches_nothing(workdir: Path) -> None:
    done = Completed()
    done.add("photos/b.jpg", failed=False)
    inputs = [spell(workdir, n, "absolute") for n in ("c.jpg", "b.jpg", "a.jpg")]
    assert done.remaining(inputs) == [inputs[0], inputs[2]]
    assert Completed().remaining(inputs) == inputs  # nothing done yet: everything, in order
    assert done.remaining([]) == []
    with pytest.raises(Exception, match="refusing to append"):
        done.remaining([spell(workdir, "a.jpg", "dot"), spell(workdir, "c.jpg", "linked-file")])


def test_command_resumes_across_spellings_without_recaptioning(
    workdir: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = workdir / "caps.jsonl"
    common = ["--out", str(out), "--model", str(tiny_model_dir), "--workers", "0", "--tags", "0",
              "--runtime", "torch"]
    assert main(["caption", "./photos/a.jpg", "./photos/b.jpg", *common]) == 0
    first = out.read_text()
    assert [json.loads(line)["image"] for line in first.splitlines()] == ["photos/a.jpg", "photos/b.jpg"]
    capsys.readouterr()
    # All three, listed through a list file with other spellings: only c is captioned, and appended.
    listing = workdir / "list.txt"
    listing.write_text(f"{spell(workdir, 'a.jpg', 'linked-file')}\n{spell(workdir, 'b.jpg', 'absolute')}\n"
                       f"{spell(workdir, 'c.jpg', 'dotdot')}\n")
    assert main(["caption", "--from-list", str(listing), *common, "--resume"]) == 0
    assert "captioned 1 images" in capsys.readouterr().err
    text = out.read_text()
    assert text.startswith(first)
    records = [json.loads(line) for line in text.splitlines()]
    assert sorted(os.path.realpath(r["image"]) for r in records) == sorted(
        str((workdir / "photos" / n).resolve()) for n in ("a.jpg", "b.jpg", "c.jpg"))
    # A third run, through the folder link: nothing left, nothing written.
    assert main(["caption", "link/photos", *common, "--resume"]) == 0
    assert "captioned 0 images" in capsys.readouterr().err
    assert out.read_text() == text
