"""Copy a trained model into the package as the bundled default model (float16 weights + SHA256SUMS).

    .venv/bin/python scripts/ship_model.py runs/flickr8k/best --version 2 \
        --set beam_size=5 --set length_penalty=1.0 --set no_repeat_ngram_size=3

``--set`` records default decoding options (chosen on the dev split) in the shipped config.json. The encoder's
weights are not copied: config.json references them by sha256.

Several trained models make an ensemble directory (:mod:`captioner.ensemble`): their decoders over the one encoder,
log-probabilities averaged at every step. They must share the encoder, the preprocessing and the vocabulary (train
them with the same data and encoder settings, e.g. other seeds); the first model gives the name and defaults:

    .venv/bin/python scripts/ship_model.py runs/a/best runs/b/best runs/c/best --version 4 --set beam_size=5

An ensemble has no training run of its own, so no test scores of its own (each member's stay under
``training.members``). ``--metrics SPLIT=FILE`` records a ``captioner evaluate`` of the same models with the shipped
decoding (its ``metrics.json``) as the shipped ``metrics.final.SPLIT``, as training records a single model's:

    .venv/bin/python scripts/ship_model.py runs/a/best runs/b/best --version 4 --out runs/ab
    captioner evaluate --model runs/ab --annotations data/flickr8k/captions_test.json --out-dir eval/ab-test
    .venv/bin/python scripts/ship_model.py runs/a/best runs/b/best --version 4 --metrics test=eval/ab-test/metrics.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.api import DEFAULT_MODEL_DIR  # noqa: E402
from captioner.checkpoint import ensemble_of, load_model, save_model  # noqa: E402
from captioner.decoding import DecodingOptions  # noqa: E402
from captioner.ensemble import decoders_of  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402

MANIFEST = "SHA256SUMS"


def write_manifest(model_dir: Path) -> None:
    """``sha256  name`` lines for every file of the model directory (tests check the shipped files against it)."""
    lines = []
    for file in sorted(p for p in model_dir.iterdir() if p.name != MANIFEST):
        lines.append(f"{hashlib.sha256(file.read_bytes()).hexdigest()}  {file.name}")
    (model_dir / MANIFEST).write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Ship the model(s) named in ``argv``; 0 when done, 2 (with one line on stderr) when they cannot be shipped."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", type=Path, nargs="+", metavar="model",
                        help="trained model directory (e.g. runs/flickr8k/best); several make an ensemble")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", help="default decoding option")
    parser.add_argument("--version", default=None, help="version to record (default: the (first) trained model's)")
    parser.add_argument("--metrics", action="append", default=[], metavar="SPLIT=FILE",
                        help="record a `captioner evaluate` metrics.json of these models as metrics.final.SPLIT")
    args = parser.parse_args(argv)

    try:
        models = [load_model(path, allow_download=False) for path in args.models]
        # an ensemble records where each member came from, beside its name, version and metrics
        model = models[0] if len(models) == 1 else ensemble_of(models, sources=[str(p) for p in args.models])
        if args.version:
            model.version = args.version
        for item in args.set:
            key, _, value = item.partition("=")
            model.decoding[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
        shipped = DecodingOptions(**model.decoding)  # validate before writing anything
        for item in args.metrics:
            split, metrics = read_metrics(item, shipped)
            model.metrics.setdefault("final", {})[split] = metrics
    except (CaptionerError, TypeError, ValueError) as exc:
        print(f"ship_model: cannot ship {' '.join(map(str, args.models))}: {exc}", file=sys.stderr)
        return 2
    save_model(model, args.out, half_precision=True)
    write_manifest(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    decoders = len(decoders_of(model.decoder))  # a member that is itself an ensemble brings each of its decoders
    members = f" ({decoders} decoders)" if decoders > 1 else ""
    print(f"shipped {' '.join(map(str, args.models))} -> {args.out}{members} ({size / 1e6:.1f} MB), "
          f"decoding defaults {model.decoding}")
    return 0


def read_metrics(item: str, shipped: DecodingOptions) -> tuple[str, dict[str, float]]:
    """``SPLIT=FILE`` -> (split, the metrics of that ``metrics.json``); ValueError unless it scored ``shipped``."""
    split, _, file = item.partition("=")
    if not split or not file:
        raise ValueError(f"--metrics takes SPLIT=FILE (e.g. test=eval/test/metrics.json), got {item!r}")
    try:
        record = json.loads(Path(file).read_text())
        metrics, decoding = record["metrics"], DecodingOptions(**record["decoding"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file} is not a metrics.json of captioner evaluate ({exc})") from None
    if decoding != shipped:
        raise ValueError(f"{file} scored the decoding {decoding.to_json()}, not the shipped {shipped.to_json()}")
    return split, metrics


if __name__ == "__main__":
    sys.exit(main())
