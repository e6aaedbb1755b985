"""The bundled model's golden captions: one file (tests/data/golden/golden.json), pinned in a test and the model card.

    .venv/bin/python scripts/golden_captions.py           # recompute golden.json, rewrite the model card's table
    .venv/bin/python scripts/golden_captions.py --check   # exit 1 if either differs from what the model gives now

The golden photos (``tests/data/golden/*.jpg``) are captioned by the bundled model with the decoding recorded in
its ``config.json`` (the shipped options), on the torch runtime (the reference). ``golden.json`` holds each photo's
best caption, its log-probability and ranking score, and its top-3 tags; ``tests/test_decoder_pinning.py`` checks
the model against it and checks that ``MODEL_CARD.md``'s table (between the ``golden`` markers) is
:func:`render_table` of it. Run this only when the model (or the decoding it ships with) changes on purpose, and
say why in the commit: a change of these values is a change of every door's output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "data" / "golden"
GOLDEN_FILE = GOLDEN_DIR / "golden.json"
MODEL_CARD = ROOT / "MODEL_CARD.md"
BEGIN, END = "<!-- golden captions: begin (scripts/golden_captions.py) -->", "<!-- golden captions: end -->"
NUM_TAGS = 3


def compute_golden() -> dict[str, dict]:
    """The bundled model's best caption, log_prob, score and top tags for every golden photo, by file name."""
    sys.path.insert(0, str(ROOT))
    from captioner.api import Captioner

    captioner = Captioner.load(allow_download=False, runtime="torch")
    photos = sorted(GOLDEN_DIR.glob("*.jpg"))
    golden = {}
    for photo, captions in zip(photos, captioner.caption(photos, num_tags=NUM_TAGS), strict=True):
        best = captions[0]
        golden[photo.name] = {
            "caption": best.text,
            "log_prob": round(best.log_prob, 4),
            "score": round(best.score, 4),
            "tags": [tag.to_json() for tag in captions.tags],
        }
    return golden


def load_golden(path: Path = GOLDEN_FILE) -> dict[str, dict]:
    """``golden.json``: photo file name -> {caption, log_prob, score, tags}."""
    return json.loads(path.read_text(encoding="utf-8"))


def render_table(golden: dict[str, dict]) -> str:
    """The model card's Markdown table of ``golden``, between its markers."""
    lines = [BEGIN, "| photo | caption (shipped decoding) | log_prob | score | top-3 tags |", "|---|---|---|---|---|"]
    for name, entry in golden.items():
        tags = ", ".join(f"{t['label']} {t['probability']:.2f}" for t in entry["tags"])
        lines.append(f"| `{name}` | {entry['caption']} | {entry['log_prob']:.3f} | {entry['score']:.3f} | {tags} |")
    lines.append(END)
    return "\n".join(lines)


def card_table(card: str) -> str:
    """The golden block of the model card's text (markers included); ValueError if the markers are missing."""
    start, end = card.find(BEGIN), card.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{MODEL_CARD.name} has no golden captions block ({BEGIN} ... {END})")
    return card[start : end + len(END)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on any difference")
    args = parser.parse_args()
    golden = compute_golden()
    card = MODEL_CARD.read_text(encoding="utf-8")
    if args.check:
        same = golden == load_golden() and card_table(card) == render_table(golden)
        print("golden captions and model card are up to date" if same else "golden captions differ: rerun without "
              "--check and commit tests/data/golden/golden.json and MODEL_CARD.md")
        return 0 if same else 1
    GOLDEN_FILE.write_text(json.dumps(golden, indent=1) + "\n", encoding="utf-8")
    MODEL_CARD.write_text(card.replace(card_table(card), render_table(golden)), encoding="utf-8")
    print(f"wrote {GOLDEN_FILE.relative_to(ROOT)} and the table in {MODEL_CARD.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
