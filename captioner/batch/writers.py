"""Record writers: JSON lines, CSV or a COCO results file, one batch of records at a time.

Each batch's records go out together and are forgotten: memory stays flat however many images there are. JSON
lines and CSV are appended to (``--resume``) and made durable batch by batch; a COCO results file is one JSON array,
published whole when the run ends.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from captioner.atomic import AtomicFile
from captioner.batch.records import Record
from captioner.errors import CaptionerError

FORMATS = ("jsonl", "csv", "coco")
RESUMABLE_FORMATS = ("jsonl", "csv")


class BatchOutputError(CaptionerError):
    """An output file cannot be resumed: it is damaged or was written with other settings."""


def check_resumable(fmt: str) -> None:
    """Raise :class:`BatchOutputError` unless ``--resume`` can append to files of format ``fmt``."""
    if fmt not in RESUMABLE_FORMATS:
        raise BatchOutputError(f"--resume is not supported for --format {fmt}: a COCO results file is one JSON array, "
                               "written whole at the end; caption to jsonl with --resume, then convert")


def coco_image_id(path: str) -> int | str:
    """The COCO ``image_id`` of a file: its stem as an int when it is all digits (``000000123.jpg`` -> 123, the COCO
    and numeric Flickr naming), else the stem string (``1000268201_693b08cb0e.jpg`` -> ``"1000268201_693b08cb0e"``)."""
    stem = Path(path).stem
    return int(stem) if stem.isascii() and stem.isdigit() else stem


class _Sink:
    """Where a writer's text goes: a file (each write flushed and fsynced: durable once ``write`` returns) or a text
    stream such as stdout (flushed)."""

    def __init__(self, path: Path | None = None, append: bool = False, stream: TextIO | None = None,
                 durable: bool = True) -> None:
        self.path = path
        self.stream = stream
        self.durable = durable
        self.file = open(path, "ab" if append else "wb") if path is not None else None

    @property
    def empty(self) -> bool:
        return self.file is not None and self.file.tell() == 0

    def write(self, text: str) -> None:
        if self.file is None:
            assert self.stream is not None
            self.stream.write(text)
            self.stream.flush()
            return
        self.file.write(text.encode("utf-8", "surrogateescape"))  # one write per batch
        self.file.flush()
        if self.durable:
            os.fsync(self.file.fileno())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class RecordWriter(ABC):
    """Writes batches of records; :meth:`close` finishes the output, :meth:`abort` stops without finishing."""

    @abstractmethod
    def write(self, records: Sequence[Record]) -> None:
        """Write one batch of records together."""

    @abstractmethod
    def close(self) -> None:
        """Finish the output after the last batch."""

    def abort(self) -> None:
        """Stop after a failure or an interrupt; what was written so far stays valid where the format allows."""
        self.close()


class JsonlWriter(RecordWriter):
    """One JSON object a line; a batch's lines go out in one write, then flush and fsync."""

    def __init__(self, sink: _Sink) -> None:
        self.sink = sink

    def write(self, records: Sequence[Record]) -> None:
        if records:
            self.sink.write("".join(json.dumps(record) + "\n" for record in records))

    def close(self) -> None:
        self.sink.close()


def csv_columns(num_captions: int = 1, score: bool = True, tags: bool = False) -> list[str]:
    """``image, caption, log_prob, score`` (the best caption), ``caption_2, log_prob_2, score_2, ...`` for more,
    ``tags`` when the records have tags, then ``error``. ``score=False`` gives the columns of files written before
    records had a score (still resumable: appended rows then keep that layout)."""
    names = ("caption", "log_prob", "score") if score else ("caption", "log_prob")
    extra = [f"{name}_{i}" for i in range(2, num_captions + 1) for name in names]
    return ["image", *names, *extra, *(["tags"] if tags else []), "error"]


def _csv_row(record: Record, columns: Sequence[str]) -> list[str]:
    values: dict[str, Any] = {"image": record["image"], "error": record.get("error", "")}
    if "caption" in record:
        values |= {"caption": record["caption"], "log_prob": record["log_prob"], "score": record["score"]}
        for i, extra in enumerate(record.get("captions", [])[1:], start=2):
            values |= {f"{name}_{i}": extra[name] for name in ("caption", "log_prob", "score")}
        # One cell, most likely first: "espresso (0.8731); cup (0.0512)" (ImageNet labels have no ';' or '(').
        values["tags"] = "; ".join(f"{t['label']} ({t['probability']})" for t in record.get("tags", []))
    # A line break inside a field would make a cut-off last row look complete; error messages are the only risk.
    return [str(values.get(c, "")).replace("\r", " ").replace("\n", " ") for c in columns]


class CsvWriter(RecordWriter):
    """A CSV file with a header row (written when the file is empty), one row per image."""

    def __init__(
        self, sink: _Sink, num_captions: int = 1, header: bool = True, columns: list[str] | None = None,
        tags: bool = False,
    ) -> None:
        self.sink = sink
        self.columns = columns or csv_columns(num_captions, tags=tags)
        if header:
            self.sink.write(self._format([self.columns]))

    @staticmethod
    def _format(rows: Iterable[list[str]]) -> str:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        return buffer.getvalue()

    def write(self, records: Sequence[Record]) -> None:
        if records:
            self.sink.write(self._format(_csv_row(r, self.columns) for r in records))

    def close(self) -> None:
        self.sink.close()


class CocoWriter(RecordWriter):
    """A COCO results file, ``[{"image_id": ..., "caption": ...}, ...]``, for ``captioner evaluate``.

    The array is streamed into a temporary file beside ``path`` and renamed over it by :meth:`close`, so ``path`` is
    either the previous file or the complete new one. Error records have no place in a results file and are skipped
    (the command reports them on stderr); with several captions per image only the best is written.
    """

    def __init__(self, path: Path | None = None, stream: TextIO | None = None) -> None:
        self.file = AtomicFile(path) if path is not None else None
        self.sink = _Sink(self.file.tmp, durable=False) if self.file is not None else _Sink(stream=stream or sys.stdout)
        self.count = 0
        self.sink.write("[")

    def write(self, records: Sequence[Record]) -> None:
        parts = []
        for record in records:
            if "error" in record:
                continue
            entry = {"image_id": coco_image_id(record["image"]), "caption": record["caption"]}
            parts.append(("\n" if self.count == 0 else ",\n") + json.dumps(entry))
            self.count += 1
        if parts:
            self.sink.write("".join(parts))

    def close(self) -> None:
        self.sink.write("\n]\n" if self.count else "]\n")
        self.sink.close()
        if self.file is not None:
            self.file.commit()

    def abort(self) -> None:
        self.sink.close()
        if self.file is not None:
            self.file.discard()


def infer_format(out: str | Path | None) -> str:
    """The format an output file name implies: ``.csv`` -> csv, ``.json`` -> coco, anything else -> jsonl."""
    suffix = Path(out).suffix.lower() if out is not None else ""
    return {".csv": "csv", ".json": "coco"}.get(suffix, "jsonl")


def open_writer(
    fmt: str, out: Path | None = None, num_captions: int = 1, append: bool = False, stream: TextIO | None = None,
    tags: bool = False,
) -> RecordWriter:
    """A writer of format ``fmt`` to the file ``out`` (replaced, or appended to with ``append``) or to ``stream``
    (default stdout) when ``out`` is None; ``tags``: the records carry tags (a CSV column for them)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (expected one of {FORMATS})")
    if append:
        check_resumable(fmt)
    if fmt == "coco":
        return CocoWriter(out, stream)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    sink = _Sink(out, append=append) if out is not None else _Sink(stream=stream or sys.stdout)
    if fmt == "csv":
        header = out is None or sink.empty
        # Appended rows follow the file's own header (it may predate the score columns).
        columns = None if header else read_csv_header(out)
        return CsvWriter(sink, num_captions, header=header, columns=columns, tags=tags)
    return JsonlWriter(sink)


def read_csv_header(path: Path) -> list[str] | None:
    """The header row of a CSV file (None when it is empty)."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        return next(csv.reader(f), None)
