"""A tiny synthetic captioning data set (generated images, COCO-format files) and a fast training config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tiny_models import TINY_CAPTIONS

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle", "stripe")


def _draw(colour: tuple[int, int, int], shape: str, variant: int) -> Image.Image:
    image = Image.new("RGB", (72, 72), (250, 250, 250) if variant % 2 else (200, 200, 200))
    draw = ImageDraw.Draw(image)
    box = (10 + variant, 12, 58 - variant, 60)
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle((0, 26 + variant, 72, 44), fill=colour)
    return image


def make_dataset(root: Path, variants: int = 2) -> dict[str, Path]:
    """Write images and COCO caption files for train and val splits; returns their paths and the image folder."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    splits: dict[str, dict] = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    image_id = annotation_id = 0
    for colour_name, colour in COLOURS.items():
        for shape in SHAPES:
            for variant in range(variants + 1):
                split = "val" if variant == variants else "train"
                name = f"{colour_name}_{shape}_{variant}.png"
                _draw(colour, shape, variant).save(images / name)
                splits[split]["images"].append({"id": image_id, "file_name": name})
                for text in (
                    f"a {colour_name} {shape}",
                    f"a {shape} that is {colour_name}",
                    f"one {colour_name} {shape}",
                ):
                    annotation_id += 1
                    splits[split]["annotations"].append({"id": annotation_id, "image_id": image_id, "caption": text})
                image_id += 1
    paths = {"images": images}
    for split, data in splits.items():
        paths[split] = root / f"captions_{split}.json"
        paths[split].write_text(json.dumps({**data, "type": "captions"}))
    return paths


def tiny_config(root: Path, data: dict[str, Path], **sections: dict) -> Path:
    """A TOML config for a seconds-long run on the synthetic data (64px images, a small decoder)."""
    values: dict[str, dict] = {
        "data": {
            "train_annotations": str(data["train"]),
            "val_annotations": str(data["val"]),
            "images": str(data["images"]),
            "min_word_count": 1,
        },
        "preprocess": {"size": 64},
        "model": {"embed_dim": 16, "hidden_dim": 32, "attention_dim": 16, "dropout": 0.1},
        "train": {
            "epochs": 3,
            "batch_size": 8,
            "lr": 3e-3,
            "warmup_steps": 2,
            "cache_dir": str(root / "cache"),
            "workers": 0,
            "threads": 1,
            "device": "cpu",
        },
        "eval": {"beam_size": 2, "max_length": 6},
    }
    for section, overrides in sections.items():
        values.setdefault(section, {}).update(overrides)
    lines = []
    for section, entries in values.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in entries.items()]
    path = root / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def noise_photo_split(root: Path) -> Path:
    """Three noise photos with two references each (from the tiny models' captions), as a COCO captions file in
    ``root``; the photos in ``root / "images"``."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    images, annotations = [], []
    for image_id in range(3):
        name = f"photo{image_id}.jpg"
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(root / "images" / name)
        images.append({"id": image_id, "file_name": name})
        for k in range(2):
            annotations.append({"id": 10 + 2 * image_id + k, "image_id": image_id,
                                "caption": TINY_CAPTIONS[(image_id + k) % len(TINY_CAPTIONS)]})
    path = root / "captions.json"
    path.write_text(json.dumps({"info": {"description": "tiny"}, "images": images, "annotations": annotations}))
    return path
