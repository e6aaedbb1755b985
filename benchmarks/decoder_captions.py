"""Does the decoder's fast path write the same captions as the baseline decoder? A whole test split, side by side.

The bundled model (or ``--model``) encodes every image of a COCO-format split once (default runtime), then each
batch of grids is decoded with the model's default decoding by this tree's :func:`captioner.decoding.decode` (the
inference fast path, ``captioner/fast_decoder.py``) and by the decoder as it was at ``--baseline`` (a git commit,
loaded as ``benchmarks/runtime.py`` does), alternately. It prints how many captions differ, the decoders' time
ratio, and BLEU + CIDEr of both (the Python tokenizer, no Java).

    captioner prepare flickr8k --root ../shared/data/flickr8k --out /tmp/f8k
    .venv/bin/python benchmarks/decoder_captions.py --annotations /tmp/f8k/captions_test.json --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from runtime import load_baseline_decoder  # noqa: E402

from captioner.api import Captioner  # noqa: E402
from captioner.decoding import decode  # noqa: E402
from training.data import load_coco  # noqa: E402
from training.evaluation import score_captions  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotations", type=Path, required=True, help="COCO captions file (e.g. the test split)")
    parser.add_argument("--images", type=Path, default=None, help="image folder (default: the file's info.image_dir)")
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--baseline", default="f483925", help="git commit whose decoder is the 'before'")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dataset = load_coco(args.annotations, args.images)
    captioner = Captioner.load(args.model, allow_download=False)
    baseline = load_baseline_decoder(args.baseline, captioner)
    if baseline is None:
        sys.exit(f"error: baseline {args.baseline} is not available (no git checkout)")
    options = captioner.options()
    print(f"{len(dataset)} images from {args.annotations}; decoding {options}", flush=True)
    captions: dict[str, dict[int, str]] = {"this tree": {}, "baseline": {}}
    seconds = {"this tree": 0.0, "baseline": 0.0}
    images = dataset.images
    for start in range(0, len(images), args.batch_size):
        records = images[start : start + args.batch_size]
        batch = torch.stack([captioner.load_tensor(record.path) for record in records])
        with torch.inference_mode():
            grid = captioner.encode(batch).float()
        runs = (("this tree", lambda g=grid: decode(captioner.model.decoder, g, captioner.vocab, options)),
                ("baseline", lambda g=grid: baseline(g, options)))
        for name, fn in runs if start // args.batch_size % 2 == 0 else runs[::-1]:  # alternate who goes first
            began = time.perf_counter()
            results = fn()
            seconds[name] += time.perf_counter() - began
            for record, hyps in zip(records, results, strict=True):
                captions[name][record.image_id] = captioner.vocab.decode(hyps[0].tokens)
    new, old = captions["this tree"], captions["baseline"]
    differ = [i for i in new if new[i] != old[i]]
    print(f"captions differing: {len(differ)} of {len(new)}; decoder time baseline / this tree: "
          f"{seconds['baseline'] / seconds['this tree']:.2f}x ({seconds['this tree']:.1f} s vs "
          f"{seconds['baseline']:.1f} s)")  # fmt: skip
    for image_id in differ[:10]:
        print(f"  {image_id}: {old[image_id]!r} -> {new[image_id]!r}")
    references = dataset.references()
    for name, predictions in captions.items():
        scores = score_captions(predictions, references, ["bleu", "cider"], java_tokenizer=False)
        print(f"{name:<10} BLEU-4 {scores['BLEU-4']:.4f}  CIDEr {scores['CIDEr']:.4f}", flush=True)


if __name__ == "__main__":
    main()
