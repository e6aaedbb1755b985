"""How close the decoder's inference fast path runs to this machine's limits: its matrix products against the
measured matmul peak (a batch's steps, compute-bound) and against the measured memory bandwidth (one image's
steps, where every product streams its weights for a handful of rows).

The bundled model (or ``--model``) encodes the first ``--images`` Flickr8k test photos once; then
:func:`captioner.decoding.decode` decodes them with the model's default decoding at ``--batch-size`` and the first
``--single`` of them one at a time (one HTTP request), in each ``--precisions``, with every call of the step's
products (:class:`captioner.fast_decoder.Gemm`) timed and counted: ``2 * rows * K * N`` floating-point operations
and ``K * N`` weight elements read. On one torch thread by default (``decode`` runs a batch as one part per thread,
each on one core, so one core is the unit). It prints, per batch size and precision:

* images/s, the share of decoding spent in the products, and the rest (attention, cell, beam bookkeeping);
* the products' achieved GFLOP/s next to the measured one-thread matmul peak of that precision (2048x2048);
* the products' weight traffic in GB/s next to the measured one-thread read bandwidth (a sum over 512 MiB);
* the bound: how much faster decoding could get if every product ran at its roofline (the longer of its operations
  at the matmul peak and its weights at the read bandwidth; weights that stay in a cache can beat the latter) and
  nothing else changed.

Without the Flickr8k photos (``../shared/data/flickr8k``) it says so and exits 0.

    .venv/bin/python benchmarks/decoder_roofline.py
    .venv/bin/python benchmarks/decoder_roofline.py --images 64 --single 16 --precisions float32 bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decoding import add_photo_arguments, encode_photos, load_average, runnable_precisions, test_photos  # noqa: E402
from runtime import matmul_peak, timed  # noqa: E402

from captioner.api import Captioner  # noqa: E402
from captioner.decoding import decode  # noqa: E402
from captioner.fast_decoder import Gemm  # noqa: E402

BYTES = {"float32": 4, "bfloat16": 2}  # bytes per weight element as the product reads it
CPU = torch.device("cpu")


def read_bandwidth(repeats: int = 5) -> float:
    """GB/s of summing a 512 MiB float32 tensor (far larger than any cache): the memory-read ceiling."""
    x = torch.ones(128 * 1024 * 1024)
    seconds, _ = timed(x.sum, repeats, CPU)
    return x.numel() * 4 / seconds / 1e9


class CountedGemm:
    """While active, every :class:`Gemm` call is timed and its operations and weight bytes are counted, and its
    roofline floor summed: the longer of its operations at ``peak`` GFLOP/s and its weights at ``bandwidth`` GB/s."""

    def __init__(self, precision: str, peak: float, bandwidth: float) -> None:
        self.bytes_per_weight = BYTES[precision]
        self.peak, self.bandwidth = peak * 1e9, bandwidth * 1e9
        self.seconds = self.flop = self.weight_bytes = self.floor = 0.0
        self.calls = 0
        self._original = Gemm.__call__

    def __enter__(self) -> CountedGemm:
        original, counter = self._original, self

        def counted(gemm: Gemm, x: torch.Tensor, addend: torch.Tensor | None = None) -> torch.Tensor:
            start = time.perf_counter()
            out = original(gemm, x, addend)
            counter.seconds += time.perf_counter() - start
            k, n = gemm.weight.shape
            flop, weight_bytes = 2 * x.size(0) * k * n, k * n * counter.bytes_per_weight
            counter.flop += flop
            counter.weight_bytes += weight_bytes
            counter.floor += max(flop / counter.peak, weight_bytes / counter.bandwidth)
            counter.calls += 1
            return out

        Gemm.__call__ = counted
        return self

    def __exit__(self, *exc: object) -> None:
        Gemm.__call__ = self._original


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_photo_arguments(parser, images=64, single=16)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the fastest is reported)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: one core, one part; with more, decode runs parts side by side "
        "and the products' summed times overlap)",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=sorted(BYTES),
        help="the fast path's precisions to measure (int8 has no matmul peak to compare with)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    photos = test_photos(args.images)
    if not photos:
        print("skipped: no Flickr8k test photos under ../shared/data/flickr8k")
        return

    captioner = Captioner.load(args.model, allow_download=False)
    options = captioner.options()
    grids = encode_photos(captioner, photos)
    decoder, vocab = captioner.model.decoder, captioner.vocab
    print(f"{len(photos)} Flickr8k test photos; decoding {options}; torch threads {torch.get_num_threads()}; "
          f"load average {load_average()}")  # fmt: skip
    bandwidth = read_bandwidth()
    peaks = {name: matmul_peak(CPU, 5, getattr(torch, name)) for name in ("float32", "bfloat16")}
    print(f"measured ceilings: fp32 matmul {peaks['float32']:.0f} GFLOP/s, bf16 matmul {peaks['bfloat16']:.0f} "
          f"GFLOP/s, memory read {bandwidth:.1f} GB/s")  # fmt: skip
    for precision in runnable_precisions(args.precisions):
        for batch_size, grid in ((args.batch_size, grids), (1, grids[: args.single])):

            def run(grid: torch.Tensor = grid, batch_size: int = batch_size, precision: str = precision) -> None:
                for start in range(0, grid.size(0), batch_size):
                    decode(decoder, grid[start : start + batch_size], vocab, options, precision)

            run()  # builds the tables and sessions once, outside the timing
            rounds = []
            for _ in range(args.repeats):
                with CountedGemm(precision, peaks[precision], bandwidth) as counted:
                    start = time.perf_counter()
                    run()
                    total = time.perf_counter() - start
                rounds.append((total, counted))
            total, counted = min(rounds, key=lambda r: r[0])
            gflops = counted.flop / counted.seconds / 1e9
            peak = peaks[precision]
            bound = total / (total - counted.seconds + counted.floor)
            print(
                f"{precision:<8} batch {batch_size:>2}: {grid.size(0) / total:6.2f} img/s; products "
                f"{100 * counted.seconds / total:4.1f}% of the time ({counted.calls} calls), rest "
                f"{total - counted.seconds:.3f} s; products {gflops:6.1f} GFLOP/s = "
                f"{100 * gflops / peak:5.1f}% of the matmul peak, weights read at "
                f"{counted.weight_bytes / counted.seconds / 1e9:5.1f} GB/s = "
                f"{100 * counted.weight_bytes / counted.seconds / 1e9 / bandwidth:5.1f}% of memory read; "
                f"with products at their roofline: {bound:.2f}x",
                flush=True,
            )
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
