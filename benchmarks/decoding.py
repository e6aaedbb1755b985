"""Batched beam search versus a per-image Python loop of the same search, decoder only.

One random-weight decoder of realistic size (MobileNetV2 grid: 1280 channels, 7x7; embed 256, hidden 512, attention
256, vocabulary 3000) and random feature grids. It times:

  (a) one ``decode()`` call on all ``--images`` grids (beam ``--beam-size``), and
  (b) a Python loop calling ``decode()`` on each grid alone, with the same options,

checks that both give the same captions, and prints both times and (b)/(a). Random weights never emit ``<end>``
early, so every beam runs to ``--max-length`` words in both: the ratio measures batching, not early stopping.

With ``--model DIR`` (``default`` for the bundled model) the same comparison runs on a trained decoder and the
encoder grids of real photos (the first ``--images`` Flickr8k photos when ``../shared`` is present, else the sample
photos, repeated), with the model's own decoding defaults: captions end at their own lengths, as in real use.

    .venv/bin/python benchmarks/decoding.py
    .venv/bin/python benchmarks/decoding.py --model default
    .venv/bin/python benchmarks/decoding.py --threads 1 --repeats 5
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
from captioner.decoding import DecodingOptions, Hypothesis, decode  # noqa: E402
from captioner.model import CaptionDecoder, DecoderConfig  # noqa: E402
from captioner.vocabulary import SPECIALS, Vocabulary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k" / "images"
SAMPLES = ROOT / "captioner" / "samples"


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls (after one warm-up call) and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="a model directory, or 'default' for the bundled model")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.model:
        captioner = Captioner.load(None if args.model == "default" else args.model, args.device)
        decoder, vocab, config = captioner.model.decoder, captioner.vocab, captioner.model.decoder.config
        photos = sorted(FLICKR.glob("*.jpg"))[: args.images] if FLICKR.is_dir() else []
        photos = photos or [SAMPLES / name for name in sorted(p.name for p in SAMPLES.glob("*.jpg"))]
        photos = [photos[i % len(photos)] for i in range(args.images)]
        with torch.inference_mode():
            grids = captioner.model.encoder(torch.stack([captioner.load_tensor(p) for p in photos]).to(args.device))
        options = captioner.options(beam_size=args.beam_size, max_length=args.max_length)
        source = f"{args.model} model on {'Flickr8k' if FLICKR.is_dir() else 'sample'} photos"
    else:
        vocab = Vocabulary([*SPECIALS, *(f"word{i}" for i in range(args.vocab - len(SPECIALS)))])
        config = DecoderConfig(len(vocab), 1280, embed_dim=256, hidden_dim=512, attention_dim=256, dropout=0.0)
        decoder = CaptionDecoder(config).eval().to(args.device)
        grids = torch.rand(args.images, 1280, 7, 7, device=args.device) * 2.0  # post-ReLU6-like activations
        options = DecodingOptions(strategy="beam", beam_size=args.beam_size, max_length=args.max_length)
        source = "random weights"
    sync = torch.cuda.synchronize if grids.is_cuda else (lambda: None)

    def batched() -> list[list[Hypothesis]]:
        result = decode(decoder, grids, vocab, options)
        sync()
        return result

    def per_image() -> list[list[Hypothesis]]:
        result = [decode(decoder, grids[i : i + 1], vocab, options)[0] for i in range(args.images)]
        sync()
        return result

    batch_time, batch_result = timed(batched, args.repeats)
    loop_time, loop_result = timed(per_image, args.repeats)
    same_tokens = [h.tokens for hs in batch_result for h in hs] == [h.tokens for hs in loop_result for h in hs]
    max_diff = max(
        abs(a.log_prob - b.log_prob)
        for ha, hb in zip(batch_result, loop_result, strict=True)
        for a, b in zip(ha, hb, strict=True)
    )
    lengths = [len(hs[0].tokens) for hs in batch_result]
    rows = args.images * args.beam_size
    gemm_small, gemm_big = gemm_row_costs(decoder, args.beam_size, rows, args.repeats)

    print(
        f"decoder ({source}): embed {config.embed_dim}, hidden {config.hidden_dim}, attention {config.attention_dim}, "
        f"vocab {len(vocab)}, grid {tuple(grids.shape[1:])}, {config.cell}; "
        f"device {args.device}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"beam search: {args.images} images, beam {options.beam_size}, max_length {options.max_length}, "
        f"length penalty {options.length_penalty}, no-repeat n-gram {options.no_repeat_ngram_size} "
        f"(caption lengths {min(lengths)}-{max(lengths)}), median of {args.repeats}"
    )
    per_image_ms = 1000 / args.images
    print(f"  batched   (one decode() call): {batch_time * 1000:9.1f} ms  ({batch_time * per_image_ms:.2f} ms/image)")
    print(f"  per-image (Python loop)      : {loop_time * 1000:9.1f} ms  ({loop_time * per_image_ms:.2f} ms/image)")
    print(
        f"  speed-up: {loop_time / batch_time:.1f}x  (same captions: {same_tokens}, max |log_prob diff| {max_diff:.1e})"
    )
    print(
        f"  for reference, the LSTM input matmul costs {gemm_small / gemm_big:.1f}x more per row at {args.beam_size} "
        f"rows (one image's beams) than at {rows} rows (all images' beams)"
    )


def gemm_row_costs(decoder: CaptionDecoder, small: int, big: int, repeats: int) -> tuple[float, float]:
    """Per-row time of the largest matmul (the first cell's input projection) at ``small`` and ``big`` rows."""
    weight = decoder.cells[0].weight_ih
    costs = []
    for rows in (small, big):
        x = torch.randn(rows, weight.size(1), device=weight.device)
        with torch.inference_mode():
            seconds, _ = timed(lambda x=x: torch.nn.functional.linear(x, weight).sum().item(), 20 * repeats)
        costs.append(seconds / rows)
    return costs[0], costs[1]


if __name__ == "__main__":
    main()
