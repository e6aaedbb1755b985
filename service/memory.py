"""A worker's memory under hostile uploads: a pixel budget shared by its concurrent decodes, and giving freed memory
back to the system.

A small file can decode to a huge image (a 194 kB RGBA PNG of 7070x7070 is 200 MB of pixels, ~1.1 GB at the peak of
its conversion to RGB), so the number of concurrent requests alone does not bound a worker's memory. Every decode
first takes its pixel count from the worker's :class:`PixelBudget` (``CAPTIONER_DECODE_PIXEL_BUDGET``, by default
``CAPTIONER_MAX_PIXELS``: one worst-case image at a time) and waits while the budget is spent; ordinary photos cost
little (JPEGs decode at reduced size in draft mode) and pass side by side. After a large decode, glibc's
``malloc_trim`` returns the freed pages, so a burst does not leave the worker's RSS high.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

from captioner.preprocess import drafts_jpeg

# Decodes of at least this many pixels are followed by malloc_trim (smaller ones reuse the heap well on their own).
TRIM_MIN_PIXELS = 4_000_000
M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)

# The documented bound (README, Operations): a worker's RSS stays below its idle RSS plus this much per budget pixel
# (measured: ~20 bytes for the worst uploads, flat RGBA and 16-bit PNGs, whose conversion to RGB holds several
# copies) plus a fixed allowance for the request threads, bodies and batches in flight.
PEAK_BYTES_PER_PIXEL = 24
PEAK_OVERHEAD_BYTES = 64 * 1024 * 1024


def peak_growth_bound(budget_pixels: int) -> int:
    """Bytes a worker's RSS may grow over idle under the worst uploads, for a decode budget of ``budget_pixels``."""
    return PEAK_BYTES_PER_PIXEL * budget_pixels + PEAK_OVERHEAD_BYTES


class BudgetTimeout(Exception):
    """No room in the pixel budget within the wait limit."""


def decode_cost(image: Image.Image, size: int) -> int:
    """The pixels Pillow will hold for ``image``: JPEGs decode in draft mode at the largest DCT scale (1/2, 1/4,
    1/8) that still covers ``size`` x ``size`` (as ``captioner.preprocess.load_image`` asks), others at full size."""
    width, height = image.size
    if drafts_jpeg(image):
        fits = min(width // size, height // size)
        scale = next(s for s in (8, 4, 2, 1) if fits >= s or s == 1)
        return -(-width // scale) * -(-height // scale)
    return width * height


class PixelBudget:
    """At most ``capacity`` pixels decoded at once in this worker; a larger image takes the whole budget."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, timeout: float) -> Iterator[None]:
        """Wait (up to ``timeout`` s, else :class:`BudgetTimeout`) until ``pixels`` fit, hold them for the block."""
        cost = min(pixels, self.capacity)
        with self._changed:
            if not self._changed.wait_for(lambda: self.in_use + cost <= self.capacity, timeout):
                raise BudgetTimeout(f"no room to decode {pixels} pixels within {timeout:g} s")
            self.in_use += cost
        try:
            yield
        finally:
            with self._changed:
                self.in_use -= cost
                self._changed.notify_all()
            if pixels >= TRIM_MIN_PIXELS:
                release_free_memory()


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


_LIBC = _libc()


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas (like ``MALLOC_ARENA_MAX``, which a forked worker can no longer set): with one
    arena per thread, 16 request threads keep 16 heaps' worth of freed image memory."""
    if _LIBC is not None:
        _LIBC.mallopt(M_ARENA_MAX, arenas)
