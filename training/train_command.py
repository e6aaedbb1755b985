"""``captioner train --config FILE [--set section.key=value ...] --out RUN_DIR [--resume]``."""

from __future__ import annotations

import argparse

from training.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train a model on COCO-format caption data")
    parser.add_argument("--config", default=None, help="TOML config file (see configs/)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value, e.g. --set train.epochs=5 (repeatable)",
    )
    parser.add_argument("--out", required=True, help="run directory (best/ and last/ model directories go here)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from training.train import train  # heavy imports only when training

    config = load_config(args.config, args.set)
    best = train(config, args.out, resume=args.resume)
    print(best)
    return 0
