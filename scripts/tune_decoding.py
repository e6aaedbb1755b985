"""Score decoding options on a validation split, to choose the defaults a model ships with.

    .venv/bin/python scripts/tune_decoding.py --model runs/flickr8k/best \
        --annotations data/flickr8k/captions_dev.json --images ../shared/data/flickr8k/images

Grids come from the features cache (the same encoder and preprocessing as captioning files), so each setting costs
only its decoding. Scores use the Python tokenizer (BLEU, CIDEr): fast and close to the official ones, for
comparing settings; ``--official`` gives the official numbers (Java PTB tokenizer, METEOR).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.checkpoint import load_model  # noqa: E402
from captioner.decoding import DecodingOptions, decode  # noqa: E402
from training.evaluation import score_captions  # noqa: E402
from training.features import cached_split  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--images", default="")
    parser.add_argument("--cache-dir", default="cache/features")
    parser.add_argument("--beam-sizes", default="1,3,5")
    parser.add_argument("--length-penalties", default="0,0.5,1")
    parser.add_argument("--ngram-blocks", default="0,3")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--official", action="store_true", help="all metrics, Java PTB tokenizer and METEOR (slower)")
    args = parser.parse_args()
    metrics = ("bleu", "meteor", "rouge", "cider") if args.official else ("bleu", "cider")

    model = load_model(args.model, allow_download=False)
    split = cached_split(model, args.annotations, args.images or None, args.cache_dir)
    dataset, rows, references = split.dataset, split.rows, split.references
    grid = itertools.product(
        [int(x) for x in args.beam_sizes.split(",")],
        [float(x) for x in args.length_penalties.split(",")],
        [int(x) for x in args.ngram_blocks.split(",")],
    )
    print(
        f"{'beam':>4} {'len.pen':>7} {'no-rep':>6} {'BLEU-1':>7} {'BLEU-2':>7} {'BLEU-3':>7} {'BLEU-4':>7} "
        f"{'METEOR':>7} {'ROUGE-L':>7} {'CIDEr':>7} {'distinct':>8} {'repeats':>8} {'unfin.':>7} {'s':>5}"
    )
    for beam, penalty, block in grid:
        if beam == 1 and penalty:
            continue  # greedy ignores length normalisation
        options = DecodingOptions(
            strategy="greedy" if beam == 1 else "beam",
            beam_size=beam,
            length_penalty=penalty,
            no_repeat_ngram_size=block,
        )
        start = time.perf_counter()
        predictions = {}
        for i in range(0, len(rows), args.batch_size):
            batch = rows[i : i + args.batch_size]
            for row, hyps in zip(batch, decode(model.decoder, split.grids(batch), model.vocab, options), strict=True):
                predictions[dataset.images[row].image_id] = model.vocab.decode(hyps[0].tokens)
        seconds = time.perf_counter() - start
        scores = score_captions(predictions, references, metrics=metrics, java_tokenizer=args.official)
        columns = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
        values = " ".join(f"{scores[c] * 100:>7.2f}" if c in scores else f"{'-':>7}" for c in columns)
        form = (f"{scores['distinct_caption_share'] * 100:>7.1f}% {scores['repeated_pair_share'] * 100:>7.1f}% "
                f"{scores['unfinished_share'] * 100:>6.1f}%")
        print(f"{beam:>4} {penalty:>7} {block:>6} {values} {form} {seconds:>5.0f}", flush=True)


if __name__ == "__main__":
    main()
