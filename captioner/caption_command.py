"""``captioner caption IMAGE...``: print one JSON line per image."""

from __future__ import annotations

import argparse
import json
import sys

from captioner.api import Captioner
from captioner.errors import CaptionerError


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Decoding flags shared by every command that writes captions."""
    parser.add_argument("--strategy", choices=["greedy", "beam"], default="beam")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--num-captions", type=int, default=1)
    parser.add_argument("--length-penalty", type=float, default=None, help="default: the model's recorded value")
    parser.add_argument("--no-repeat-ngram-size", type=int, default=None, help="default: the model's recorded value")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("caption", help="caption images, one JSON line per image")
    parser.add_argument("images", nargs="+", metavar="IMAGE")
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--device", default="cpu")
    add_decoding_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    captioner = Captioner.load(args.model, device=args.device)
    options = captioner.options(
        strategy=args.strategy, beam_size=args.beam_size, max_length=args.max_length, num_captions=args.num_captions,
        length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
    )
    failures = 0
    for image in args.images:
        record: dict = {"image": image}
        try:
            captions = captioner.caption_tensors(captioner.load_tensor(image).unsqueeze(0), options)[0]
            record |= {"caption": captions[0].text, "log_prob": round(captions[0].log_prob, 4)}
            if options.num_captions > 1:
                record["captions"] = [{"caption": c.text, "log_prob": round(c.log_prob, 4)} for c in captions]
        except (CaptionerError, OSError) as exc:
            failures += 1
            record["error"] = str(exc)
        print(json.dumps(record), flush=True)
    if failures:
        print(f"{failures} of {len(args.images)} images failed", file=sys.stderr)
    return 1 if failures else 0
