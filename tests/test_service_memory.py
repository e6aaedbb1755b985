"""A worker's memory under hostile uploads: the decode pixel budget, and memory given back after a burst."""

from __future__ import annotations

import io
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from gunicorn_process import GunicornServer
from PIL import Image
from upload_corpus import jpeg

from service.memory import BudgetTimeout, PixelBudget, decode_cost, peak_growth_bound


def worst_case_uploads(side: int) -> list[bytes]:
    """A flat RGBA PNG and a flat 16-bit PNG of side x side: tiny files, the largest decodes per byte."""
    uploads = []
    for mode, color in (("RGBA", (10, 20, 30, 128)), ("I;16", 30000)):
        buffer = io.BytesIO()
        Image.new(mode, (side, side), color).save(buffer, "PNG")
        uploads.append(buffer.getvalue())
    return uploads


def memory_kib(pid: int, field: str) -> int:
    """``VmRSS`` (resident now) or ``VmHWM`` (resident at the peak) of ``pid``, in KiB."""
    return int(re.search(rf"{field}:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def test_decode_cost_follows_jpeg_draft_mode() -> None:
    big_jpeg = Image.open(io.BytesIO(_encode(Image.new("RGB", (4000, 3000)), "JPEG")))
    assert decode_cost(big_jpeg, 224) == 500 * 375  # decoded at 1/8
    assert decode_cost(big_jpeg, 600) == 1000 * 750  # 1/4 still covers 600 px
    png = Image.open(io.BytesIO(_encode(Image.new("RGB", (4000, 3000)), "PNG")))
    assert decode_cost(png, 224) == 4000 * 3000


def _encode(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return buffer.getvalue()


def test_pixel_budget_serialises_large_decodes_and_times_out() -> None:
    budget = PixelBudget(100)
    inside, most = 0, 0
    lock = threading.Lock()

    def decode(pixels: int) -> None:
        nonlocal inside, most
        with budget.hold(pixels, timeout=10):
            with lock:
                inside += pixels
                most = max(most, inside)
            time.sleep(0.05)
            with lock:
                inside -= pixels

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(decode, [60, 60, 60, 30, 30, 500, 10, 10]))
    assert most <= 500 and budget.in_use == 0  # an image over the capacity runs alone
    with budget.hold(100, timeout=1), pytest.raises(BudgetTimeout):
        with budget.hold(1, timeout=0.2):
            pass


def test_worst_case_burst_stays_within_the_bound(tiny_model_dir: Path, tmp_path: Path) -> None:
    """16 concurrent max-pixel uploads (RGBA and 16-bit PNGs at a 4 MP limit) to one worker of 16 threads: its peak
    RSS stays within the documented bound over idle, every upload is captioned, and the memory is given back."""
    max_pixels = 4_000_000
    side = int(max_pixels**0.5)
    uploads = worst_case_uploads(side)
    server = GunicornServer(tiny_model_dir, tmp_path, workers=1, threads=16,
                            env={"CAPTIONER_TORCH_THREADS": "1", "CAPTIONER_MAX_PIXELS": str(max_pixels)})
    try:
        server.wait_ready()
        worker = int(re.findall(r"Booting worker with pid: (\d+)", server.stderr_path.read_text())[-1])

        def caption(data: bytes) -> int:
            return server.request("POST", "/v1/captions?strategy=greedy&max_length=3", data,
                                  {"Content-Type": "image/png"}, timeout=120).status

        for _ in range(3):
            assert server.request("POST", "/v1/captions?strategy=greedy", jpeg(), {"Content-Type": "image/jpeg"})\
                .status == 200
        assert caption(uploads[0]) == 200 and caption(uploads[1]) == 200  # one of each: allocator warm
        idle = memory_kib(worker, "VmRSS")
        Path(f"/proc/{worker}/clear_refs").write_text("5")  # restart the peak (VmHWM) from now
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(caption, uploads * 8))
        peak = memory_kib(worker, "VmHWM")
        time.sleep(0.5)
        after = memory_kib(worker, "VmRSS")
    finally:
        server.stop()
    assert statuses == [200] * 16
    bound_kib = peak_growth_bound(max_pixels) / 1024  # without the budget: ~16 x 80 MB
    assert peak - idle <= bound_kib, f"peak {peak} KiB, idle {idle} KiB, bound +{bound_kib:.0f} KiB"
    # Given back: what stays is at most about one worst-case image's conversion buffers (glibc keeps them in some
    # runs: +0 MB in most, +31-48 MB in about 1 of 5, measured before and after the 30 November changes alike),
    # not the burst's (~16 x 80 MB without the budget).
    assert after - idle <= 64 * 1024, f"after the burst {after} KiB, idle {idle} KiB"
