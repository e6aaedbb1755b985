"""``captioner prepare {flickr8k,karpathy,coco}``: write COCO-format caption files, one per split.

Every file's ``file_name`` entries are relative to the image folder, whose absolute path is printed and recorded in
the file's ``info.image_dir`` (``load_coco`` uses it when no image folder is given). Images whose file is missing
or unreadable are left out unless ``--keep-missing-images``; blank captions and images without captions always are.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from training.data import CaptionDataset, load_coco, load_flickr8k, load_karpathy, read_json, write_coco

FLICKR8K_SPLITS = ("train", "dev", "test")
KARPATHY_OUTPUT_SPLITS = ("train", "val", "test")  # train includes restval unless --no-restval

EXAMPLES = """\
examples:
  captioner prepare flickr8k --root ../shared/data/flickr8k --out data/flickr8k
  captioner prepare karpathy --json dataset_coco.json --images path/to/coco --out data/coco-karpathy
  captioner prepare coco --annotations captions_val2017.json --images path/to/val2017 --out data/coco
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = subparsers.add_parser(
        "prepare", help="convert a captions dataset to COCO-format files, one per split",
        description="Write the COCO-format caption files that `captioner train` and `captioner evaluate` read, one "
                    "per split, from Flickr8k's files, Karpathy's split files or an official COCO captions file. "
                    "Each file records its image folder (info.image_dir), as given, so later commands need no "
                    "--images. Images whose file is missing or unreadable are left out and counted.",
        epilog=EXAMPLES, formatter_class=raw,
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")

    flickr = formats.add_parser(
        "flickr8k", help="Flickr8k.token.txt + split lists -> captions_{train,dev,test}.json",
        description="Flickr8k.token.txt and the split lists -> captions_{train,dev,test}.json.",
        epilog="example:\n  captioner prepare flickr8k --root ../shared/data/flickr8k --out data/flickr8k",
        formatter_class=raw,
    )
    flickr.add_argument("--root", required=True, type=Path, metavar="DIR",
                        help="folder with Flickr8k.token.txt, splits/{train,dev,test}.txt (or the original "
                             "Flickr_8k.*Images.txt) and images/ (or Flicker8k_Dataset/)")
    flickr.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help="image folder (default: found under --root)")
    flickr.set_defaults(run=run_flickr8k)

    karpathy = formats.add_parser(
        "karpathy", help="Karpathy's dataset_*.json -> captions_{train,val,test}.json",
        description="Karpathy's dataset_*.json -> captions_{train,val,test}.json (COCO's restval goes into train).",
        epilog="example:\n  captioner prepare karpathy --json dataset_coco.json --images path/to/coco "
               "--out data/coco-karpathy", formatter_class=raw,
    )
    karpathy.add_argument("--json", required=True, type=Path, metavar="FILE",
                          help="dataset_coco.json, dataset_flickr8k.json, ...")
    karpathy.add_argument("--images", required=True, type=Path, metavar="DIR",
                          help="folder that each entry's filepath/filename is relative to")
    karpathy.add_argument("--no-restval", action="store_true", help="leave COCO's restval images out of train")
    karpathy.set_defaults(run=run_karpathy)

    coco = formats.add_parser(
        "coco", help="a validated, cleaned copy of a COCO captions file",
        description="A validated, cleaned copy of an official COCO captions file.",
        epilog="example:\n  captioner prepare coco --annotations captions_val2017.json --images path/to/val2017 "
               "--out data/coco", formatter_class=raw,
    )
    coco.add_argument("--annotations", required=True, type=Path, metavar="FILE", help="the COCO captions file")
    coco.add_argument("--images", required=True, type=Path, metavar="DIR", help="its image folder")
    coco.add_argument("--split-name", default=None, metavar="NAME",
                      help="output is captions_NAME.json (default: the input name without 'captions_')")
    coco.set_defaults(run=run_coco)

    for sub in (flickr, karpathy, coco):
        sub.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
        sub.add_argument("--keep-missing-images", action="store_true",
                         help="keep images whose file is missing or unreadable (e.g. to score results without images)")


def _first_existing(*candidates: Path) -> Path:
    """The first candidate that exists, else the first (so the error names the expected path)."""
    return next((path for path in candidates if path.exists()), candidates[0])


def _write_splits(datasets: dict[str, CaptionDataset], out: Path, description: str) -> int:
    """Write ``out/captions_{split}.json`` for each non-empty split, print the counts; 1 if any split is empty."""
    status = 0
    image_dirs = set()
    for split, dataset in datasets.items():
        if not dataset.images:
            print(f"error: split {split!r} has no usable images; not written", file=sys.stderr)
            status = 1
            continue
        path = write_coco(dataset, out / f"captions_{split}.json", f"{description} ({split})")
        print(f"wrote {path}: {len(dataset)} images, {dataset.num_captions} captions")
        image_dirs.add(os.path.abspath(dataset.image_dir))  # as typed: a symlinked --root is not resolved
    for image_dir in sorted(image_dirs):
        print(f"images: {image_dir} (file_name entries are relative to it; recorded as info.image_dir)")
    return status


def run_flickr8k(args: argparse.Namespace) -> int:
    root: Path = args.root
    if not root.is_dir():
        raise ValueError(f"--root {root}: no such folder; give the folder that holds Flickr8k.token.txt")
    token_file = root / "Flickr8k.token.txt"
    image_dir = args.images or _first_existing(root / "images", root / "Flicker8k_Dataset")
    datasets = {}
    for split in FLICKR8K_SPLITS:
        split_file = _first_existing(root / "splits" / f"{split}.txt", root / f"Flickr_8k.{split}Images.txt")
        datasets[split] = load_flickr8k(token_file, split_file, image_dir,
                                        skip_missing_images=not args.keep_missing_images)
    return _write_splits(datasets, args.out, "Flickr8k")


def run_karpathy(args: argparse.Namespace) -> int:
    data = read_json(args.json)
    present = {entry.get("split") for entry in data.get("images", [])} if isinstance(data, dict) else set()
    datasets = {
        split: load_karpathy(data, args.images, split, include_restval=not args.no_restval,
                             skip_missing_images=not args.keep_missing_images)
        for split in KARPATHY_OUTPUT_SPLITS
        if split in present or (split == "train" and "restval" in present and not args.no_restval)
    }
    if not datasets:
        print(f"error: {args.json} has none of the splits {KARPATHY_OUTPUT_SPLITS}", file=sys.stderr)
        return 1
    return _write_splits(datasets, args.out, f"Karpathy split of {args.json.name}")


def run_coco(args: argparse.Namespace) -> int:
    split = args.split_name or args.annotations.stem.removeprefix("captions_")
    if (args.out / f"captions_{split}.json").resolve() == args.annotations.resolve():
        print("error: the cleaned copy would overwrite its input; choose another --out or --split-name",
              file=sys.stderr)
        return 1
    dataset = load_coco(args.annotations, args.images, skip_missing_images=not args.keep_missing_images)
    return _write_splits({split: dataset}, args.out, f"cleaned copy of {args.annotations.name}")
