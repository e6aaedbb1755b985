"""Give a fine-tuned model its tags: refit the pretrained ImageNet classifier to its tuned grid (in place).

Training does this itself at the end of a fine-tuning run (``training/tag_head.py``); this script does it for a
model trained before it did, from the same training photos:

    .venv/bin/python scripts/refit_tags.py runs/v7-ft2/best \
        --annotations data/flickr8k/captions_train.json --images ../shared/data/flickr8k/images

The photos' trunk grids come from the features cache (the entry the training run made). Exit 2 with one line when
the model has no fine-tuned encoder or its tags cannot be refitted.

``--check`` changes nothing: it prints how closely the model's tags follow the pretrained network's on the photos
of ``--annotations`` (held-out ones, e.g. the dev split), against the pretrained classifier unrefitted:

    .venv/bin/python scripts/refit_tags.py runs/v7-ft2/best --check \
        --annotations data/flickr8k/captions_dev.json --images ../shared/data/flickr8k/images
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.checkpoint import CaptionModel, load_model, save_model  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402
from captioner.tags import pretrained_head  # noqa: E402
from training.data import load_coco  # noqa: E402
from training.features import FeatureCache, build_feature_cache  # noqa: E402
from training.tag_head import agreement, pooled_grids, refit_tag_head  # noqa: E402


def check(model: CaptionModel, trunk: FeatureCache) -> str:
    """How often the model's tags head and the pretrained one (unrefitted) agree with the pretrained network."""
    teacher = pretrained_head(model.encoder.name)
    if model.tagger is None or teacher is None:
        raise CaptionerError("the model or its pretrained file has no tags classifier")
    tuned, reference = pooled_grids(model.encoder, trunk)
    refitted, unrefitted = (agreement(head, tuned, teacher, reference) for head in (model.tagger, teacher))
    return (f"top tag as the pretrained network's for {refitted[0]:.1%} (the pretrained classifier unrefitted: "
            f"{unrefitted[0]:.1%}), top five in common {refitted[1]:.1%} ({unrefitted[1]:.1%})")


def main(argv: list[str] | None = None) -> int:
    """Refit the tags of the model named in ``argv``; 0 when done, 2 (one line on stderr) when it cannot be."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="a model directory whose encoder was fine-tuned")
    parser.add_argument("--annotations", required=True, help="the training split it was trained on (COCO format)")
    parser.add_argument("--images", default="")
    parser.add_argument("--cache-dir", default="cache/features")
    parser.add_argument("--check", action="store_true", help="only measure the tags' agreement; change nothing")
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model, allow_download=False)
        if not model.encoder.fine_tune_blocks:
            raise CaptionerError("its encoder was not fine-tuned: nothing to refit")
        dataset = load_coco(args.annotations, args.images or None)
        trunk = build_feature_cache(
            model.encoder, model.preprocess, [r.path for r in dataset.images], args.cache_dir, trunk=True
        )
        if args.check:
            print(f"refit_tags: {args.model} on {len(dataset.images)} photos: {check(model, trunk)}")
            return 0
        model.tagger = refit_tag_head(model.encoder, trunk)
    except (CaptionerError, OSError, ValueError) as exc:
        print(f"refit_tags: cannot refit the tags of {args.model}: {exc}", file=sys.stderr)
        return 2
    save_model(model, args.model)
    print(f"refit_tags: {args.model} tags refitted on {len(dataset.images)} photos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
