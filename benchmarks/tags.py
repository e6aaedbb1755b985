"""What tags cost: captions alone vs captions + tags, per image, side by side in one run.

With the bundled model (EfficientNet-Lite0 + its ImageNet head) on the same preprocessed images and batch size:

  (a) captions: one encoder pass + the model's default decoding (``Captioner.caption_tensors``);
  (b) captions + tags: the same encoder pass, the same decoding, and the tags head on the same grid
      (``Captioner.caption_tensors(..., num_tags=5)``, what every door runs);
  (c) the tags head alone on ready grids (pool + linear + softmax + top 5);
  (d) a second encoder pass, for comparison: what tags would cost if they were computed apart from the captions.

Runs (a) and (b) interleaved, ``--rounds`` times each, and prints the medians per image and the ratio (b)/(a).

    .venv/bin/python benchmarks/tags.py                       # 32 Flickr8k images (or the test photos), batch 8
    .venv/bin/python benchmarks/tags.py --images 64 --batch-size 16 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.api import Captioner  # noqa: E402
from captioner.tags import DEFAULT_NUM_TAGS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K_IMAGES = ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def image_paths(count: int) -> list[Path]:
    """``count`` Flickr8k photos (sorted), or the test photos repeated when Flickr8k is absent."""
    paths = sorted(FLICKR8K_IMAGES.glob("*.jpg"))[:count] if FLICKR8K_IMAGES.is_dir() else []
    if not paths:
        photos = sorted((ROOT / "tests" / "data").glob("*.jpg"))
        paths = [photos[i % len(photos)] for i in range(count)]
    return paths


def seconds(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    captioner = Captioner.load(args.model, allow_download=False)
    if not captioner.has_tags:
        sys.exit(f"{captioner.name} has no tags head")
    head = captioner.model.tagger
    paths = image_paths(args.images)
    tensors = torch.stack([captioner.load_tensor(path) for path in paths])
    batches = list(tensors.split(args.batch_size))
    options = captioner.options()
    with torch.inference_mode():
        grids = [captioner.model.encoder(batch) for batch in batches]

    def captions() -> None:
        for batch in batches:
            captioner.caption_tensors(batch, options)

    def captions_and_tags() -> None:
        for batch in batches:
            captioner.caption_tensors(batch, options, DEFAULT_NUM_TAGS)

    def tags_only() -> None:
        for grid in grids:
            head.top_k(grid, DEFAULT_NUM_TAGS)

    def encoder_only() -> None:
        with torch.inference_mode():
            for batch in batches:
                captioner.model.encoder(batch)

    captions_and_tags()  # warm-up
    timings: dict[str, list[float]] = {"a": [], "b": [], "c": [], "d": []}
    for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits both sides alike
        timings["a"].append(seconds(captions))
        timings["b"].append(seconds(captions_and_tags))
        timings["c"].append(seconds(tags_only))
        timings["d"].append(seconds(encoder_only))
    per_image = {key: statistics.median(values) / len(paths) * 1000.0 for key, values in timings.items()}
    print(f"model {captioner.name} {captioner.version}, {len(paths)} images, batch {args.batch_size}, "
          f"{args.threads} thread(s), {args.rounds} rounds, decoding {options}")
    print(f"(a) captions                 {per_image['a']:9.3f} ms/image")
    print(f"(b) captions + {DEFAULT_NUM_TAGS} tags          {per_image['b']:9.3f} ms/image")
    print(f"(c) tags head alone          {per_image['c']:9.3f} ms/image")
    print(f"(d) a second encoder pass    {per_image['d']:9.3f} ms/image")
    print(f"(b)/(a) = {per_image['b'] / per_image['a']:.4f}   (c)/(a) = {per_image['c'] / per_image['a']:.5f}   "
          f"(d)/(a) = {per_image['d'] / per_image['a']:.3f}")


if __name__ == "__main__":
    main()
