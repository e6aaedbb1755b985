"""Batch captioning throughput: is image I/O hidden behind the model?

Measures, on the same images and batch size, with the model's real pretrained encoder (EfficientNet-Lite0 for the
bundled model):

  (a) encoder only, on ready tensors;
  (b) encoder + batched decoding (beam 3) on images already in memory (``Captioner.caption_tensors``);
  (c) the ``captioner caption`` engine on the files (``captioner.batch.run_batch``: DataLoader workers decoding JPEGs
      and preprocessing, the model, JSON-lines output with fsync), in steady state (model load and the first batch,
      which includes starting the workers, excluded), for several worker / thread settings;

then prints (c)/(b) (1.0: loading is completely hidden) and (b)/(a) (the decoder's share), and the time to decode and
preprocess a 12-megapixel JPEG with and without JPEG draft mode.

The model is the bundled one when present, else ``--model DIR``, else a random-weight decoder of realistic size
(hidden 512, vocabulary 3000, attention; random weights never emit ``<end>`` early, so every caption runs to
``--max-length`` words: a pessimistic decoder cost).

    .venv/bin/python benchmarks/batch.py                    # 256 Flickr8k images, batch 32
    .venv/bin/python benchmarks/batch.py --images 64 --configs 2:2,1:2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np
import torch
from PIL import Image, JpegImagePlugin

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.api import DEFAULT_MODEL_DIR, Captioner  # noqa: E402
from captioner.batch import open_writer, run_batch  # noqa: E402
from captioner.checkpoint import CaptionModel  # noqa: E402
from captioner.encoder import build_encoder  # noqa: E402
from captioner.model import CaptionDecoder, DecoderConfig  # noqa: E402
from captioner.preprocess import PreprocessConfig, preprocess  # noqa: E402
from captioner.vocabulary import SPECIALS, Vocabulary  # noqa: E402

FLICKR8K_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "images"


def realistic_random_model(vocab_size: int = 3000) -> CaptionModel:
    """The pretrained encoder and a random decoder the size of a trained Flickr8k model."""
    torch.manual_seed(0)
    encoder = build_encoder("mobilenet_v2", pretrained=True, allow_download=False)
    vocab = Vocabulary([*SPECIALS, *(f"word{i}" for i in range(vocab_size - len(SPECIALS)))])
    decoder = CaptionDecoder(DecoderConfig(len(vocab), encoder.channels, embed_dim=256, hidden_dim=512,
                                           attention_dim=256, dropout=0.0)).eval()
    return CaptionModel(encoder, decoder, vocab, PreprocessConfig(), name="random-realistic", version="bench")


def load_captioner(model_dir: str | None) -> tuple[Captioner, str]:
    """The bundled model, else ``model_dir``, else the realistic random model; and a description."""
    if (DEFAULT_MODEL_DIR / "config.json").is_file():
        return Captioner.load(allow_download=False), f"bundled model {DEFAULT_MODEL_DIR}"
    if model_dir:
        return Captioner.load(model_dir, allow_download=False), f"model {model_dir}"
    return Captioner(realistic_random_model()), "random-weight decoder (hidden 512, vocab 3000, attention)"


def image_files(count: int, tmp: Path) -> tuple[list[str], str]:
    """``count`` Flickr8k JPEGs (sorted names), or generated 224x224 JPEGs when the data is absent."""
    if FLICKR8K_IMAGES.is_dir():
        files = sorted(FLICKR8K_IMAGES.glob("*.jpg"))[:count]
        if len(files) == count:
            return [str(f) for f in files], f"{count} Flickr8k JPEGs from {FLICKR8K_IMAGES}"
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        base = np.linspace(0, 255, 224, dtype=np.float32)[None, :, None] * rng.random(3, dtype=np.float32)
        pixels = np.clip(base + rng.normal(0, 30, (224, 224, 3)), 0, 255).astype(np.uint8)
        path = tmp / f"{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths, f"{count} generated 224x224 JPEGs"


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def time_batches(fn: Callable[[torch.Tensor], object], tensors: torch.Tensor, batch_size: int) -> float:
    """Images/s of ``fn`` over ``tensors`` in batches, after one warm-up batch."""
    fn(tensors[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(tensors), batch_size):
        fn(tensors[i : i + batch_size])
    return rate(len(tensors), time.perf_counter() - start)


def engine_throughput(
    captioner: Captioner, paths: list[str], batch_size: int, workers: int, threads: int, tmp: Path, options: object
) -> tuple[float, float]:
    """(steady-state images/s after the first batch, overall images/s) of the command's engine on files."""
    torch.set_num_threads(threads)
    stamps: list[tuple[float, int]] = []
    out = tmp / f"bench-{workers}-{threads}.jsonl"
    writer = open_writer("jsonl", out)
    start = time.perf_counter()
    run_batch(captioner, paths, options, writer, batch_size, workers,  # type: ignore[arg-type]
              on_batch=lambda records: stamps.append((time.perf_counter(), len(records))))
    writer.close()
    end = stamps[-1][0]
    steady = rate(sum(n for _, n in stamps[1:]), end - stamps[0][0]) if len(stamps) > 1 else float("nan")
    out.unlink()
    return steady, rate(len(paths), end - start)


def large_jpeg_times(tmp: Path, repeats: int = 3) -> tuple[float, float]:
    """Median seconds to decode + preprocess a 4000x3000 JPEG (default 224 config): with draft mode, without."""
    path = tmp / "large.jpg"
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:3000, 0:4000].astype(np.float32)
    pixels = np.stack([x / 4000 * 255, y / 3000 * 255, (x + y) / 7000 * 255], axis=2)
    pixels += rng.normal(0, 12, pixels.shape).astype(np.float32)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
    config = PreprocessConfig()

    def once() -> float:
        start = time.perf_counter()
        preprocess(path, config)
        return time.perf_counter() - start

    with_draft = statistics.median(once() for _ in range(repeats))
    with mock.patch.object(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: None):
        without = statistics.median(once() for _ in range(repeats))
    return with_draft, without


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (when there is no bundled model)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--configs", default=None,
                        help="engine settings to try, WORKERS:THREADS,... (default: 0:C,1:C,2:C,2:C-1 for C cores)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.configs:
        configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    else:
        configs = [(0, cores), (1, cores), (min(4, cores), cores)] + ([(min(4, cores), cores - 1)] if cores > 1 else [])
    default_threads = torch.get_num_threads()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        captioner, model_desc = load_captioner(args.model)
        if args.device != "cpu":
            captioner = Captioner(captioner.model, args.device)
        paths, images_desc = image_files(args.images, tmp)
        options = captioner.options(strategy="beam", beam_size=args.beam_size, max_length=args.max_length)
        print(f"model: {model_desc}; device {captioner.device}; {cores} cores, torch threads {default_threads}")
        print(f"images: {images_desc}; batch size {args.batch_size}; beam {args.beam_size}, max length "
              f"{args.max_length}; load average {os.getloadavg()[0]:.1f}")

        start = time.perf_counter()
        tensors = torch.stack([captioner.load_tensor(p) for p in paths])
        load_rate = rate(len(paths), time.perf_counter() - start)
        print(f"decode + preprocess in one process:   {load_rate:7.1f} images/s")

        def encode(batch: torch.Tensor) -> None:
            with torch.inference_mode():
                captioner.model.encoder(batch.to(captioner.device))
            if captioner.device.type == "cuda":
                torch.cuda.synchronize()

        a = time_batches(encode, tensors, args.batch_size)
        print(f"(a) encoder only, ready tensors:      {a:7.1f} images/s")
        b = time_batches(lambda batch: captioner.caption_tensors(batch, options), tensors, args.batch_size)
        print(f"(b) encoder + beam-{args.beam_size} decoding, in memory: {b:7.1f} images/s")

        best = (0.0, (0, 0))
        for workers, threads in configs:
            steady, overall = engine_throughput(captioner, paths, args.batch_size, workers, threads, tmp, options)
            print(f"(c) engine on files, workers={workers} threads={threads}: {steady:7.1f} images/s steady "
                  f"({overall:.1f} including the first batch); (c)/(b) = {steady / b:.2f}")
            best = max(best, (steady, (workers, threads)))
        torch.set_num_threads(default_threads)

        print(f"best (c): workers={best[1][0]} threads={best[1][1]}: {best[0]:.1f} images/s")
        print(f"(c)/(b) = {best[0] / b:.2f}   (target >= 0.85: loading hidden behind the model)")
        print(f"(b)/(a) = {b / a:.2f}   (share of the encoder-only speed left after decoding)")

        with_draft, without = large_jpeg_times(tmp)
        print(f"12-megapixel JPEG (4000x3000) decode + preprocess: {with_draft * 1000:.0f} ms with draft mode, "
              f"{without * 1000:.0f} ms without ({without / with_draft:.1f}x)")
        print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
