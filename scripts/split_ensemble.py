"""Write each decoder of an ensemble model directory as a model directory of its own (OUT/member1, OUT/member2, ...).

A shipped ensemble keeps its members only inside it; to pair one of them with a new decoder (trained on the same
encoder, e.g. with ``--set encoder.from_model=captioner/models/default``), split it and join the parts again:

    .venv/bin/python scripts/split_ensemble.py captioner/models/default runs/v6-members
    .venv/bin/python scripts/ship_model.py runs/v6-members/member1 runs/new/best --out runs/pair

Each member keeps the ensemble's encoder, tags head, preprocessing, vocabulary and decoding defaults, and its own
name, version, training record and metrics (from the ensemble's ``training.members``). Exit 2 with one line when
the directory cannot be read or holds one decoder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captioner.checkpoint import CaptionModel, load_model, save_model  # noqa: E402
from captioner.ensemble import decoders_of  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402


def split(model: CaptionModel) -> list[CaptionModel]:
    """One single-decoder model per member of the ensemble ``model``, in order."""
    decoders, records = decoders_of(model.decoder), model.training.get("members", [])
    if len(decoders) < 2 or len(records) != len(decoders):
        raise CaptionerError(f"not an ensemble with a record per member ({len(decoders)} decoders, "
                             f"{len(records)} member records)")
    return [
        CaptionModel(model.encoder, decoder, model.vocab, model.preprocess, name=record["name"],
                     version=record["version"], decoding=dict(model.decoding), training=record["training"],
                     metrics=record["metrics"], tagger=model.tagger)
        for decoder, record in zip(decoders, records, strict=True)
    ]


def main(argv: list[str] | None = None) -> int:
    """Split the ensemble named in ``argv``; 0 when done, 2 (one line on stderr) when it cannot be split."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path, help="an ensemble model directory")
    parser.add_argument("out", type=Path, help="where member1, member2, ... are written")
    args = parser.parse_args(argv)
    try:
        members = split(load_model(args.model, allow_download=False))
    except (CaptionerError, OSError, KeyError) as exc:
        print(f"split_ensemble: cannot split {args.model}: {exc}", file=sys.stderr)
        return 2
    for number, member in enumerate(members, start=1):
        print(f"{save_model(member, args.out / f'member{number}')}: {member.name} {member.version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
