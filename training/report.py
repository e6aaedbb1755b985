"""Reports for people: a training run's ``curves.png`` (:func:`plot_curves`), and a self-contained HTML page of an
evaluation (:func:`write_report`): the metrics, then a sample of images with generated and reference captions.
Images are embedded as small base64 JPEG thumbnails, so the page can be moved or mailed on its own.
"""

from __future__ import annotations

import base64
import html
import io
import random
from collections.abc import Mapping
from pathlib import Path

from captioner.atomic import atomic_write_bytes, atomic_write_text
from captioner.errors import CaptionerError
from captioner.preprocess import PreprocessConfig, load_image
from training.data import CaptionDataset
from training.evaluation import metric_label

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table.metrics td, table.metrics th { padding: 0.2em 1em; text-align: right; }
table.metrics th { text-align: left; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 1.2em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.8em; }
.card img { max-width: 100%; display: block; margin-bottom: 0.5em; }
.missing { background: #eee; color: #888; padding: 3em 0; text-align: center; }
.generated { font-weight: 600; }
.refs { color: #555; font-size: 0.9em; padding-left: 1.2em; margin: 0.3em 0; }
.meta { color: #888; font-size: 0.8em; }
"""


def thumbnail_data_uri(path: Path, size: int = 256) -> str | None:
    """The image as a ``data:image/jpeg;base64`` URI at most ``size`` pixels a side, or None if it cannot be read."""
    try:
        image = load_image(path, PreprocessConfig(size=size))
    except (CaptionerError, OSError):
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _card(image_id: int, path: Path, generated: str, references: list[str]) -> str:
    uri = thumbnail_data_uri(path)
    picture = (f'<img src="{uri}" alt="image {image_id}">' if uri
               else '<div class="missing">image unavailable</div>')
    refs = "".join(f"<li>{html.escape(r)}</li>" for r in references)
    meta = f"id {image_id} &middot; {html.escape(path.name)}"
    return (f'<div class="card">{picture}<div class="generated">{html.escape(generated)}</div>'
            f'<ol class="refs">{refs}</ol><div class="meta">{meta}</div></div>')


def render_report(
    predictions: Mapping[int, str], dataset: CaptionDataset, metrics: Mapping[str, float], title: str,
    details: Mapping[str, object] | None = None, sample_size: int = 50, seed: int = 0,
) -> str:
    """The page as a string: ``metrics`` (shown x100), ``details`` (e.g. model and decoding), a random sample."""
    records = {record.image_id: record for record in dataset.images}
    ids = sorted(i for i in predictions if i in records)
    sample = sorted(random.Random(seed).sample(ids, min(sample_size, len(ids))))
    rows = "".join(f"<tr><th>{html.escape(metric_label(key))}</th><td>{100 * value:.2f}</td></tr>"
                   for key, value in metrics.items())
    info = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in (details or {}).items())
    cards = "".join(_card(i, records[i].path, predictions[i], records[i].captions) for i in sample)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f'<table class="metrics">{rows}</table><ul>{info}</ul>'
        f"<h2>{len(sample)} of {len(ids)} images (random sample): generated caption, then the references</h2>"
        f'<div class="grid">{cards}</div></body></html>\n'
    )


def write_report(
    path: str | Path, predictions: Mapping[int, str], dataset: CaptionDataset, metrics: Mapping[str, float],
    title: str, details: Mapping[str, object] | None = None, sample_size: int = 50, seed: int = 0,
) -> Path:
    """Write :func:`render_report`'s page to ``path`` atomically."""
    atomic_write_text(path, render_report(predictions, dataset, metrics, title, details, sample_size, seed))
    return Path(path)


def _readable_axis(axis: object, values: list[float], min_span: float) -> None:
    """Plain numbers (no 1e-7 offset) and at least ``min_span`` of room, so one or two nearly equal points (a short
    run) do not fill the axis with noise-level ticks."""
    axis.ticklabel_format(axis="y", useOffset=False, style="plain")
    if values:
        low, high = min(values), max(values)
        if high - low < min_span:
            middle = (low + high) / 2
            axis.set_ylim(middle - min_span / 2, middle + min_span / 2)


def plot_curves(history: list[dict], path: str | Path) -> Path:
    """Training loss and validation scores (x100) per epoch as a PNG, written atomically; readable for a 1-epoch run
    as for a 50-epoch one: whole-epoch ticks, and a validation axis at least 10 points tall."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    losses = [h["train_loss"] for h in history]
    left.plot(epochs, losses, marker="o")
    left.set(xlabel="epoch", ylabel="train loss", title="cross-entropy")
    _readable_axis(left, losses, 0.1)
    evaluated = [h for h in history if "val" in h]
    scores: list[float] = []
    for key in ("CIDEr", "BLEU-4"):
        if evaluated and key in evaluated[0]["val"]:
            values = [h["val"][key] * 100 for h in evaluated]
            scores.extend(values)
            right.plot([h["epoch"] for h in evaluated], values, marker="o", label=key)
    right.set(xlabel="epoch", ylabel="score x100", title="validation")
    _readable_axis(right, scores, 10.0)
    if scores:
        right.set_ylim(bottom=max(0.0, right.get_ylim()[0]))  # scores are never negative
        right.legend()
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if epochs:
            axis.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    fig.tight_layout()
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, image.getvalue())
    return path
