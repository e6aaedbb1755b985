"""Score an ensemble of decoders that read *different* encoders' grids on a validation split (a #15 lever).

A model directory holds one encoder, and :class:`captioner.ensemble.DecoderEnsemble` averages decoders over its grid.
This script asks what a second encoder would give before the format supports one: each model directory given
(a single decoder or an ensemble, on its own encoder and preprocessing, e.g. Lite0 at 224 px and Lite1 at 240 px)
reads its own grids from the features cache, and every member's log-probabilities are averaged at each step of the
same beam search :func:`captioner.decoding.decode` runs (:class:`~captioner.ensemble.EnsembleSteps`, given one
grid per member), with the first model's decoding options. The models must share the vocabulary (trained on the
same data).

    .venv/bin/python scripts/multi_encoder_ensemble.py runs/v5-ss25/best runs/v6-lite1/best \
        --annotations data/flickr8k/captions_dev.json --images ../shared/data/flickr8k/images [--official]

With ``--write-annotations OUT`` it is also a teacher for sequence-level knowledge distillation (Kim & Rush, 2016):
OUT is the annotations file given plus the ensemble's caption for every image, one more caption each, so that a
student decoder (one encoder, the shipped cost) trains on the references and on what the ensemble says:

    .venv/bin/python scripts/multi_encoder_ensemble.py runs/v5-ss25/best runs/v6-lite1/best \
        --annotations data/flickr8k/captions_train.json --write-annotations data/flickr8k/captions_train_distilled.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.atomic import atomic_write_text  # noqa: E402
from captioner.checkpoint import load_model  # noqa: E402
from captioner.decoding import DecodingOptions, _decode_group  # noqa: E402
from captioner.ensemble import EnsembleSteps, decoders_of  # noqa: E402
from captioner.fast_decoder import fast_decoder  # noqa: E402
from training.data import load_coco  # noqa: E402
from training.evaluation import compute_metrics  # noqa: E402
from training.features import build_feature_cache  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Score the ensemble of ``argv``'s models (the command line when None) and write the annotations if asked."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="model directories, each on its own encoder")
    parser.add_argument("--annotations", required=True)
    parser.add_argument("--images", default="")
    parser.add_argument("--cache-dir", default="cache/features")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--official", action="store_true", help="all metrics, Java PTB tokenizer and METEOR (slower)")
    parser.add_argument("--write-annotations", type=Path, default=None,
                        help="write the annotations plus the ensemble's caption for each image here (distillation)")
    args = parser.parse_args(argv)

    models = [load_model(path, allow_download=False) for path in args.models]
    vocab = models[0].vocab
    if any(m.vocab.words != vocab.words for m in models[1:]):
        sys.exit("error: the models' vocabularies differ; ensemble members must share one")
    dataset = load_coco(args.annotations, args.images or None)
    paths = [image.path for image in dataset.images]
    caches = [build_feature_cache(m.encoder, m.preprocess, paths, args.cache_dir) for m in models]
    members, member_cache = [], []
    for model, cache in zip(models, caches, strict=True):
        decoders = decoders_of(model.decoder)
        members += [fast_decoder(decoder.eval()) for decoder in decoders]
        member_cache += [cache] * len(decoders)
    steps = EnsembleSteps(members)  # memory_and_state takes one grid per member
    options = DecodingOptions(**models[0].decoding)
    failed = set().union(*(cache.failed for cache in caches))
    rows = [r for r in range(len(dataset.images)) if r not in failed]
    predictions = {}
    with torch.inference_mode():
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start : start + args.batch_size]
            grids = [cache.grids(batch).float() for cache in member_cache]
            hypotheses = _decode_group(steps, grids, vocab, options)
            for row, hyps in zip(batch, hypotheses, strict=True):
                predictions[dataset.images[row].image_id] = vocab.decode(hyps[0].tokens)
    references = {dataset.images[r].image_id: dataset.images[r].captions for r in rows}
    metrics = ("bleu", "meteor", "rouge", "cider") if args.official else ("bleu", "cider")
    scores = compute_metrics(predictions, references, metrics=metrics, java_tokenizer=args.official)
    print(f"{len(members)} decoders over {len(models)} encoders, {len(rows)} images, {options}")
    print("  ".join(f"{name} {value * 100:.2f}" for name, value in scores.items()))
    if args.write_annotations:
        write_with_predictions(Path(args.annotations), predictions, args.write_annotations)


def write_with_predictions(annotations: Path, predictions: dict[int, str], out: Path) -> None:
    """Write the COCO captions file ``annotations`` with one more caption per image, ``predictions[image_id]``
    (new annotation ids after the largest one there; an empty prediction adds nothing), atomically to ``out``."""
    coco = json.loads(annotations.read_text(encoding="utf-8"))
    next_id = max((ann["id"] for ann in coco["annotations"]), default=-1) + 1
    written = {image_id: caption for image_id, caption in sorted(predictions.items()) if caption.strip()}
    for offset, (image_id, caption) in enumerate(written.items()):
        coco["annotations"].append({"id": next_id + offset, "image_id": image_id, "caption": caption})
    info = coco.setdefault("info", {})
    info["description"] = f"{info.get('description', '')} + one ensemble caption per image".strip()
    atomic_write_text(out, json.dumps(coco))
    print(f"wrote {out}: {len(coco['annotations'])} captions ({len(written)} from the ensemble, "
          f"{len(predictions) - len(written)} empty ones left out)")


if __name__ == "__main__":
    main()
