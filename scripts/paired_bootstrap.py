"""Is model B's CIDEr really ahead of model A's? A paired bootstrap over the photos both captioned.

Reads two `captioner evaluate` results files of the same split (``--out-dir``'s ``results.json``) and the split's
annotations, scores every photo's caption with pycocoevalcap's CIDEr-D on PTB-tokenized captions (the official
scorer, so the means equal `captioner evaluate`'s CIDEr), then resamples the photos with replacement and reports the
mean difference B - A with its 95% interval and how often B stays ahead:

    python scripts/paired_bootstrap.py data/flickr8k/captions_dev.json \\
        evaluation/v7-dev/results.json evaluation/v8-dev/results.json

Without Java the Python tokenizer is used, as `captioner evaluate --python-tokenizer` would.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

from training.data import CaptionDataset, load_coco
from training.evaluation import load_results, match_results, per_image_cider


def per_photo_cider(dataset: CaptionDataset, results: Path) -> dict[int, float]:
    """Each photo's CIDEr-D in a `captioner evaluate` results file of ``dataset``'s photos, scored as `captioner
    evaluate` scores (the corpus: the photos in the file; the PTB tokenizer when Java is present)."""
    predictions = match_results(load_results(results), dataset)
    return per_image_cider(predictions, dataset.references(), java_tokenizer=shutil.which("java") is not None)


def paired_bootstrap(a: dict[int, float], b: dict[int, float], resamples: int = 5000, seed: int = 0) -> dict:
    """Mean of b - a over the shared photos, its 95% bootstrap interval and the share of resamples with b ahead."""
    keys = sorted(a.keys() & b.keys())
    diffs = [b[k] - a[k] for k in keys]
    rng, n = random.Random(seed), len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return {
        "photos": n,
        "a": sum(a[k] for k in keys) / n,
        "b": sum(b[k] for k in keys) / n,
        "difference": sum(diffs) / n,
        "low": means[int(0.025 * resamples)],
        "high": means[int(0.975 * resamples) - 1],
        "b_ahead": sum(m > 0 for m in means) / resamples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("annotations", type=Path, help="COCO-style captions of the split (captioner prepare's)")
    parser.add_argument("a", type=Path, help="results.json of the reference model")
    parser.add_argument("b", type=Path, help="results.json of the candidate model")
    parser.add_argument("--resamples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dataset = load_coco(args.annotations)  # read once for both results files; the photos themselves are not needed
    s = paired_bootstrap(per_photo_cider(dataset, args.a), per_photo_cider(dataset, args.b), args.resamples, args.seed)
    print(f"{s['photos']} photos: A {100 * s['a']:.2f}, B {100 * s['b']:.2f} CIDEr; "
          f"B - A {100 * s['difference']:+.2f}, "
          f"95% interval [{100 * s['low']:+.2f}, {100 * s['high']:+.2f}]; B ahead in {100 * s['b_ahead']:.1f}% of "
          f"{args.resamples} resamples")


if __name__ == "__main__":
    main()
