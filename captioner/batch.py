"""Streaming batch captioning: image files in, one output record per image out.

The engine behind ``captioner caption``. Its pieces, in the order a run uses them:

* :func:`discover_images` turns files, folders and globs into one sorted, de-duplicated list of paths.
* :class:`Shard` picks a deterministic share of that list, so N machines (or torchrun ranks) split one job.
* :func:`read_completed` reads an existing output file for ``--resume`` (repairing a line cut by a kill).
* :func:`caption_batches` streams the paths through a torch ``DataLoader`` whose worker processes decode and
  preprocess images with the library's one preprocessing path while the model captions the previous batch; a file
  that cannot be used comes back as an error record, never as an exception.
* A :class:`RecordWriter` (JSON lines, CSV or a COCO results file) writes each batch's records together and forgets
  them: memory stays flat however many images there are.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
import re
import sys
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from captioner.api import Caption, Captioner
from captioner.atomic import _fsync_dir
from captioner.decoding import DecodingOptions
from captioner.errors import CaptionerError
from captioner.preprocess import DEFAULT_MAX_PIXELS, PreprocessConfig, load_image, to_tensor
from captioner.tags import Tag

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
FORMATS = ("jsonl", "csv", "coco")
_GLOB_CHARS = re.compile(r"[*?[]")

Record = dict[str, Any]


class BatchOutputError(CaptionerError):
    """An output file cannot be resumed: it is damaged or was written with other settings."""


# --------------------------------------------------------------------------------------------------------------------
# Inputs


def _scan_folder(folder: str, recursive: bool) -> list[str]:
    """Files with an image extension (case-insensitive) in ``folder``, and in its sub-folders when ``recursive``.

    Symbolic links to folders are not followed (no loops); links to files are kept.
    """
    found = []
    if recursive:
        for root, _dirs, files in os.walk(folder):
            found.extend(os.path.join(root, name) for name in files)
    else:
        with os.scandir(folder) as entries:
            found.extend(os.path.join(folder, e.name) for e in entries if e.is_file())
    return [path for path in found if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS]


def expand_path(arg: str, recursive: bool = False) -> list[str]:
    """The image paths one command-line PATH stands for.

    A folder gives its image files (by extension); a glob (``*``, ``?``, ``[``; ``**`` with ``recursive``) gives
    every file it matches, whatever the extension, and the image files of every folder it matches. Anything else is
    an explicit file and is always attempted, so a missing or unreadable one gets an error record; a glob that
    matches nothing is treated the same way.
    """
    if os.path.isdir(arg):
        return _scan_folder(arg, recursive)
    if os.path.lexists(arg) or not _GLOB_CHARS.search(arg):
        return [arg]
    matches = glob.glob(arg, recursive=recursive)
    if not matches:
        return [arg]
    paths: list[str] = []
    for match in matches:
        paths.extend(_scan_folder(match, recursive) if os.path.isdir(match) else [match])
    return paths


def read_path_list(file: str | Path, stdin: TextIO | None = None) -> list[str]:
    """The entries of a ``--from-list`` file (``-`` is standard input): one PATH a line, ``#`` comments and blank
    lines ignored, surrounding whitespace stripped. Relative entries are relative to the working directory."""
    if str(file) == "-":
        lines = (stdin or sys.stdin).read().splitlines()
    else:
        lines = Path(file).read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def discover_images(paths: Iterable[str], recursive: bool = False, list_files: Iterable[str | Path] = ()) -> list[str]:
    """Every image path the arguments and list files stand for: normalised, de-duplicated, in sorted order.

    The order (plain string order of the normalised paths) is the same on every machine that sees the same files,
    which ``--resume`` and ``--shard`` rely on.
    """
    args = list(paths)
    for file in list_files:
        args.extend(read_path_list(file))
    found = {os.path.normpath(p) for arg in args for p in expand_path(arg, recursive)}
    return sorted(found)


@dataclass(frozen=True)
class Shard:
    """Share ``index`` of ``count`` (0 <= index < count): the paths whose stable hash is ``index`` modulo ``count``.

    The hash (BLAKE2b of the path string) depends on nothing but the path, so a path always lands in the same shard,
    even when other files are added to the job later; shard sizes are equal up to random variation.
    """

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index}/{self.count} is out of range: need 0 <= I < N")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/N"``, e.g. ``"0/4"`` for the first of four shards."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not match:
            raise ValueError(f"shard must look like I/N (e.g. 0/4), got {text!r}")
        return cls(int(match[1]), int(match[2]))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Shard | None:
        """The torchrun shard (``RANK``/``WORLD_SIZE``), or None when not running under a multi-process launcher."""
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return None
        return cls(int(env.get("RANK", "0") or 0), world)

    def contains(self, path: str) -> bool:
        """Whether ``path`` belongs to this shard."""
        digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.count == self.index

    def select(self, paths: Iterable[str]) -> list[str]:
        """This shard's paths, in their original order."""
        return [path for path in paths if self.contains(path)]


def rank_output_path(path: str | Path, rank: int) -> Path:
    """``captions.jsonl`` -> ``captions.rank3.jsonl``: each torchrun rank writes its own file."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def coco_image_id(path: str) -> int | str:
    """The COCO ``image_id`` of a file: its stem as an int when it is all digits (``000000123.jpg`` -> 123, the COCO
    and numeric Flickr naming), else the stem string (``1000268201_693b08cb0e.jpg`` -> ``"1000268201_693b08cb0e"``)."""
    stem = Path(path).stem
    return int(stem) if stem.isascii() and stem.isdigit() else stem


# --------------------------------------------------------------------------------------------------------------------
# Loading: DataLoader workers decode and preprocess while the model runs


class PathTable(Sequence[str]):
    """A read-only list of path strings stored in one bytes buffer and a numpy offset array.

    DataLoader workers are forked: a Python list of millions of ``str`` objects would be copied page by page into
    every worker as reference counts are touched; two flat buffers are not.
    """

    def __init__(self, paths: Iterable[str]) -> None:
        encoded = [p.encode("utf-8", "surrogateescape") for p in paths]
        self._blob = b"".join(encoded)
        self._ends = np.cumsum(np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded)))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]  # slices are not needed
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        start = int(self._ends[index - 1]) if index else 0
        return self._blob[start : int(self._ends[index])].decode("utf-8", "surrogateescape")


class LoadedImage(NamedTuple):
    """One DataLoader item: the preprocessed tensor, or the reason there is none."""

    path: str
    tensor: torch.Tensor | None
    error: str | None


def load_item(path: str, config: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode and preprocess one file exactly as :meth:`Captioner.load_tensor` does; failures become data."""
    try:
        return LoadedImage(path, to_tensor(load_image(path, config, max_pixels), config), None)
    except (CaptionerError, OSError) as exc:
        return LoadedImage(path, None, str(exc) or type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 - one odd file (a decoder bug, an exotic format) must not stop a run
        return LoadedImage(path, None, f"{type(exc).__name__}: {exc}")


class ImageFiles(Dataset[LoadedImage]):
    """Image paths as a map-style dataset of :class:`LoadedImage` items."""

    def __init__(self, paths: Iterable[str], config: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.paths = paths if isinstance(paths, PathTable) else PathTable(paths)
        self.config = config
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> LoadedImage:
        return load_item(self.paths[index], self.config, self.max_pixels)


@dataclass
class ImageBatch:
    """A collated batch: every path in order, the good images stacked, and an error (or None) per path."""

    paths: list[str]
    errors: list[str | None]
    images: torch.Tensor | None  # (good images, 3, H, W), in path order; None when every item failed

    def __len__(self) -> int:
        return len(self.paths)

    def pin_memory(self) -> ImageBatch:
        """Called by the DataLoader when ``pin_memory=True`` (CUDA): page-locked images copy asynchronously."""
        if self.images is not None:
            self.images = self.images.pin_memory()
        return self


def collate(items: Sequence[LoadedImage]) -> ImageBatch:
    """Keep the good tensors (stacked) and the error records side by side."""
    good = [item.tensor for item in items if item.tensor is not None]
    return ImageBatch(
        paths=[item.path for item in items],
        errors=[item.error for item in items],
        images=torch.stack(good) if good else None,
    )


def _init_worker(_worker_id: int) -> None:
    """One intra-op thread per worker: decoding is single-threaded, and the model's threads need the cores."""
    torch.set_num_threads(1)


def default_workers() -> int:
    """min(4, usable CPU cores)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return min(4, cpus)


def make_loader(
    paths: Iterable[str], config: PreprocessConfig, batch_size: int = 32, workers: int = 0,
    pin_memory: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DataLoader:
    """A DataLoader of :class:`ImageBatch` in path order; ``workers=0`` loads in the calling process."""
    return DataLoader(
        ImageFiles(paths, config, max_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=_init_worker if workers else None,
        prefetch_factor=2 if workers else None,
    )


# --------------------------------------------------------------------------------------------------------------------
# Records


def caption_record(
    path: str, captions: Sequence[Caption], num_captions: int = 1, tags: Sequence[Tag] = ()
) -> Record:
    """``{"image", "caption", "log_prob"}`` for the best caption, plus ``"captions"`` (best first) when asked for
    more than one, and ``"tags"`` (``[{"label", "probability"}, ...]``, most likely first) when there are tags."""
    best = captions[0]
    record: Record = {"image": path, "caption": best.text, "log_prob": round(best.log_prob, 4)}
    if num_captions > 1:
        record["captions"] = [{"caption": c.text, "log_prob": round(c.log_prob, 4)} for c in captions]
    if tags:
        record["tags"] = [tag.to_json() for tag in tags]
    return record


def error_record(path: str, error: str) -> Record:
    """``{"image", "error"}``: the image could not be captioned."""
    return {"image": path, "error": error}


def caption_batches(
    captioner: Captioner, paths: Sequence[str], options: DecodingOptions, batch_size: int = 32, workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS, num_tags: int = 0,
) -> Iterator[list[Record]]:
    """Caption ``paths`` in batches; yields each batch's records (one per path, in order) as soon as it is done.
    With ``num_tags``, records also carry the image's top tags (from the same encoder pass; models with tags only).

    Nothing is kept between batches: the caller writes the records and forgets them.
    """
    loader = make_loader(
        paths, captioner.preprocess_config, batch_size, workers, captioner.device.type == "cuda", max_pixels
    )
    for batch in loader:
        captions, tags = ([], []) if batch.images is None else captioner.caption_and_tag_tensors(
            batch.images, options, num_tags)
        captions, tags = iter(captions), iter(tags)
        n = options.num_captions
        yield [
            error_record(path, error) if error is not None else caption_record(path, next(captions), n, next(tags))
            for path, error in zip(batch.paths, batch.errors, strict=True)
        ]


@dataclass
class BatchStats:
    """What a run did."""

    succeeded: int = 0
    failed: int = 0

    def add(self, records: Iterable[Record]) -> None:
        for record in records:
            if "error" in record:
                self.failed += 1
            else:
                self.succeeded += 1


def run_batch(
    captioner: Captioner, paths: Sequence[str], options: DecodingOptions, writer: RecordWriter,
    batch_size: int = 32, workers: int = 0, on_batch: Callable[[list[Record]], None] | None = None,
    num_tags: int = 0,
) -> BatchStats:
    """Caption ``paths`` into ``writer`` batch by batch; ``on_batch`` sees each batch's records after they are
    written (progress bars, benchmarks). The caller closes the writer."""
    stats = BatchStats()
    for records in caption_batches(captioner, paths, options, batch_size, workers, num_tags=num_tags):
        writer.write(records)
        stats.add(records)
        if on_batch is not None:
            on_batch(records)
    return stats


# --------------------------------------------------------------------------------------------------------------------
# Output


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

    def sync(self) -> None:
        if self.file is not None:
            self.file.flush()
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


def csv_columns(num_captions: int = 1, tags: bool = False) -> list[str]:
    """``image, caption, log_prob`` (the best caption), ``caption_2, log_prob_2, ...`` for more, ``tags`` when the
    records have tags, then ``error``."""
    extra = [name for i in range(2, num_captions + 1) for name in (f"caption_{i}", f"log_prob_{i}")]
    return ["image", "caption", "log_prob", *extra, *(["tags"] if tags else []), "error"]


def _csv_row(record: Record, columns: Sequence[str]) -> list[str]:
    values: dict[str, Any] = {"image": record["image"], "error": record.get("error", "")}
    if "caption" in record:
        values |= {"caption": record["caption"], "log_prob": record["log_prob"]}
        for i, extra in enumerate(record.get("captions", [])[1:], start=2):
            values |= {f"caption_{i}": extra["caption"], f"log_prob_{i}": extra["log_prob"]}
        # One cell, most likely first: "espresso (0.8731); cup (0.0512)" (ImageNet labels have no ';' or '(').
        values["tags"] = "; ".join(f"{t['label']} ({t['probability']})" for t in record.get("tags", []))
    # A line break inside a field would make a cut-off last row look complete; error messages are the only risk.
    return [str(values.get(c, "")).replace("\r", " ").replace("\n", " ") for c in columns]


class CsvWriter(RecordWriter):
    """A CSV file with a header row (written when the file is empty), one row per image."""

    def __init__(self, sink: _Sink, num_captions: int = 1, header: bool = True, tags: bool = False) -> None:
        self.sink = sink
        self.columns = csv_columns(num_captions, tags)
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
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            self.tmp: Path | None = Path(tmp)
            self.sink = _Sink(self.tmp, durable=False)
        else:
            self.tmp = None
            self.sink = _Sink(stream=stream or sys.stdout)
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
        self.sink.sync()
        self.sink.close()
        if self.path is not None and self.tmp is not None:
            os.replace(self.tmp, self.path)
            _fsync_dir(self.path.parent)

    def abort(self) -> None:
        self.sink.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


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
    if fmt == "coco":
        if append:
            raise BatchOutputError("--resume is not supported for --format coco: a COCO results file is one JSON "
                                   "array, written at the end; caption to jsonl with --resume and convert instead")
        return CocoWriter(out, stream)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
    sink = _Sink(out, append=append) if out is not None else _Sink(stream=stream or sys.stdout)
    if fmt == "csv":
        return CsvWriter(sink, num_captions, header=out is None or sink.empty, tags=tags)
    return JsonlWriter(sink)


# --------------------------------------------------------------------------------------------------------------------
# Resume


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
    """The images an existing output file already has a record for."""

    images: set[str] = field(default_factory=set)
    failed: int = 0  # how many of those records are errors
    repaired_bytes: int = 0  # bytes of a cut-off last line that were removed


def read_completed(path: str | Path, fmt: str, num_captions: int = 1, tags: bool = False) -> Completed:
    """Repair and read an output file for ``--resume``; a missing file has nothing completed.

    Raises :class:`BatchOutputError` when a complete line is not a valid record or, for CSV, when the header differs
    from the one this run would write (e.g. another ``--num-captions``).
    """
    path = Path(path)
    if fmt not in ("jsonl", "csv"):
        raise BatchOutputError(f"--resume is not supported for --format {fmt}")
    done = Completed()
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
                except (json.JSONDecodeError, TypeError, KeyError) as exc:
                    raise BatchOutputError(f"{path}:{number} is not a captioner record ({exc}); cannot resume") from exc
                done.images.add(image)
                done.failed += "error" in record
        else:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return done
            if header != csv_columns(num_captions, tags):
                raise BatchOutputError(
                    f"{path} has columns {header}, but this run writes {csv_columns(num_captions, tags)} "
                    "(another --num-captions or --tags?); cannot resume"
                )
            for row in reader:
                if len(row) != len(header):
                    raise BatchOutputError(f"{path}:{reader.line_num} has {len(row)} fields, expected {len(header)}")
                done.images.add(row[0])
                done.failed += bool(row[-1])
    return done
