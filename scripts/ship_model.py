"""Copy a trained model into the package as the bundled default model (float16 weights + SHA256SUMS).

    .venv/bin/python scripts/ship_model.py runs/flickr8k/best --version 2 \
        --set beam_size=5 --set length_penalty=1.0 --set no_repeat_ngram_size=3

``--set`` records default decoding options (chosen on the dev split) in the shipped config.json. The encoder's
weights are not copied: config.json references them by sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.api import DEFAULT_MODEL_DIR  # noqa: E402
from captioner.checkpoint import load_model, save_model  # noqa: E402
from captioner.decoding import DecodingOptions  # noqa: E402

MANIFEST = "SHA256SUMS"


def write_manifest(model_dir: Path) -> None:
    """``sha256  name`` lines for every file of the model directory (tests check the shipped files against it)."""
    lines = []
    for file in sorted(p for p in model_dir.iterdir() if p.name != MANIFEST):
        lines.append(f"{hashlib.sha256(file.read_bytes()).hexdigest()}  {file.name}")
    (model_dir / MANIFEST).write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="trained model directory (e.g. runs/flickr8k/best)")
    parser.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    parser.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE", help="default decoding option")
    parser.add_argument("--version", default=None, help="version to record (default: the trained model's)")
    args = parser.parse_args()

    model = load_model(args.model, allow_download=False)
    if args.version:
        model.version = args.version
    for item in args.set:
        key, _, value = item.partition("=")
        model.decoding[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    DecodingOptions(**model.decoding)  # validate before writing anything
    save_model(model, args.out, half_precision=True)
    write_manifest(args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"shipped {args.model} -> {args.out} ({size / 1e6:.1f} MB), decoding defaults {model.decoding}")


if __name__ == "__main__":
    main()
