"""Caption datasets. Everything is read from COCO-format caption annotation files through pycocotools.

``captioner prepare`` converts the other formats (Karpathy's split JSON, Flickr8k's token file) into COCO-format
files, one per split, so training and evaluation only ever read one format.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path

from pycocotools.coco import COCO


@dataclass
class ImageRecord:
    """One image and its reference captions."""

    image_id: int
    path: Path
    captions: list[str] = field(default_factory=list)


@dataclass
class CaptionDataset:
    """The images of one split; ``annotation_file`` is the COCO file it came from (the evaluation ground truth)."""

    images: list[ImageRecord]
    annotation_file: Path | None = None

    def __len__(self) -> int:
        return len(self.images)


def load_coco(annotation_file: str | Path, image_dir: str | Path) -> CaptionDataset:
    """Read a COCO captions file (``captions_train2014.json``-style) with images under ``image_dir``."""
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
        coco = COCO(str(annotation_file))
    image_dir = Path(image_dir)
    images = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        captions = [ann["caption"] for ann in coco.imgToAnns.get(image_id, []) if ann.get("caption", "").strip()]
        images.append(ImageRecord(int(image_id), image_dir / info["file_name"], captions))
    return CaptionDataset(images, Path(annotation_file))
