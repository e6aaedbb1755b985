"""Do the runtimes write the same captions? Every runtime captions a whole test split, then scores it.

For each installed runtime (``--runtimes``), the bundled model (or ``--model``) captions every image of a COCO-format
split with its default decoding, through ``training.evaluation.evaluate_model`` (the ``captioner evaluate`` path).
It prints each runtime's scores and images/s (and its ratio to the first runtime's, measured in the same run), and
how many captions differ from the first run's (the reference, torch). The issue's targets: at most 0.5% of
captions differ, CIDEr within 0.2. ``--decoder-precisions float32 bfloat16 int8`` runs each runtime with each
decoder precision (bfloat16, int8: not exact; their target is CIDEr within 0.3).

    captioner prepare flickr8k --root ../shared/data/flickr8k --out /tmp/f8k
    .venv/bin/python benchmarks/runtime_captions.py --annotations /tmp/f8k/captions_test.json

The Python tokenizer and BLEU + CIDEr (no Java) keep it to the cost of captioning.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.api import Captioner  # noqa: E402
from captioner.fast_decoder import DECODER_PRECISIONS  # noqa: E402
from captioner.runtime import RUNTIMES, installed  # noqa: E402
from training.data import load_coco  # noqa: E402
from training.evaluation import evaluate_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, required=True, help="COCO captions file (e.g. the test split)")
    parser.add_argument("--images", type=Path, default=None, help="image folder (default: the file's info.image_dir)")
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--runtimes", nargs="+", default=[r for r in RUNTIMES if installed(r)])
    parser.add_argument("--decoder-precisions", nargs="+", default=["float32"], choices=DECODER_PRECISIONS,
                        help="decoder precisions to run with each runtime (default: float32)")
    parser.add_argument("--metrics", nargs="+", default=["bleu", "cider"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_coco(args.annotations, args.images)
    reference = Captioner.load(args.model, allow_download=False, runtime="torch")
    options = reference.options()
    print(f"{len(dataset)} images from {args.annotations}; decoding {options}", flush=True)
    results: dict[str, dict[int, str]] = {}
    rates: dict[str, float] = {}
    runs = [(runtime, precision) for runtime in args.runtimes for precision in args.decoder_precisions]
    for runtime, precision in runs:
        name = runtime if precision == "float32" else f"{runtime}+{precision}"
        captioner = Captioner(reference.model, reference.device, runtime=runtime, decoder_precision=precision)
        start = time.perf_counter()
        predictions, scores = evaluate_model(
            captioner, dataset, options, args.batch_size, metrics=args.metrics, java_tokenizer=False,
            num_workers=args.workers, progress=False,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        results[name] = predictions
        rates[name] = len(predictions) / seconds
        first = next(iter(results.values()))
        differ = sum(predictions[i] != first[i] for i in first)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
        share = 100 * differ / len(first)
        reference_name = next(iter(results))
        print(f"{name:<16} {rates[name]:6.1f} img/s ({rates[name] / rates[reference_name]:.2f}x)  {shown}  "
              f"captions differing from {reference_name}: {differ} of {len(first)} ({share:.1f}%)", flush=True)


if __name__ == "__main__":
    main()
