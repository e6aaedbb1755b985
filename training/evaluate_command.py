"""``captioner evaluate``: caption a COCO-format split with a model (or take an existing results file) and score it.

Writes ``results.json`` (COCO results format, when a model ran), ``metrics.json`` and, with ``--html``,
``report.html`` into ``--out-dir``, and prints the scores x100.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from captioner.api import DEFAULT_MODEL_DIR, Captioner
from captioner.atomic import atomic_write_text
from captioner.caption_command import (
    add_decoder_precision_argument,
    add_decoding_arguments,
    add_device_argument,
    resolve_device,
)
from captioner.runtime import RUNTIME_CHOICES
from training.data import CaptionDataset, load_coco
from training.evaluation import (
    DEFAULT_METRICS,
    METRIC_KEYS,
    evaluate_model,
    format_metrics,
    load_results,
    match_results,
    score_captions,
    write_results,
)
from training.report import write_report

log = logging.getLogger(__name__)

EXAMPLES = """\
examples:
  captioner evaluate --annotations data/flickr8k/captions_test.json
  captioner evaluate --model runs/flickr8k/best --annotations data/flickr8k/captions_test.json --html
  captioner evaluate --results results.json --annotations data/coco/captions_val2017.json --out-dir eval/val2017
"""

# What the Java PTB tokenizer prints on stderr for every run: noise unless someone watches a terminal.
TOKENIZER_NOISE = ("PTBTokenizer tokenized",)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="caption a COCO-format split and score it (BLEU, METEOR, ...)",
        description="Caption every image of a COCO-format captions file with a model (default: the bundled one), "
                    "or take an existing COCO results file, and score the captions against the file's references "
                    "with pycocoevalcap (x100). Writes results.json, metrics.json and, with --html, report.html "
                    "into --out-dir. Progress and the Java tokenizer's messages go to stderr only when it is a "
                    "terminal (or with --progress).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, metavar="DIR",
                        help="model directory to caption the images with (default: the bundled model)")
    source.add_argument("--results", type=Path, metavar="FILE",
                        help="score this COCO results file instead of running a model (string image ids, as "
                             "`captioner caption --format coco` writes for non-numeric file names, match file stems)")
    parser.add_argument("--annotations", required=True, type=Path, metavar="FILE",
                        help="COCO captions file: the references")
    parser.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help="folder the file_name entries are relative to (default: the one `captioner prepare` "
                             "recorded in the file)")
    add_decoding_arguments(parser)  # --num-captions is ignored: the best caption is scored
    parser.add_argument("--batch-size", type=int, default=64, metavar="N",
                        help="images decoded together; larger is faster on a GPU, uses more memory (default: 64)")
    parser.add_argument("--workers", type=int, default=2, metavar="N",
                        help="image-loading processes (0: load in this one; default: 2)")
    add_device_argument(parser)
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS), choices=list(METRIC_KEYS),
                        metavar="METRIC", help=f"some of {', '.join(METRIC_KEYS)} (default: all)")
    parser.add_argument("--runtime", default="auto", choices=RUNTIME_CHOICES,
                        help="encoder runtime (default: auto, the fastest installed; torch is the reference)")
    add_decoder_precision_argument(parser)
    parser.add_argument("--python-tokenizer", action="store_true",
                        help="tokenise in Python instead of the official Java PTBTokenizer (with no Java, also "
                             "leave out meteor)")
    parser.add_argument("--out-dir", type=Path, default=None, metavar="DIR",
                        help="default: evaluation/<annotations file name>")
    parser.add_argument("--html", action="store_true", help="also write report.html with sample images")
    parser.add_argument("--sample-size", type=int, default=50, metavar="N",
                        help="images shown in report.html (default: 50)")
    parser.add_argument("--progress", action="store_true",
                        help="show the progress bar and the tokenizer's messages even when stderr is not a terminal")
    parser.set_defaults(run=run)


@contextlib.contextmanager
def quiet_native_stderr(quiet: bool) -> Iterator[None]:
    """While ``quiet``, collect what is written to file descriptor 2 (the Java tokenizer writes there directly) and
    pass on afterwards only the lines that are not :data:`TOKENIZER_NOISE` (warnings and errors stay)."""
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True):
                if not line.startswith(TOKENIZER_NOISE):
                    sys.stderr.write(line)
            sys.stderr.flush()


def _score_results(args: argparse.Namespace, dataset: CaptionDataset) -> tuple[dict[int, str], dict[str, float]]:
    predictions = match_results(load_results(args.results), dataset)
    if len(predictions) < len(dataset):
        log.warning("the results cover %d of the %d annotated images; scoring those only", len(predictions),
                    len(dataset))
    return predictions, score_captions(predictions, dataset.references(), args.metrics, not args.python_tokenizer)


def run(args: argparse.Namespace) -> int:
    out_dir: Path = args.out_dir or Path("evaluation") / args.annotations.stem
    progress = args.progress or sys.stderr.isatty()
    if not args.annotations.is_file():
        raise ValueError(f"--annotations {args.annotations}: no such file; `captioner prepare` writes one")
    dataset = load_coco(args.annotations, args.images)
    details: dict[str, object] = {"annotations": str(args.annotations.resolve())}
    with quiet_native_stderr(not progress):
        if args.results:
            predictions, metrics = _score_results(args, dataset)
            details["results"] = str(args.results.resolve())
        else:
            captioner = Captioner.load(args.model, device=resolve_device(args.device), runtime=args.runtime,
                                       decoder_precision=args.decoder_precision)
            options = captioner.options(
                strategy=args.strategy, beam_size=args.beam_size, max_length=args.max_length, num_captions=1,
                length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
            )
            predictions, metrics = evaluate_model(
                captioner, dataset, options, args.batch_size, metrics=args.metrics,
                java_tokenizer=not args.python_tokenizer, num_workers=args.workers, progress=progress,
            )
            details["results"] = str(write_results(predictions, out_dir / "results.json").resolve())
            model_dir = Path(args.model or DEFAULT_MODEL_DIR).resolve()
            details |= {"model": f"{captioner.name} {captioner.version} ({model_dir})",
                        "decoding": dataclasses.asdict(options)}
    details |= {"images_scored": len(predictions), "images_annotated": len(dataset)}
    atomic_write_text(out_dir / "metrics.json", json.dumps({"metrics": metrics, **details}, indent=2) + "\n")
    print(format_metrics(metrics))
    print(f"{len(predictions)} of {len(dataset)} images scored; wrote {out_dir / 'metrics.json'}")
    if args.html:
        page = write_report(out_dir / "report.html", predictions, dataset, metrics,
                            f"Evaluation on {args.annotations.name}", details, args.sample_size)
        print(f"wrote {page}")
    return 0
