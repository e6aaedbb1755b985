"""Training epoch on cached encoder features versus running the frozen encoder every epoch.

Both loops train the same decoder on the same (image, caption) pairs with the same batches; the only difference
is where the feature grids come from:

  (a) cached: read from the memory-mapped features cache (``training.features``), as ``captioner train`` does;
  (b) encoder each epoch: decode + preprocess every image file and run MobileNetV2 on it, then the same step.

It prints the seconds per epoch of both and (b)/(a); the cache pays for itself when the ratio is large (target
>= 10x). Images: the first ``--images`` Flickr8k photos when ``../shared`` is present, else generated JPEGs.

    .venv/bin/python benchmarks/features.py --images 128
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.encoder import build_encoder  # noqa: E402
from captioner.model import CaptionDecoder, DecoderConfig, masked_cross_entropy  # noqa: E402
from captioner.preprocess import PreprocessConfig, preprocess  # noqa: E402
from training.features import build_feature_cache  # noqa: E402

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "images"


def image_files(count: int, folder: Path) -> list[Path]:
    """Flickr8k photos if available, else generated 224x224 JPEGs of noise."""
    if FLICKR.is_dir():
        return sorted(FLICKR.glob("*.jpg"))[:count]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        paths = image_files(args.images, Path(tmp))
        config = PreprocessConfig()
        encoder = build_encoder(allow_download=False)
        start = time.perf_counter()
        cache = build_feature_cache(encoder, config, paths, Path(tmp) / "cache", workers=0)
        print(f"building the cache once: {time.perf_counter() - start:.1f} s for {len(paths)} images")

        decoder = CaptionDecoder(DecoderConfig(3000, encoder.channels))
        optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
        pairs = torch.arange(len(paths)).repeat_interleave(args.captions_per_image)
        tokens = torch.randint(4, 3000, (len(pairs), 14))
        batches = [pairs[i : i + args.batch_size] for i in range(0, len(pairs), args.batch_size)]

        def step(grid: torch.Tensor, rows: torch.Tensor) -> None:
            batch = tokens[: len(rows)]
            logits, _ = decoder(grid, batch[:, :-1])
            loss = masked_cross_entropy(logits, batch[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        def epoch_cached() -> None:
            for rows in batches:
                step(cache.grids(rows.tolist()), rows)

        def epoch_encoder() -> None:
            for rows in batches:
                images = torch.stack([preprocess(paths[int(r)], config) for r in rows])
                step(encoder(images), rows)

        timings = {}
        for name, fn in (("cached", epoch_cached), ("encoder", epoch_encoder)):
            start = time.perf_counter()
            fn()
            timings[name] = time.perf_counter() - start
        print(
            f"pairs per epoch: {len(pairs)} ({len(paths)} images x {args.captions_per_image} captions), "
            f"batch {args.batch_size}, torch threads {torch.get_num_threads()}"
        )
        print(f"(a) epoch on cached features:      {timings['cached']:8.1f} s")
        print(f"(b) epoch running the encoder:     {timings['encoder']:8.1f} s")
        print(f"(b) / (a) = {timings['encoder'] / timings['cached']:.1f}x  (target >= 10x)")


if __name__ == "__main__":
    main()
