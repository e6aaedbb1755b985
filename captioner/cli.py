"""The ``captioner`` command: one sub-command per module, each exposing ``register(subparsers)``.

Mistakes a user can fix (a bad flag value, a missing file, a run folder given as a model) end as one line on stderr,
``captioner COMMAND: error: PROBLEM; FIX``, and exit status 2, never a traceback; ``--debug`` (or the environment
variable ``CAPTIONER_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from captioner import caption_command
from captioner.errors import CaptionerError
from service import serve_command
from training import evaluate_command, prepare_command, train_command

# Each module adds its sub-commands; the function a sub-command runs is stored as ``args.run``.
COMMAND_MODULES = (caption_command, train_command, prepare_command, evaluate_command, serve_command)

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEBUG_ENV = "CAPTIONER_DEBUG"

# Errors that mean "the input or the setup is wrong", not "the program is wrong": one line and exit 2.
USER_ERRORS = (CaptionerError, ValueError, OSError, LookupError)


def package_version() -> str:
    """The installed ``captioner`` distribution's version (``unknown`` when run from a bare source tree)."""
    try:
        return version("captioner")
    except PackageNotFoundError:
        return "unknown"


def _all_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """``parser`` and every sub-command parser below it (``prepare flickr8k`` included)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="captioner", description="Image captioning: caption, train, evaluate, serve.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  captioner caption captioner/samples/*.jpg\n"
               "  captioner serve --port 8000\n"
               "  captioner COMMAND --help        (each command's options and examples)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subparsers)
    # --debug works before or after the sub-command; SUPPRESS keeps a sub-parser from resetting it to False.
    for sub in _all_parsers(parser):
        if sub.description:  # the raw formatter keeps the examples' lines; the prose is wrapped here
            sub.description = textwrap.fill(sub.description, 78)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS if sub is not parser else False,
                         help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")
    return parser


def check_model_dir(path: str | None) -> None:
    """Raise ValueError with the fix when ``--model`` is not a model directory (e.g. a training run's folder)."""
    if path is None:
        return
    model = Path(path)
    if not model.exists():
        raise ValueError(f"--model {path}: no such directory; give a model directory (one with config.json and "
                         "model.safetensors), or leave --model out for the bundled model")
    if model.is_dir() and not (model / "config.json").is_file():
        for name in ("best", "last"):
            if (model / name / "config.json").is_file():
                raise ValueError(f"--model {path} is a training run folder, not a model directory; "
                                 f"use --model {model / name}")
        raise ValueError(f"--model {path} has no config.json, so it is not a model directory; give the folder "
                         "`captioner train` wrote as OUT/best")


def _command_name(args: argparse.Namespace) -> str:
    """``captioner caption``, ``captioner prepare flickr8k``, ...: the prefix of an error line."""
    return " ".join(["captioner", args.command, *([args.format] if args.command == "prepare" else [])])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``captioner`` console script; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        check_model_dir(getattr(args, "model", None))
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"{_command_name(args)}: error: {_one_line(exc)} (--debug shows the traceback)", file=sys.stderr)
        return EXIT_USAGE


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line; OSErrors name their file (``[Errno 2] No such file ...: 'x'``)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, KeyError):
            text = f"missing key {text}"
    return " ".join(text.split())
