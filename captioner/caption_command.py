"""``captioner caption PATH...``: caption files, folders and globs into JSON lines, CSV or a COCO results file.

A thin shell around :mod:`captioner.batch`: it parses the flags, finds the images, picks the shard, reads what a
previous run already wrote (``--resume``), loads the model, and shows progress and a closing summary on stderr.

Exit status: 0 when every image has a caption, 1 when the output has an error record for any image (this run's or,
with ``--resume``, an earlier run's), 2 for a usage or setup error (bad flags, model or output file unusable), 130
when interrupted.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from captioner.api import Captioner
from captioner.batch import (
    FORMATS,
    BatchStats,
    Completed,
    Record,
    RecordWriter,
    Shard,
    default_workers,
    discover_images,
    infer_format,
    open_writer,
    path_exists,
    rank_output_path,
    read_completed,
    run_batch,
)
from captioner.decoding import OPTION_SPECS, DecodingOptions, OptionSpec, parse_option
from captioner.distributed import Launch
from captioner.errors import CaptionerError
from captioner.fast_decoder import DECODER_PRECISION_HELP, DECODER_PRECISIONS
from captioner.runtime import RUNTIME_CHOICES
from captioner.tags import DEFAULT_NUM_TAGS

EXIT_FAILED_IMAGES = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

EXAMPLES = """\
examples:
  captioner caption captioner/samples/*.jpg
  captioner caption photos/ -r --out captions.jsonl --resume
  captioner caption "photos/**/*.png" -r --num-captions 3 --out captions.csv
  captioner caption s3://bucket/photos/ -r --engine ray --ray-address auto --out captions.jsonl --resume
"""


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """Decoding flags shared by every command that writes captions: names, ranges and help from the library's
    ``OPTION_SPECS``, values read by its ``parse_option`` (the HTTP parameters' parser)."""
    # None means "the model's recorded default" (config.json "decoding"), as at every door.
    for spec in OPTION_SPECS:
        parser.add_argument(
            spec.flag, type=_option_parser(spec), default=None, choices=spec.choices or None,
            metavar=None if spec.choices else ("N" if spec.kind is int else "X"),
            help=f"{spec.help}; {spec.describe_range()} (default: the model's recorded value)",
        )


def _option_parser(spec: OptionSpec) -> Callable[[str], object]:
    def parse(text: str) -> object:
        try:
            return parse_option(spec.name, text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = spec.name  # argparse names the type in some messages
    return parse


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    """``--device``, the same in every command: ``auto`` uses the GPU when there is one, so nobody has to ask."""
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="auto (cuda when available, else cpu), cpu, cuda or cuda:N (default: auto)")


def add_decoder_precision_argument(parser: argparse.ArgumentParser, default: str | None = "float32") -> None:
    """``--decoder-precision``, the same in every command that captions (``default`` None: the service's setting)."""
    shown = "float32" if default else "$CAPTIONER_DECODER_PRECISION, else float32"
    parser.add_argument("--decoder-precision", default=default, choices=DECODER_PRECISIONS,
                        help=f"{DECODER_PRECISION_HELP} (default: {shown})")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _shard(text: str) -> Shard:
    try:
        return Shard.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``caption`` sub-command."""
    parser = subparsers.add_parser(
        "caption", help="caption images: files, folders or globs -> JSON lines, CSV or a COCO results file",
        description="Caption image files, folders and globs with a streaming, resumable batch engine. Captions go "
                    "to stdout or --out (one record per image, in sorted path order, failed images included with "
                    "an 'error' field); progress, failed images and a summary go to stderr. Exit status: 0 all "
                    "captioned, 1 some images failed, 2 usage or setup error, 130 interrupted.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="an image file, a folder or a glob (quote it)")
    parser.add_argument("-r", "--recursive", action="store_true", help="descend into sub-folders (and ** in globs)")
    parser.add_argument("--from-list", action="append", default=[], metavar="FILE",
                        help="read PATHs from FILE, one a line ('-' for stdin); may be repeated")
    parser.add_argument("-o", "--out", default=None, metavar="FILE", help="output file (default: stdout)")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="default: from --out's extension (.csv: csv, .json: coco, else jsonl)")
    parser.add_argument("--model", default=None, metavar="DIR", help="model directory (default: the bundled model)")
    add_decoding_arguments(parser)
    parser.add_argument("--tags", type=_non_negative_int, default=DEFAULT_NUM_TAGS, metavar="K",
                        help=f"top ImageNet tags per image (default {DEFAULT_NUM_TAGS}; 0: none; for models with tags)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                        help="images decoded together; larger is faster on a GPU, uses more memory (default: 32)")
    parser.add_argument("--workers", type=_non_negative_int, default=None, metavar="N",
                        help="image-loading processes (default: min(4, CPU cores); 0: load in the main process); "
                             "--engine ray: most preprocessing tasks at once (default: as free CPUs allow)")
    add_device_argument(parser)
    parser.add_argument("--runtime", default="auto", choices=RUNTIME_CHOICES,
                        help="encoder runtime (default: auto, the fastest installed; torch is the reference)")
    add_decoder_precision_argument(parser)
    parser.add_argument("--resume", action="store_true",
                        help="skip images already in --out (jsonl/csv) and append the rest")
    parser.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                        help="caption only share I of N (0 <= I < N); default under torchrun: RANK/WORLD_SIZE")
    engine = parser.add_argument_group("engines", "where the work runs: this process and its DataLoader workers "
                                       "(local), or a Ray cluster (ray: pip install 'captioner[ray]')")
    engine.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local (default) or ray: Ray Data tasks read the images, model actors caption them")
    engine.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="Ray cluster to join (auto, HOST:PORT, ray://HOST:10001; default: start a local one)")
    engine.add_argument("--actors", type=_positive_int, default=None, metavar="N",
                        help="model actors (default: one per GPU, else one per CPU less one)")
    engine.add_argument("--actor-batch-size", type=_positive_int, default=None, metavar="B",
                        help="images per actor call (default: --batch-size)")
    engine.add_argument("--actor-cpus", type=_positive_float, default=1.0, metavar="C",
                        help="CPUs each actor reserves, and its threads on a CPU (default: 1)")
    parser.add_argument("--endpoint-url", default=None, metavar="URL",
                        help="S3-compatible server for s3:// inputs (default: $AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar; a summary only when images failed")
    parser.add_argument("--progress", action="store_true",
                        help="show the progress bar even when stderr is not a terminal (default: only on one)")
    parser.set_defaults(run=run)


def _error(message: object) -> int:
    print(f"captioner caption: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def resolve_device(name: str, env: dict[str, str] | None = None) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; ``auto`` is ``cuda`` when available, else ``cpu``; plain ``cuda``
    under torchrun means this process' ``cuda:LOCAL_RANK``."""
    env = dict(os.environ) if env is None else env
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device must be cpu, cuda or cuda:N (or auto), got {name!r}") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N (or auto), got {name!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but CUDA is not available; use --device cpu (or auto)")
        if device.index is None and "LOCAL_RANK" in env:
            device = torch.device("cuda", Launch.from_env(env).local_rank)
    return device


def run(args: argparse.Namespace) -> int:
    """Run the command; returns the exit status."""
    if not args.paths and not args.from_list:
        return _error("give at least one PATH or --from-list FILE")
    out = Path(args.out) if args.out else None
    shard = args.shard
    if shard is None:
        try:
            shard = Shard.from_env()
        except ValueError as exc:
            return _error(f"bad RANK/WORLD_SIZE: {exc}")
        if shard is not None:  # a torchrun rank: its share, into its own file
            if out is None:
                return _error(f"running as rank {shard.index} of {shard.count}: pass --out (each rank writes "
                              "OUT.rankR)")
            out = rank_output_path(out, shard.index)
    fmt = args.format or infer_format(out)
    if args.resume and out is None:
        return _error("--resume needs --out")
    ray = args.engine == "ray"
    if not ray and (args.ray_address or args.actors or args.actor_batch_size):
        return _error("--ray-address, --actors and --actor-batch-size need --engine ray")
    if ray and importlib.util.find_spec("ray") is None:
        return _error("--engine ray needs Ray: pip install 'captioner[ray]'")
    if args.endpoint_url:  # botocore (s3fs) reads it, here, in DataLoader workers and in Ray's workers
        os.environ["AWS_ENDPOINT_URL"] = args.endpoint_url
    try:
        # The Ray engine's actors take the cluster's GPUs (or not: --device cpu); this process only reads the model's
        # settings, on its CPU.
        if ray and args.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--engine ray takes --device auto, cpu or cuda, got {args.device!r}")
        device = resolve_device("cpu" if ray else args.device)
        paths = discover_images(args.paths, args.recursive, args.from_list)
        problem = _input_problem(paths)
        if problem:  # before the model loads: a typo should not cost seconds
            return _error(problem)
        total = len(paths)
        if shard is not None:
            paths = shard.select(paths)
        captioner = Captioner.load(args.model, device=device, runtime="torch" if ray else args.runtime,
                                   decoder_precision=args.decoder_precision)
        num_tags = args.tags if captioner.has_tags else 0
        completed = read_completed(out, fmt, args.num_captions or 1, num_tags > 0) if args.resume else Completed()
        todo = completed.remaining(paths)
        options = captioner.options(
            strategy=args.strategy, beam_size=args.beam_size, max_length=args.max_length,
            num_captions=args.num_captions, length_penalty=args.length_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
        )
        writer = open_writer(fmt, out, options.num_captions, append=args.resume, tags=num_tags > 0)
    except (CaptionerError, ValueError, OSError) as exc:
        return _error(exc)
    if completed.repaired_bytes and not args.quiet:
        print(f"removed a cut-off last line ({completed.repaired_bytes} bytes) from {out}", file=sys.stderr)

    workers = default_workers() if args.workers is None else args.workers
    # Progress goes to stderr, and only to a terminal that is not also receiving the captions.
    show = not args.quiet and (args.progress or (sys.stderr.isatty() and not (out is None and sys.stdout.isatty())))
    progress = tqdm(total=len(todo), unit=" images", file=sys.stderr, disable=not show, dynamic_ncols=True)
    ticker = Ticker(progress) if show else None

    def on_batch(records: list[Record]) -> None:
        progress.update(len(records))
        for record in records:  # every format: the failed images, by name, as they happen
            if "error" in record:
                progress.write(f"failed: {record['image']}: {record['error']}", file=sys.stderr)

    start = time.perf_counter()
    try:
        if ray:
            stats = _run_on_ray(args, captioner, todo, options, writer, on_batch, num_tags)
        else:
            stats = run_batch(captioner, todo, options, writer, args.batch_size, workers, on_batch, num_tags)
        writer.close()
    except KeyboardInterrupt:
        writer.abort()
        progress.close()
        hint = f"; rerun with --resume to continue {out}" if out is not None and fmt != "coco" else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except RayEngineError as exc:
        writer.abort()
        return _error(exc)
    except BaseException:
        writer.abort()
        raise
    finally:
        if ticker is not None:
            ticker.stop()
        progress.close()
    seconds = time.perf_counter() - start
    failed = stats.failed + completed.failed
    if failed or not args.quiet:
        print(_summary(stats, completed, total, len(paths), shard, seconds, out, fmt), file=sys.stderr)
    return EXIT_FAILED_IMAGES if failed else 0


class RayEngineError(CaptionerError):
    """Ray could not be started or joined, or the cluster cannot run the job."""


def _run_on_ray(
    args: argparse.Namespace, captioner: Captioner, todo: list[str], options: DecodingOptions,
    writer: RecordWriter, on_batch: Callable[[list[Record]], None], num_tags: int,
) -> BatchStats:
    """``--engine ray``: the same records through :mod:`captioner.batch.ray_engine`; Ray stops (or the cluster is
    left) when the run ends, however it ends."""
    from captioner.batch import ray_engine

    settings = ray_engine.RaySettings(
        address=args.ray_address, actors=args.actors, batch_size=args.actor_batch_size or args.batch_size,
        actor_cpus=args.actor_cpus, readers=args.workers or None, device=args.device,
        model=str(Path(args.model).resolve()) if args.model else None,  # actors may run in another directory
        runtime=args.runtime, decoder_precision=args.decoder_precision, num_tags=num_tags,
    )
    try:
        try:
            ray_engine.start_ray(settings)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RayEngineError(f"cannot start or join Ray ({args.ray_address or 'local'}): {exc}") from exc
        try:
            return ray_engine.run_ray_batch(todo, options, writer, settings, captioner.preprocess_config, on_batch)
        except ValueError as exc:  # e.g. --device cuda on a cluster without GPUs
            raise RayEngineError(str(exc)) from exc
    finally:
        ray_engine.stop_ray()


def _input_problem(paths: list[str]) -> str | None:
    """Why there is nothing to caption (checked before the model loads), or None."""
    if not paths:
        return "the PATHs and lists name no image files (folders are scanned for image extensions; add -r for " \
               "sub-folders)"
    if not any(path_exists(path) for path in paths):
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        return f"no such file: {shown}; check the path (quote globs so that the shell leaves them to captioner)"
    return None


class Ticker:
    """Redraws a progress bar every ``interval`` seconds from a daemon thread while a batch is decoding, so that its
    elapsed time and rate keep moving between the per-batch updates of the image count."""

    def __init__(self, progress: tqdm, interval: float = 1.0) -> None:
        self.progress = progress
        self.interval = interval
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-ticker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.progress.refresh()
            self.ticks += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _summary(
    stats: BatchStats, completed: Completed, total: int, selected: int, shard: Shard | None, seconds: float,
    out: Path | None, fmt: str,
) -> str:
    """The closing line, e.g. ``captioned 98 images, 2 failed in 4.1s (24.4 images/s)``."""
    done = stats.succeeded + stats.failed
    text = f"captioned {stats.succeeded} images, {stats.failed} failed in {seconds:.1f}s"
    if done and seconds > 0:
        text += f" ({done / seconds:.1f} images/s)"
    if shard is not None:
        text += f"; shard {shard.index}/{shard.count} has {selected} of {total} images"
    skipped = selected - done
    if completed.images:
        text += f"; {skipped} already in {out}"
        if completed.failed:
            text += f" ({completed.failed} of them failed earlier)"
    if stats.failed and fmt != "coco":
        text += "; failed images have an 'error' field in the output"
    return text
