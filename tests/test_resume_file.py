"""Reading an output file for ``--resume``, in-process: repairing a cut last line, and every way a file is refused.

A resumed run appends to what a killed run left: a half-written last line must go (exactly it, however long), and a
file that is not this run's kind of output must be refused with a message naming the file and the problem.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from captioner.batch import Completed, image_key, read_completed, repair_partial_line
from captioner.batch.writers import BatchOutputError, csv_columns

RECORD = json.dumps({"image": "photos/a.jpg", "caption": "a dog", "log_prob": -1.0, "score": -0.5})
FAILED = json.dumps({"image": "photos/b.jpg", "error": "not_an_image: empty file"})


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        (b"", b""),
        (b"one\ntwo\n", b"one\ntwo\n"),  # complete: untouched
        (b"one\ntwo\nthr", b"one\ntwo\n"),
        (b"no newline at all", b""),
        (b"\n", b"\n"),
        (b"one\n" + b"x" * 200_000, b"one\n"),  # a cut line longer than the 64 KiB scan chunk
        (b"y" * 70_000 + b"\n" + b"x" * 70_000, b"y" * 70_000 + b"\n"),  # the newline in an earlier chunk
        (b"x" * 65_536 + b"\n" + b"z", b"x" * 65_536 + b"\n"),  # the newline right at a chunk's end
        (b"\n" + b"x" * 65_536, b"\n"),  # the only newline is the file's first byte, one chunk back
        (b"\n" + b"x" * 131_072, b"\n"),  # ... two chunks back
    ],
)
def test_repair_partial_line(tmp_path: Path, content: bytes, kept: bytes) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(content)
    assert repair_partial_line(path) == len(content) - len(kept)
    assert path.read_bytes() == kept


def test_missing_file_has_nothing_completed(tmp_path: Path) -> None:
    done = read_completed(tmp_path / "none.jsonl", "jsonl")
    assert done == Completed() and done.path == tmp_path / "none.jsonl"
    assert not (tmp_path / "none.jsonl").exists()


def test_jsonl_records_counted_blank_lines_skipped_cut_line_repaired(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    other_failure = json.dumps({"image": "photos/d.jpg", "error": "corrupt_image: truncated"})
    path.write_text(f"{RECORD}\n\n   \n{FAILED}\n{other_failure}\n{RECORD}\n" + '{"image": "photos/c.j')
    done = read_completed(path, "jsonl")
    assert done.images == {str(Path(f"photos/{n}.jpg").resolve()) for n in "abd"}
    assert (done.failed, done.repaired_bytes, done.example) == (2, len('{"image": "photos/c.j'), "photos/a.jpg")
    assert path.read_text() == f"{RECORD}\n\n   \n{FAILED}\n{other_failure}\n{RECORD}\n"


def test_csv_keeps_any_file_name_byte_for_byte(tmp_path: Path) -> None:
    """File names are bytes: one that is not UTF-8 (kept as surrogate escapes) or holds a carriage return must come
    back from the CSV exactly as the writer wrote it, or its image would be captioned again."""
    names = ["photos/caf\xe9.jpg", "photos/" + b"\xff\xfe".decode("utf-8", "surrogateescape") + ".jpg",
             "photos/two\rlines.jpg", "photos/crlf\r\n.jpg"]
    path = tmp_path / "out.csv"
    with open(path, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(csv_columns(1))
        for name in names:
            writer.writerow([name, "a dog", "-1.0", "-0.5", ""])
    done = read_completed(path, "csv")
    assert done.images == {image_key(name) for name in names}
    assert done.remaining(names + ["photos/new.jpg"]) == ["photos/new.jpg"]


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("not json", "Expecting value"),
        ('{"caption": "a dog"}', "'image'"),
        ('{"image": 3}', "image must be a string, got 3"),
        ("[1, 2]", "list indices"),
    ],
)
def test_jsonl_line_that_is_not_a_record_is_refused(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(f"{RECORD}\n{line}\n")
    with pytest.raises(BatchOutputError) as error:
        read_completed(path, "jsonl")
    message = str(error.value)
    assert message.startswith(f"{path}:2 is not a captioner record (") and message.endswith("); cannot resume")
    assert problem in message


def _csv(path: Path, header: list[str], *rows: list[str]) -> None:
    lines = [",".join(header)] + [",".join(row) for row in rows]
    path.write_text("\r\n".join(lines) + "\r\n")


def test_csv_rows_counted(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    _csv(path, csv_columns(1), ["photos/a.jpg", "a dog", "-1.0", "-0.5", ""],
         ["photos/b.jpg", "", "", "", "not_an_image: empty file"])
    done = read_completed(path, "csv")
    assert len(done.images) == 2 and done.failed == 1 and done.example == "photos/a.jpg"
    # The layout from before the score column is still resumable.
    _csv(path, csv_columns(2, score=False), ["photos/a.jpg", "a", "-1", "b", "-2", ""])
    assert read_completed(path, "csv", num_captions=2).failed == 0


def test_csv_with_tags_column(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    _csv(path, csv_columns(1, tags=True), ["photos/a.jpg", "a dog", "-1.0", "-0.5", "cup 0.5", ""])
    assert len(read_completed(path, "csv", tags=True).images) == 1
    _csv(path, csv_columns(1, score=False, tags=True), ["photos/a.jpg", "a dog", "-1.0", "cup 0.5", ""])
    assert len(read_completed(path, "csv", tags=True).images) == 1  # from before the score column, with tags
    with pytest.raises(BatchOutputError, match="another --num-captions or --tags"):
        read_completed(path, "csv", tags=False)


def test_empty_csv_has_nothing_completed(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    path.write_text("")
    assert read_completed(path, "csv") == Completed()


def test_csv_with_other_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    _csv(path, csv_columns(1), ["photos/a.jpg", "a dog", "-1.0", "-0.5", ""])
    with pytest.raises(BatchOutputError) as error:
        read_completed(path, "csv", num_captions=2)
    assert str(error.value) == (
        f"{path} has columns {csv_columns(1)}, but this run writes {csv_columns(2)} "
        "(another --num-captions or --tags?); cannot resume")


def test_csv_row_with_a_wrong_field_count_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    _csv(path, csv_columns(1), ["photos/a.jpg", "a dog", "-1.0", "-0.5", ""], ["photos/b.jpg", "x"])
    with pytest.raises(BatchOutputError) as error:
        read_completed(path, "csv")
    assert str(error.value) == f"{path}:3 has 2 fields, expected 5"


def test_coco_cannot_be_resumed(tmp_path: Path) -> None:
    with pytest.raises(BatchOutputError, match="--resume is not supported for --format coco"):
        read_completed(tmp_path / "out.json", "coco")


def test_refusal_names_the_file_counts_and_an_example(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(f"{RECORD}\n{FAILED}\n")
    done = read_completed(path, "jsonl")
    with pytest.raises(BatchOutputError) as error:
        done.remaining(["other/x.jpg", "other/y.jpg", "other/z.jpg"])
    assert str(error.value) == (
        f"none of the 2 images in {path} is one of the 3 inputs (it has e.g. 'photos/a.jpg'; relative paths are "
        "resolved against the current directory); refusing to append: run from the first run's directory or with "
        "its PATHs, or write to a new --out")
    assert done.remaining(["other/x.jpg", "photos/a.jpg"]) == ["other/x.jpg"]  # one match is enough
