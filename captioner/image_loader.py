"""Image files in, batches of encoder inputs out: the DataLoader shared by ``captioner caption`` and training.

DataLoader worker processes decode and preprocess images with the library's one preprocessing path while the model
works on the previous batch. A file that cannot be used comes back as an error string beside its path, never as an
exception, so one bad file never stops a run. Training's features cache (:mod:`training.features`) reads its images
through the same :func:`make_loader`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from captioner.errors import CaptionerError
from captioner.preprocess import DEFAULT_MAX_PIXELS, PreprocessConfig, preprocess
from captioner.storage import is_url, read_bytes


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
    """Decode and preprocess one file exactly as :meth:`Captioner.load_tensor` does; failures become data. A URL
    (``s3://bucket/key``) is fetched through fsspec first (:mod:`captioner.storage`)."""
    try:
        source = read_bytes(path) if is_url(path) else path
        return LoadedImage(path, preprocess(source, config, max_pixels), None)
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
    pin_memory: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS, ramp_up: bool = False,
) -> DataLoader:
    """A DataLoader of :class:`ImageBatch` in path order; ``workers=0`` loads in the calling process.

    ``ramp_up`` starts with batches of 1, 2, 4, ... images up to ``batch_size``: the first results (and a progress
    bar's count) arrive after one image instead of a whole batch, for a handful of extra batches per run.
    """
    files = ImageFiles(paths, config, max_pixels)
    batching: dict = {"batch_size": batch_size, "shuffle": False}
    if ramp_up:
        batching = {"batch_sampler": ramp_up_batches(len(files), batch_size)}
    return DataLoader(
        files,
        **batching,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=_init_worker if workers else None,
        prefetch_factor=2 if workers else None,
    )


def ramp_up_batches(count: int, batch_size: int) -> list[list[int]]:
    """Indices ``0..count-1`` in order, in batches of 1, 2, 4, ... then ``batch_size`` (each at most ``batch_size``)."""
    batches, start, size = [], 0, 1
    while start < count:
        batches.append(list(range(start, min(start + size, count))))
        start += size
        size = min(size * 2, batch_size)
    return batches
