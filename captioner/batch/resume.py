"""``--resume``: what an existing output file already holds, after repairing a line cut by a kill."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from captioner.batch.inputs import image_key
from captioner.batch.writers import BatchOutputError, check_resumable, csv_columns


def repair_partial_line(path: str | Path) -> int:
    """Truncate a last line without its newline (a run killed mid-write); returns how many bytes were cut."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Scan back in chunks for the last newline; everything after it is the cut-off line.
        end, chunk = size, 1 << 16
        keep = 0
        while end > 0:
            start = max(0, end - chunk)
            f.seek(start)
            found = f.read(end - start).rfind(b"\n")
            if found >= 0:
                keep = start + found + 1
                break
            end = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


@dataclass
class Completed:
    """The images an existing output file already has a record for, by :func:`image_key`."""

    images: set[str] = field(default_factory=set)
    failed: int = 0  # how many of those records are errors
    repaired_bytes: int = 0  # bytes of a cut-off last line that were removed
    path: Path | None = field(default=None, compare=False)  # the output file they were read from
    example: str = field(default="", compare=False)  # one record's image field as written, for error messages

    def add(self, image: str, failed: bool) -> None:
        """Count one record of the output file."""
        self.images.add(image_key(image))
        self.failed += failed
        self.example = self.example or image

    def remaining(self, paths: Sequence[str]) -> list[str]:
        """The paths that have no record yet, in order.

        Raises :class:`BatchOutputError` when the file has records but none of them is one of ``paths``: appending
        would repeat every image (another folder, or relative paths written from another directory).
        """
        todo = [p for p in paths if image_key(p) not in self.images]
        if self.images and paths and len(todo) == len(paths):
            raise BatchOutputError(
                f"none of the {len(self.images)} images in {self.path} is one of the {len(paths)} inputs (it has "
                f"e.g. {self.example!r}; relative paths are resolved against the current directory); refusing to "
                "append: run from the first run's directory or with its PATHs, or write to a new --out"
            )
        return todo


def read_completed(path: str | Path, fmt: str, num_captions: int = 1, tags: bool = False) -> Completed:
    """Repair and read an output file for ``--resume``; a missing file has nothing completed.

    Raises :class:`BatchOutputError` when a complete line is not a valid record or, for CSV, when the header differs
    from the one this run would write (e.g. another ``--num-captions``, or tags in one run and not the other).
    """
    path = Path(path)
    check_resumable(fmt)
    done = Completed(path=path)
    if not path.exists():
        return done
    done.repaired_bytes = repair_partial_line(path)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        if fmt == "jsonl":
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    image = record["image"]
                    if not isinstance(image, str):
                        raise TypeError(f"image must be a string, got {image!r}")
                except (json.JSONDecodeError, TypeError, KeyError) as exc:
                    raise BatchOutputError(f"{path}:{number} is not a captioner record ({exc}); cannot resume") from exc
                done.add(image, "error" in record)
        else:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return done
            expected = csv_columns(num_captions, tags=tags)
            if header not in (expected, csv_columns(num_captions, score=False, tags=tags)):
                raise BatchOutputError(
                    f"{path} has columns {header}, but this run writes {expected} "
                    "(another --num-captions or --tags?); cannot resume"
                )
            for row in reader:
                if len(row) != len(header):
                    raise BatchOutputError(f"{path}:{reader.line_num} has {len(row)} fields, expected {len(header)}")
                done.add(row[0], bool(row[-1]))
    return done
