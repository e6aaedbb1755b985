"""Which files a ``captioner caption`` run captions: discovery of files, folders and globs, and sharding.

* :func:`discover_images` turns files, folders and globs into one sorted, de-duplicated list of paths.
* :func:`image_key` is the file a path names, whatever its spelling: de-duplication and ``--resume`` use it.
* :class:`Shard` picks a deterministic share of that list, so N machines (or torchrun ranks) split one job.

A PATH may also be an object-storage URL (``s3://bucket/photos/``, any fsspec protocol: see :mod:`captioner.storage`):
a prefix is a folder, a glob matches keys, and a URL is kept as it is spelled (it is its own key).
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from captioner.distributed import Launch
from captioner.storage import filesystem, is_url, url_exists

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
_GLOB_CHARS = re.compile(r"[*?[]")


def _has_image_extension(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


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
    return [path for path in found if _has_image_extension(path)]


def _scan_prefix(fs: object, folder: str, recursive: bool) -> list[str]:
    """:func:`_scan_folder` for an fsspec filesystem: the image objects under ``folder`` (a bucket prefix)."""
    if recursive:
        found = fs.find(folder)  # type: ignore[attr-defined]
    else:
        found = [e["name"] for e in fs.ls(folder, detail=True) if e["type"] == "file"]  # type: ignore[attr-defined]
    return [path for path in found if _has_image_extension(path)]


def expand_url(arg: str, recursive: bool = False) -> list[str]:
    """:func:`expand_path` for an object-storage URL: a prefix (folder) gives its image objects, a glob every key it
    matches (and the image objects of matched prefixes), anything else is one explicit object. URLs come back with
    their protocol (``s3://bucket/key``)."""
    fs, path = filesystem(arg)
    if _GLOB_CHARS.search(path):
        found: list[str] = []
        for match in fs.glob(path):
            found.extend(_scan_prefix(fs, match, recursive) if fs.isdir(match) else [match])
        if not found:
            return [arg]
    elif fs.isdir(path):
        found = _scan_prefix(fs, path, recursive)
    else:
        return [arg]
    return [fs.unstrip_protocol(p) for p in found]


def expand_path(arg: str, recursive: bool = False) -> list[str]:
    """The image paths one command-line PATH stands for.

    A folder gives its image files (by extension); a glob (``*``, ``?``, ``[``; ``**`` with ``recursive``) gives
    every file it matches, whatever the extension, and the image files of every folder it matches. Anything else is
    an explicit file and is always attempted, so a missing or unreadable one gets an error record; a glob that
    matches nothing is treated the same way. URLs (``s3://...``) go to :func:`expand_url`.
    """
    if is_url(arg):
        return expand_url(arg, recursive)
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


def image_key(path: str) -> str:
    """The file a path names, whatever its spelling: absolute, with symbolic links and ``..`` resolved.

    ``photos/a.jpg``, ``/home/me/photos/a.jpg`` and ``link-to-photos/a.jpg`` have one key, so they are one image
    for de-duplication and for ``--resume``. A relative path is resolved against the current directory. A URL
    (``s3://bucket/key``) is its own key.
    """
    return path if is_url(path) else os.path.realpath(path)


def path_exists(path: str) -> bool:
    """Whether a discovered path (a local path, or a URL: one request) names something that exists."""
    return url_exists(path) if is_url(path) else os.path.lexists(path)


def discover_images(paths: Iterable[str], recursive: bool = False, list_files: Iterable[str | Path] = ()) -> list[str]:
    """Every image path the arguments and list files stand for: normalised, de-duplicated, in sorted order.

    Paths keep their spelling (``os.path.normpath`` of what was given: relative stays relative; a URL as given),
    which is what records store; spellings of one file (:func:`image_key`) collapse to the first in sorted order.
    The order (plain string order of the normalised paths) is the same on every machine that sees the same files,
    which ``--resume`` and ``--shard`` rely on.
    """
    args = list(paths)
    for file in list_files:
        args.extend(read_path_list(file))
    found = sorted({p if is_url(p) else os.path.normpath(p) for arg in args for p in expand_path(arg, recursive)})
    by_file: dict[str, str] = {}
    for path in found:
        by_file.setdefault(image_key(path), path)
    return sorted(by_file.values())


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
        launch = Launch.from_env(env)
        return cls(launch.rank, launch.world) if launch.world > 1 else None

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
