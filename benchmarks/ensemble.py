"""What an ensemble of decoders costs at inference: one decoder alone versus duplicated 2 and 3 times.

An ensemble's encoder runs once; its decoder runs once per member at every step (captioner/ensemble.py). This
script loads a model (the bundled one by default), builds ensembles of ``--members`` copies of its decoder (of its
first decoder when the model is itself an ensemble, as the bundled v5 is; copies give the same captions as the
decoder alone, so the searches do the same work and only the member count differs), and times, for each, side by
side in one run (the variants interleaved in every repeat; the fastest of the repeats is reported, since other
processes on the machine only ever add time):

  end to end   ``Captioner.caption`` on the photo files: read, preprocess, encode, decode;
  model        ``Captioner.caption_tensors`` on preprocessed images: encode + decode;
  decode only  ``decode()`` on the encoder grids.

It prints images/s of each and the ratio of each ensemble's time to the single decoder's, with the model's own
decoding defaults; then the same ratios on the CPU time the process used (all its threads), which other processes
on a busy machine disturb far less than wall time (with ``--threads 1`` no thread spins waiting for another).
Photos: the first ``--images`` Flickr8k photos when ``../shared`` is present, else the sample photos, repeated.

    .venv/bin/python benchmarks/ensemble.py
    .venv/bin/python benchmarks/ensemble.py --images 16 --repeats 7 --threads 1

With ``--candidate DIR`` it compares two real models instead (``--model`` the reference, each with its own decoding
defaults), end to end and encode + decode, interleaved the same way; e.g. the bundled v5 against v3 (the bundled
model before commit "Default model v4", taken from git):

    git worktree add /tmp/v3 bf48aa4
    .venv/bin/python benchmarks/ensemble.py --model /tmp/v3/captioner/models/default \
        --candidate captioner/models/default --images 64 --repeats 7

Several ``--candidate`` directories are timed as one model over several encoders would run (a #15 lever; a model
directory holds one encoder today): each photo read once, each model's preprocessing and encoder, one search of
all their decoders, each on its own encoder's grid; e.g. decoders on Lite0 and on Lite1 against v3:

    .venv/bin/python benchmarks/ensemble.py --model /tmp/v3/captioner/models/default \
        --candidate runs/v5-ss25/best runs/v6-lite1/best --images 64 --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.api import Captioner  # noqa: E402
from captioner.decoding import DecodingOptions, decode  # noqa: E402
from captioner.ensemble import DecoderEnsemble, decoders_of  # noqa: E402
from captioner.model import CaptionDecoder  # noqa: E402
from captioner.preprocess import read_image, to_tensor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k" / "images"
SAMPLES = ROOT / "captioner" / "samples"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory (default: the bundled model)")
    parser.add_argument("--members", type=int, nargs="+", default=[2, 3], help="ensemble sizes to compare with 1")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each (the fastest is reported)")
    parser.add_argument("--runtime", default="auto", help="encoder runtime (default: auto, as the doors use)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--candidate", nargs="+", default=None,
                        help="a model directory to time against --model instead; several: their decoders together, "
                             "each on its model's encoder (one model over several encoders)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.candidate:
        compare_models(args)
        return

    captioner = Captioner.load(args.model, runtime=args.runtime, allow_download=False)
    bundled = captioner.model.decoder
    # An ensemble model (the bundled v5 is one) is timed through its first member: copies of one decoder.
    single = decoders_of(bundled)[0]
    variants = {1: single} | {n: DecoderEnsemble([copy.deepcopy(single) for _ in range(n)]) for n in args.members}
    photos = _photos(args.images)
    options = captioner.options()
    batch = torch.stack([captioner.load_tensor(p) for p in photos])
    with torch.inference_mode():
        grids = captioner.encode(batch).float()

    def run(decoder: CaptionDecoder | DecoderEnsemble, what: str) -> object:
        captioner.model.decoder = decoder
        if what == "end to end":
            return [c[0].text for c in captioner.caption(photos)]
        if what == "model":
            return [c[0].text for c in captioner.caption_tensors(batch, options)]
        return [h[0].tokens for h in decode(decoder, grids, captioner.vocab, options)]

    kinds = ("end to end", "model", "decode only")
    times: dict[tuple[str, int], list[float]] = {(k, n): [] for k in kinds for n in variants}
    cpu_times: dict[tuple[str, int], list[float]] = {(k, n): [] for k in kinds for n in variants}
    results: dict[tuple[str, int], object] = {}
    for kind in kinds:
        for n, decoder in variants.items():
            results[kind, n] = run(decoder, kind)  # warm-up (fast-path tables, runtime caches)
        for _ in range(args.repeats):
            for n, decoder in variants.items():  # interleaved, so load changes hit every variant alike
                start, cpu_start = time.perf_counter(), time.process_time()
                run(decoder, kind)
                times[kind, n].append(time.perf_counter() - start)
                cpu_times[kind, n].append(time.process_time() - cpu_start)
    captioner.model.decoder = bundled

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{captioner.name} v{captioner.version}: {args.images} {'Flickr8k' if FLICKR.is_dir() else 'sample'} "
          f"photos, options {options.to_json()}, encoder runtime {type(captioner.encode).__name__}, torch threads "
          f"{torch.get_num_threads()}, load average {load:.2f}; fastest of {args.repeats}")
    same = all(results[k, n] == results[k, 1] for k in kinds for n in args.members)
    print(f"  ensembles of copies give the single decoder's captions: {same}")
    def show(title: str, table: dict, cell: Callable[[float], str]) -> None:
        """One line per kind: each variant's fastest repeat through ``cell``, and its ratio to the single decoder."""
        print(f"  {title}:")
        for kind in kinds:
            base = min(table[kind, 1])
            cells = []
            for n in variants:
                seconds = min(table[kind, n])
                ratio = "" if n == 1 else f", {seconds / base:.2f}x the time"
                cells.append(f"{n} decoder{'s' if n > 1 else ''} {cell(seconds)}{ratio}")
            print(f"    {kind:<12}: " + " | ".join(cells))

    show("wall time", times, lambda seconds: f"{args.images / seconds:6.1f} img/s")
    show("CPU time of the process", cpu_times, lambda seconds: f"{1000 * seconds / args.images:6.1f} ms/img")

def compare_models(args: argparse.Namespace) -> None:
    """Time ``args.model`` (the reference) and ``args.candidate`` side by side on the same photos; several candidate
    directories are timed as one model over several encoders (:class:`SeveralEncoders`)."""
    load = functools.partial(Captioner.load, runtime=args.runtime, allow_download=False)
    candidates = [load(path) for path in args.candidate]
    models: dict[str, Captioner | SeveralEncoders] = {
        "reference": load(args.model),
        "candidate": candidates[0] if len(candidates) == 1 else SeveralEncoders(candidates),
    }
    photos = _photos(args.images)
    inputs = {name: model.load_tensors(photos) if isinstance(model, SeveralEncoders) else
              torch.stack([model.load_tensor(p) for p in photos]) for name, model in models.items()}
    kinds = ("end to end", "model")

    def run(name: str, kind: str) -> None:
        model = models[name]
        if kind == "end to end":
            model.caption(photos)
        else:
            model.caption_tensors(inputs[name], model.options())

    times: dict[tuple[str, str], list[float]] = {(k, n): [] for k in kinds for n in models}
    cpu_times: dict[tuple[str, str], list[float]] = {(k, n): [] for k in kinds for n in models}
    for kind in kinds:
        for name in models:
            run(name, kind)  # warm-up
        for _ in range(args.repeats):
            for name in models:  # interleaved
                start, cpu_start = time.perf_counter(), time.process_time()
                run(name, kind)
                times[kind, name].append(time.perf_counter() - start)
                cpu_times[kind, name].append(time.process_time() - cpu_start)
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    for name, model in models.items():
        for captioner in getattr(model, "captioners", [model]):
            members = decoders_of(captioner.model.decoder)
            print(f"{name}: {captioner.name} v{captioner.version}, {len(members)} decoder(s) on "
                  f"{captioner.model.encoder.name} at {captioner.preprocess_config.size} px, options "
                  f"{model.options().to_json()}, encoder runtime {type(captioner.encode).__name__}")
    print(f"{args.images} photos, torch threads {torch.get_num_threads()}, load average {load_average:.2f}; "
          f"fastest of {args.repeats}")
    for kind in kinds:
        ref, cand = min(times[kind, "reference"]), min(times[kind, "candidate"])
        ref_cpu, cand_cpu = min(cpu_times[kind, "reference"]), min(cpu_times[kind, "candidate"])
        print(f"  {kind:<10}: reference {args.images / ref:6.1f} img/s, candidate {args.images / cand:6.1f} img/s "
              f"({cand / ref:.2f}x the time); CPU {1000 * ref_cpu / args.images:.1f} vs "
              f"{1000 * cand_cpu / args.images:.1f} ms/img ({cand_cpu / ref_cpu:.2f}x)")


class SeveralEncoders:
    """Models on different encoders (sharing a vocabulary) run as one model holding them all would: each photo read
    once (a JPEG decoded at the largest input size any of them needs), then each model's preprocessing and encoder,
    then one search of all their decoders together, each member on its own encoder's grid
    (:func:`~captioner.decoding.decode` with one grid per member; the first model's decoding options)."""

    def __init__(self, captioners: list[Captioner]) -> None:
        if any(c.vocab.words != captioners[0].vocab.words for c in captioners[1:]):
            sys.exit("error: the candidate models' vocabularies differ; ensemble members must share one")
        self.captioners = captioners
        members = [(i, d) for i, c in enumerate(captioners) for d in decoders_of(c.model.decoder)]
        self.member_model = [i for i, _ in members]  # which model's grid each decoder reads
        self.decoders = DecoderEnsemble([d for _, d in members]).eval()
        self.largest = max((c.preprocess_config for c in captioners), key=lambda config: config.size)

    def options(self) -> DecodingOptions:
        return self.captioners[0].options()

    def load_tensors(self, photos: list[Path]) -> list[torch.Tensor]:
        """Each model's input batch of the photos, every photo read once, and resized once per distinct
        preprocessing (encoders at one input size and normalisation share their input)."""
        images = [read_image(photo, self.largest).image for photo in photos]
        batches = {config: torch.stack([to_tensor(image, config) for image in images])
                   for config in dict.fromkeys(c.preprocess_config for c in self.captioners)}
        return [batches[c.preprocess_config] for c in self.captioners]

    def caption_tensors(self, batches: list[torch.Tensor], options: DecodingOptions) -> list[str]:
        with torch.inference_mode():
            grids = [c.encode(batch).float() for c, batch in zip(self.captioners, batches, strict=True)]
            found = decode(self.decoders, [grids[i] for i in self.member_model], self.captioners[0].vocab, options)
        return [self.captioners[0].vocab.decode(hyps[0].tokens) for hyps in found]

    def caption(self, photos: list[Path]) -> list[str]:
        return self.caption_tensors(self.load_tensors(photos), self.options())


def _photos(count: int) -> list[Path]:
    """``count`` photo files: the first Flickr8k photos when ``../shared`` is present, else the samples, repeated."""
    photos = sorted(FLICKR.glob("*.jpg"))[:count] if FLICKR.is_dir() else []
    photos = photos or sorted(SAMPLES.glob("*.jpg"))
    return [photos[i % len(photos)] for i in range(count)]


if __name__ == "__main__":
    main()
