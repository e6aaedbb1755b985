"""The ``captioner`` command: one sub-command per module, each exposing ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

# Each module adds its sub-commands; the function a sub-command runs is stored as ``args.run``.
COMMAND_MODULES = (
    "captioner.caption_command",
    "training.train_command",
    "training.prepare_command",
    "training.evaluate_command",
    "service.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="captioner", description="Image captioning: caption, train, evaluate, serve.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``captioner`` console script; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)
