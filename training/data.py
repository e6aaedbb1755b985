"""Caption datasets. Training and evaluation read COCO-format caption annotation files (through pycocotools).

``captioner prepare`` converts the other formats (Karpathy's split JSON, Flickr8k's token file) into COCO-format
files, one per split, with :func:`load_karpathy` / :func:`load_flickr8k` and :func:`write_coco`, so training and
evaluation only ever read one format.

No loader fails on bad entries: blank captions, images without captions and image files that are missing or
unreadable are counted in ``dataset.report`` and logged as one warning. Image files are checked cheaply (the path
is a readable, non-empty regular file); they are not decoded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from pycocotools.coco import COCO

from captioner.atomic import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    """One image and its reference captions."""

    image_id: int
    path: Path
    captions: list[str] = field(default_factory=list)
    width: int | None = None
    height: int | None = None


@dataclass
class LoadReport:
    """What a loader dropped or found wrong in its source; nothing here stops loading."""

    source: str
    images: int = 0  # images in the returned dataset
    captions: int = 0  # captions in the returned dataset
    empty_captions: int = 0  # blank captions, dropped
    orphan_captions: int = 0  # captions of an image the source does not list, dropped
    malformed_lines: int = 0  # Flickr8k token-file lines that are not ``name#k<TAB>caption``, dropped
    uncaptioned_images: list[int] = field(default_factory=list)  # ids of images left without captions, dropped
    missing_images: list[int] = field(default_factory=list)  # ids whose image file does not exist
    unreadable_images: list[int] = field(default_factory=list)  # ids whose file is empty, not a file or unreadable
    skipped_images: int = 0  # missing or unreadable images dropped (``skip_missing_images=True``)

    @property
    def problems(self) -> int:
        """Number of problems found (0: the source is clean)."""
        return (self.empty_captions + self.orphan_captions + self.malformed_lines + len(self.uncaptioned_images)
                + len(self.missing_images) + len(self.unreadable_images))

    def summary(self) -> str:
        """One line: the counts, then each kind of problem that occurred."""
        parts = [f"{self.images} images, {self.captions} captions"]
        for label, count in (
            ("blank captions dropped", self.empty_captions),
            ("captions of unlisted images dropped", self.orphan_captions),
            ("malformed lines dropped", self.malformed_lines),
            ("images without captions dropped", len(self.uncaptioned_images)),
            ("image files missing", len(self.missing_images)),
            ("image files unreadable", len(self.unreadable_images)),
            ("images skipped for missing/unreadable files", self.skipped_images),
        ):
            if count:
                parts.append(f"{count} {label}")
        return f"{self.source}: " + ", ".join(parts)


@dataclass
class CaptionDataset:
    """The images of one split.

    ``annotation_file`` is the COCO file it came from (the evaluation ground truth), ``image_dir`` the folder image
    paths are relative to, ``report`` what the loader dropped or found missing.
    """

    images: list[ImageRecord]
    annotation_file: Path | None = None
    image_dir: Path | None = None
    report: LoadReport | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return sum(len(record.captions) for record in self.images)

    def references(self) -> dict[int, list[str]]:
        """Reference captions by image id, as the metrics take them."""
        return {record.image_id: list(record.captions) for record in self.images}


def first_images(dataset: CaptionDataset, max_images: int = 0) -> CaptionDataset:
    """The dataset cut to its first ``max_images`` images (file order), for quick trial runs; 0 keeps them all."""
    if max_images <= 0 or len(dataset) <= max_images:
        return dataset
    return dataclasses.replace(dataset, images=dataset.images[:max_images])


def image_file_problem(path: Path) -> str | None:
    """``"missing"``, ``"unreadable"`` (empty, not a regular file, no read permission) or None for a usable file."""
    try:
        info = path.stat()
    except OSError:
        return "missing"
    if not stat.S_ISREG(info.st_mode) or info.st_size == 0 or not os.access(path, os.R_OK):
        return "unreadable"
    return None


def _clean_captions(captions: list[object], report: LoadReport) -> list[str]:
    """The captions stripped of surrounding whitespace; blank (or non-string) ones are dropped and counted."""
    kept = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    report.empty_captions += len(captions) - len(kept)
    return kept


def _finish(
    records: list[ImageRecord], report: LoadReport, image_dir: Path, annotation_file: Path | None,
    skip_missing_images: bool,
) -> CaptionDataset:
    """Drop uncaptioned images, check the image files, fill in and log the report."""
    kept = []
    for record in sorted(records, key=lambda r: r.image_id):
        if not record.captions:
            report.uncaptioned_images.append(record.image_id)
            continue
        problem = image_file_problem(record.path)
        if problem:
            (report.missing_images if problem == "missing" else report.unreadable_images).append(record.image_id)
            if skip_missing_images:
                report.skipped_images += 1
                continue
        kept.append(record)
    report.images, report.captions = len(kept), sum(len(r.captions) for r in kept)
    if report.problems:
        log.warning("%s", report.summary())
    else:
        log.info("%s", report.summary())
    return CaptionDataset(kept, annotation_file, image_dir, report)


def load_coco(
    annotation_file: str | Path, image_dir: str | Path | None = None, *, skip_missing_images: bool = False,
) -> CaptionDataset:
    """Read a COCO captions file (``captions_train2014.json``-style) with images under ``image_dir``.

    ``image_dir`` (when None or "") defaults to the folder :func:`write_coco` recorded in the file's
    ``info.image_dir``, else the annotation file's folder. Images with missing or unreadable files are kept (and
    reported) unless ``skip_missing_images``; evaluation ground truth does not need the pixels.
    """
    annotation_file = Path(annotation_file)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        coco = COCO(str(annotation_file))
    if not image_dir:  # None or "" (an unset config value)
        info = coco.dataset.get("info")
        recorded = info.get("image_dir") if isinstance(info, dict) else None
        image_dir = recorded or annotation_file.parent
    image_dir = Path(image_dir)
    report = LoadReport(str(annotation_file))
    report.orphan_captions = sum(len(anns) for image_id, anns in coco.imgToAnns.items() if image_id not in coco.imgs)
    records = []
    for image_id, info in coco.imgs.items():
        captions = [ann.get("caption") for ann in coco.imgToAnns.get(image_id, [])]
        records.append(ImageRecord(int(image_id), image_dir / info["file_name"], _clean_captions(captions, report),
                                   info.get("width"), info.get("height")))
    return _finish(records, report, image_dir, annotation_file, skip_missing_images)


KARPATHY_SPLITS = ("train", "val", "test", "restval")


def read_json(path: str | Path) -> object:
    """Parse a JSON file, naming the file in the error when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def load_karpathy(
    json_file: str | Path | dict, image_dir: str | Path, split: str, *, include_restval: bool = True,
    skip_missing_images: bool = False,
) -> CaptionDataset:
    """Read one split of Karpathy's ``dataset_coco.json`` / ``dataset_flickr8k.json`` / ``dataset_flickr30k.json``.

    ``json_file`` may also be the already parsed JSON (to read several splits with one parse). Image ids are
    ``cocoid`` when present (so COCO ids survive), else ``imgid``; paths are ``image_dir/filepath/filename``
    (``filepath`` is absent from the Flickr files). ``split="train"`` includes the ``restval`` images (the usual
    113k-image COCO training split) unless ``include_restval=False``.
    """
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"unknown Karpathy split {split!r} (expected one of {KARPATHY_SPLITS})")
    source = "Karpathy JSON" if isinstance(json_file, dict) else str(json_file)
    data = json_file if isinstance(json_file, dict) else read_json(json_file)
    image_dir = Path(image_dir)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{source}: not a Karpathy split file (no 'images' list)")
    wanted = {split, "restval"} if split == "train" and include_restval else {split}
    report = LoadReport(f"{source} [{split}]")
    records = []
    for n, entry in enumerate(entries):
        if entry.get("split") not in wanted:
            continue
        try:
            image_id = int(entry.get("cocoid", entry.get("imgid")))
            path = image_dir / entry.get("filepath", "") / entry["filename"]
            sentences = [s.get("raw") or " ".join(s.get("tokens", [])) for s in entry.get("sentences", [])]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{source}: image entry {n} is malformed ({exc!r})") from exc
        records.append(ImageRecord(image_id, path, _clean_captions(sentences, report)))
    if not records:
        present = sorted({str(e.get("split")) for e in entries})
        raise ValueError(f"{source}: no images in split {split!r} (splits present: {', '.join(present)})")
    return _finish(records, report, image_dir, None, skip_missing_images)


def load_flickr8k(
    token_file: str | Path, split_file: str | Path, image_dir: str | Path, *, skip_missing_images: bool = False,
) -> CaptionDataset:
    """Read the images named in ``split_file`` (one name a line) with their ``Flickr8k.token.txt`` captions.

    Token lines are ``<name>.jpg#<k><TAB><caption>``. An image's id is its position in the sorted list of all the
    names in the token file, so it is the same whichever split the image is read through.
    """
    token_file, image_dir = Path(token_file), Path(image_dir)
    report = LoadReport(f"{token_file} [{Path(split_file).name}]")
    captions: dict[str, list[tuple[str, str]]] = {}
    for line in token_file.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, hash_sign, k = key.partition("#")
        if not tab or not hash_sign:
            report.malformed_lines += 1
            continue
        captions.setdefault(name, []).append((k, caption))
    ids = {name: i for i, name in enumerate(sorted(captions))}
    names = dict.fromkeys(n.strip() for n in Path(split_file).read_text(encoding="utf-8").splitlines() if n.strip())
    records = []
    for position, name in enumerate(names):
        ordered = [c for _, c in sorted(captions.get(name, []), key=lambda kc: _sort_key(kc[0]))]
        image_id = ids.get(name, len(ids) + position)  # an unknown name is reported below and dropped
        records.append(ImageRecord(image_id, image_dir / name, _clean_captions(ordered, report)))
    return _finish(records, report, image_dir, None, skip_missing_images)


def _sort_key(k: str) -> tuple[int, str]:
    return (int(k), "") if k.isdigit() else (1 << 30, k)


def coco_file_name(record: ImageRecord, image_dir: Path | None) -> str:
    """``record.path`` relative to ``image_dir`` when it lies under it, else the absolute path."""
    if image_dir is not None:
        with contextlib.suppress(ValueError):
            return record.path.relative_to(image_dir).as_posix()
    return str(record.path.resolve())


def write_coco(dataset: CaptionDataset, path: str | Path, description: str = "") -> Path:
    """Write ``dataset`` as a COCO captions file (atomically); :func:`load_coco` reads it back.

    ``file_name`` entries are relative to ``dataset.image_dir``, whose absolute path is recorded in
    ``info.image_dir``. Image ids are kept; annotation ids are numbered from 1.
    """
    image_dir = dataset.image_dir
    images, annotations = [], []
    for record in dataset.images:
        image = {"id": record.image_id, "file_name": coco_file_name(record, image_dir)}
        if record.width is not None and record.height is not None:
            image |= {"width": record.width, "height": record.height}
        images.append(image)
        for caption in record.captions:
            annotations.append({"id": len(annotations) + 1, "image_id": record.image_id, "caption": caption})
    info = {"description": description or "captioner caption annotations"}
    if image_dir is not None:
        info["image_dir"] = os.path.abspath(image_dir)  # as the user typed it: a symlinked folder stays a link
    data = {"info": info, "licenses": [], "type": "captions", "images": images, "annotations": annotations}
    atomic_write_text(path, json.dumps(data, ensure_ascii=False))
    return Path(path)
