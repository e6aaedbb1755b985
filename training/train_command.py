"""``captioner train --config FILE [--set section.key=value ...] --out RUN_DIR [--resume]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from training.config import Config, load_config

EXAMPLES = """\
examples:
  captioner prepare flickr8k --root ../shared/data/flickr8k --out data/flickr8k
  captioner train --config configs/flickr8k.toml --out runs/flickr8k
  captioner train --config configs/flickr8k.toml --set data.max_images=200 --set train.epochs=1 --out runs/try
  captioner train --config configs/flickr8k.toml --out runs/flickr8k --resume
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model on COCO-format caption data",
        description="Train an encoder-decoder captioning model from COCO-format caption files (see `captioner "
                    "prepare`) and write a run folder: OUT/best/ (the model directory with the best validation "
                    "CIDEr, scored on the test split at the end), OUT/last/ (for --resume), config.toml, "
                    "log.jsonl and curves.png. Every config key, its default and its meaning: training/config.py.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="TOML config file, e.g. configs/flickr8k.toml (default: none, the built-in defaults; "
                             "then data.train_annotations and data.val_annotations must be --set)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.epochs=5 (repeatable)",
    )
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="run directory (best/ and last/ model directories go here)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    parser.set_defaults(run=run)


def check_data(config: Config, config_file: str | None) -> None:
    """Raise ValueError naming the missing annotation file and the fix, before any heavy import or work."""
    data = config.data
    for key in ("train_annotations", "val_annotations", "test_annotations"):
        value = getattr(data, key)
        if not value and key != "test_annotations":
            hint = f"set it in {config_file}" if config_file else "pass --config FILE (e.g. configs/flickr8k.toml)"
            raise ValueError(f"data.{key} is not set; {hint} or --set data.{key}=path/to/captions.json")
        if value and not Path(value).is_file():
            raise ValueError(f"data.{key} = {value!r}: no such file; run `captioner prepare` first or fix the path")


def run(args: argparse.Namespace) -> int:
    if args.config is not None and not Path(args.config).is_file():
        raise ValueError(f"--config {args.config}: no such file (the examples are in configs/)")
    config = load_config(args.config, args.set)
    check_data(config, args.config)

    from training.train import train  # heavy imports only when training

    best = train(config, args.out, resume=args.resume)
    print(best)
    return 0
