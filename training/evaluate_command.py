"""``captioner evaluate``: caption a COCO-format split with a model (or take an existing results file) and score it.

Writes ``results.json`` (COCO results format, when a model ran), ``metrics.json`` and, with ``--html``,
``report.html`` into ``--out-dir``, and prints the scores x100.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from captioner.api import Captioner
from captioner.atomic import atomic_write_text
from captioner.caption_command import add_decoding_arguments
from captioner.errors import CaptionerError
from captioner.runtime import RUNTIME_CHOICES
from training.data import CaptionDataset, load_coco
from training.evaluation import (
    DEFAULT_METRICS,
    METRIC_KEYS,
    UNSUPPORTED_METRICS,
    evaluate_model,
    format_metrics,
    load_results,
    match_results,
    score_captions,
    write_results,
)
from training.report import write_report

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="caption a COCO-format split and score it (BLEU, METEOR, ...)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory to caption the images with")
    source.add_argument("--results", type=Path,
                        help="score this COCO results file instead of running a model (string image ids, as "
                             "`captioner caption --format coco` writes for non-numeric file names, match file stems)")
    parser.add_argument("--annotations", required=True, type=Path, help="COCO captions file: the references")
    parser.add_argument("--images", type=Path, default=None,
                        help="folder the file_name entries are relative to (default: the one `captioner prepare` "
                             "recorded in the file)")
    add_decoding_arguments(parser)  # --num-captions is ignored: the best caption is scored
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="image-loading processes (0: load in this one)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--runtime", default="auto", choices=RUNTIME_CHOICES,
                        help="encoder runtime (default: auto, the fastest installed; torch is the reference)")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS),
                        choices=[*METRIC_KEYS, *UNSUPPORTED_METRICS])
    parser.add_argument("--python-tokenizer", action="store_true",
                        help="tokenise in Python instead of the official Java PTBTokenizer (with no Java, also "
                             "leave out meteor)")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: evaluation/<annotations file name>")
    parser.add_argument("--html", action="store_true", help="also write report.html with sample images")
    parser.add_argument("--sample-size", type=int, default=50, help="images shown in report.html")
    parser.set_defaults(run=run)


def _score_results(args: argparse.Namespace, dataset: CaptionDataset) -> tuple[dict[int, str], dict[str, float]]:
    predictions = match_results(load_results(args.results), dataset)
    if len(predictions) < len(dataset):
        log.warning("the results cover %d of the %d annotated images; scoring those only", len(predictions),
                    len(dataset))
    return predictions, score_captions(predictions, dataset.references(), args.metrics, not args.python_tokenizer)


def run(args: argparse.Namespace) -> int:
    out_dir: Path = args.out_dir or Path("evaluation") / args.annotations.stem
    try:
        dataset = load_coco(args.annotations, args.images)
        details: dict[str, object] = {"annotations": str(args.annotations.resolve())}
        if args.results:
            predictions, metrics = _score_results(args, dataset)
            details["results"] = str(args.results.resolve())
        else:
            device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
            captioner = Captioner.load(args.model, device=device, runtime=args.runtime)
            options = captioner.options(
                strategy=args.strategy, beam_size=args.beam_size, max_length=args.max_length, num_captions=1,
                length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
            )
            predictions, metrics = evaluate_model(
                captioner, dataset, options, args.batch_size, metrics=args.metrics,
                java_tokenizer=not args.python_tokenizer, num_workers=args.workers,
            )
            details["results"] = str(write_results(predictions, out_dir / "results.json").resolve())
            details |= {"model": f"{captioner.name} {captioner.version} ({Path(args.model).resolve()})",
                        "decoding": dataclasses.asdict(options)}
    except (CaptionerError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    details |= {"images_scored": len(predictions), "images_annotated": len(dataset)}
    atomic_write_text(out_dir / "metrics.json", json.dumps({"metrics": metrics, **details}, indent=2) + "\n")
    print(format_metrics(metrics))
    print(f"{len(predictions)} of {len(dataset)} images scored; wrote {out_dir / 'metrics.json'}")
    if args.html:
        page = write_report(out_dir / "report.html", predictions, dataset, metrics,
                            f"Evaluation on {args.annotations.name}", details, args.sample_size)
        print(f"wrote {page}")
    return 0
