"""The decoder's fast path against the plain PyTorch decoder, side by side in one run: images/s and same captions.

The bundled model (or ``--model``) encodes the first ``--images`` Flickr8k test photos once (default runtime,
batches of 32); then the grids are decoded with the model's default decoding (beam 5, length penalty 1, no repeated
trigrams, at most 20 words) by

* **plain**: the decoder as it was at ``--baseline`` (a git commit; its ``model.py`` and ``decoding.py`` loaded
  from git, as ``benchmarks/runtime.py`` does), that is ``CaptionDecoder.step`` driven by that beam search, or
  this tree's beam search stepping ``CaptionDecoder.step`` itself where git or the commit is missing;
* **fast**: this tree's :func:`captioner.decoding.decode`, which steps the inference fast path of
  ``captioner/fast_decoder.py``;
* **fast int8** / **fast bfloat16**: the same with ``precision="int8"`` (the step's products in int8, ONNX
  Runtime) or ``"bfloat16"`` (oneDNN's bfloat16 kernels, on CPUs with AMX or AVX-512 BF16): not exact, so some
  captions differ; ``benchmarks/runtime_captions.py --decoder-precisions`` scores what that does to CIDEr;

at batch 32 (the batch command, the features cache) over all the photos and at batch 1 (one HTTP request) over the
first ``--single`` of them, the paths taking turns on every batch so that other processes' load falls on all alike.
It prints each path's images/s (median of ``--repeats`` rounds), wall-clock and per CPU second of this process (on a
shared machine the latter is steadier), the ratios to plain, the load average, and how many of the best captions
differ from plain's (0 is the target for float32: the fast path is exact algebra). Without the Flickr8k photos
(``../shared/data/flickr8k``) it says so and exits 0.

    .venv/bin/python benchmarks/decoding.py --threads 1
    .venv/bin/python benchmarks/decoding.py --threads 1 --images 200 --single 40 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime import load_baseline_decoder  # noqa: E402

from captioner.api import Captioner  # noqa: E402
from captioner.decoding import Hypothesis, _decode_group, decode  # noqa: E402
from captioner.fast_decoder import DECODER_PRECISIONS, resolve_gemm_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"

Decoder = Callable[[torch.Tensor], list[list[Hypothesis]]]  # grids (B, C, H, W) -> hypotheses per image


def test_photos(count: int) -> list[Path]:
    """The first ``count`` photos of the Flickr8k test split (empty without the data)."""
    split = FLICKR / "splits" / "test.txt"
    if not split.is_file():
        return []
    return [FLICKR / "images" / name for name in split.read_text().split()[:count]]


def add_photo_arguments(parser: argparse.ArgumentParser, images: int, single: int) -> None:
    """``--model``, ``--images``, ``--single`` and ``--batch-size``: which model decodes how many test photos, at a
    batch's size and one at a time."""
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--images", type=int, default=images, help="test photos decoded at --batch-size")
    parser.add_argument("--single", type=int, default=single, help="of which decoded one at a time (batch 1)")
    parser.add_argument("--batch-size", type=int, default=32)


def runnable_precisions(precisions: list[str]) -> list[str]:
    """Those of the decoder ``precisions`` this machine can run; for the others it prints why not."""
    runnable = []
    for precision in precisions:
        try:
            resolve_gemm_backend("auto", torch.device("cpu"), torch.float32, precision)
        except ValueError as exc:
            print(f"skipped {precision}: {exc}")
            continue
        runnable.append(precision)
    return runnable


def encode_photos(captioner: Captioner, photos: list[Path]) -> torch.Tensor:
    """The float32 feature grids (images, C, H, W) of ``photos``, encoded once, 32 at a time, by the default runtime."""
    with torch.inference_mode():
        return torch.cat([
            captioner.encode(torch.stack([captioner.load_tensor(p) for p in photos[i : i + 32]]))
            for i in range(0, len(photos), 32)
        ]).float()  # fmt: skip


def timed_round(
    decoders: dict[str, Decoder], grids: torch.Tensor, batch_size: int, round_: int
) -> dict[str, tuple[float, float, list[list[Hypothesis]]]]:
    """Every decoder over ``grids``, ``batch_size`` images at a time, taking turns on every batch (who goes first
    rotates), so that the load of other processes, which changes by the second, falls on all alike.

    Returns, per decoder, its summed wall seconds, its summed CPU seconds (this process; less sensitive than wall
    time to other processes taking the cores) and its results in order.
    """
    totals: dict[str, list] = {name: [0.0, 0.0, []] for name in decoders}
    names = list(decoders)
    for number, start in enumerate(range(0, grids.size(0), batch_size)):
        batch = grids[start : start + batch_size]
        shift = (round_ + number) % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            results = decoders[name](batch)
            totals[name][0] += time.perf_counter() - wall
            totals[name][1] += time.process_time() - cpu
            totals[name][2] += results
    return {name: (wall, cpu, results) for name, (wall, cpu, results) in totals.items()}


def load_average() -> str:
    """The 1, 5 and 15-minute load averages, or "n/a" where the OS has none."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_photo_arguments(parser, images=200, single=40)
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--baseline", default="f483925", help="git commit whose decoder is the plain path")
    parser.add_argument("--precisions", nargs="+", default=list(DECODER_PRECISIONS), choices=DECODER_PRECISIONS,
                        help="the fast path's decoder precisions to time (default: all; those this machine cannot "
                        "run are skipped, saying why)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    photos = test_photos(args.images)
    if not photos:
        print(f"skipped: no Flickr8k test photos under {FLICKR}")
        return

    captioner = Captioner.load(args.model, allow_download=False)
    options = captioner.options()
    grids = encode_photos(captioner, photos)
    decoder, vocab = captioner.model.decoder, captioner.vocab
    baseline = load_baseline_decoder(args.baseline, captioner)
    if baseline is not None:
        plain_name = f"the decoder at {args.baseline}"

        def plain(g: torch.Tensor) -> list[list[Hypothesis]]:
            return baseline(g, options)
    else:
        plain_name = "this tree's search on CaptionDecoder.step"

        def plain(g: torch.Tensor) -> list[list[Hypothesis]]:
            with torch.inference_mode():
                return _decode_group(decoder, g, vocab, options)

    def fast_in(precision: str) -> Decoder:
        return lambda g: decode(decoder, g, vocab, options, precision)

    decoders = {"plain": plain}
    for precision in runnable_precisions(args.precisions):
        decoders["fast" if precision == "float32" else f"fast {precision}"] = fast_in(precision)
    print(f"{len(photos)} Flickr8k test photos, grid {tuple(grids.shape[1:])}; decoding {options}")
    print(f"torch threads {torch.get_num_threads()}; load average before: {load_average()}", flush=True)
    print(f"plain: {plain_name}; fast: this tree's decode() (float32: the same captions; bfloat16, int8: a few change)")
    for batch_size, grid in ((args.batch_size, grids), (1, grids[: args.single])):
        for fn in decoders.values():
            fn(grid[:batch_size])  # builds the tables and sessions once, outside the timing
        rounds = [timed_round(decoders, grid, batch_size, round_) for round_ in range(args.repeats)]
        wall = {name: grid.size(0) / statistics.median(r[name][0] for r in rounds) for name in decoders}
        cpu = {name: grid.size(0) / statistics.median(r[name][1] for r in rounds) for name in decoders}
        results = rounds[-1]
        print(f"batch {batch_size:>2}: plain {wall['plain']:6.2f} img/s (per CPU second {cpu['plain']:.2f})")
        for name in list(decoders)[1:]:
            differ = sum(a[0].tokens != b[0].tokens
                         for a, b in zip(results["plain"][2], results[name][2], strict=True))
            print(f"  {name:<10} {wall[name]:6.2f} img/s, {name} / plain {wall[name] / wall['plain']:.2f}x (per CPU "
                  f"second: {cpu[name]:.2f}, {cpu[name] / cpu['plain']:.2f}x); best captions differing from plain: "
                  f"{differ} of {grid.size(0)}", flush=True)  # fmt: skip
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
