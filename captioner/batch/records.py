"""The record loop: image paths in, one record (a caption or an error) per path out, batch by batch.

A record is a plain dict, the same for every output format:

* ``image``: the path as it was given (``os.path.normpath`` of the spelling on the command line or in the list
  file: a relative path stays relative). ``--resume`` matches records to inputs by the file they name
  (:func:`captioner.batch.inputs.image_key`), so the spelling may change between runs.
* ``caption``, ``log_prob`` (summed log-probability of the words and ``<end>``) and ``score`` (the length-normalised
  score the beams are ranked by) of the best caption, and ``captions`` (best first) when more than one was asked
  for; or ``error``: why the image could not be captioned.
* ``tags`` (``[{"label", "probability"}, ...]``, most likely first) when tags were asked for and the model has
  them: the image's top ImageNet classes, from the same encoder pass as its captions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from captioner.api import Caption, Captioner
from captioner.decoding import DecodingOptions
from captioner.image_loader import make_loader
from captioner.preprocess import DEFAULT_MAX_PIXELS
from captioner.tags import Tag

if TYPE_CHECKING:
    from captioner.batch.writers import RecordWriter

Record = dict[str, Any]


def _caption_fields(caption: Caption) -> Record:
    return {"caption": caption.text, "log_prob": round(caption.log_prob, 4), "score": round(caption.score, 4)}


def caption_record(
    path: str, captions: Sequence[Caption], num_captions: int = 1, tags: Sequence[Tag] = ()
) -> Record:
    """``{"image", "caption", "log_prob", "score"}`` for the best caption, plus ``"captions"`` (each with its own
    ``caption``, ``log_prob`` and ``score``, best first) when asked for more than one, and ``"tags"`` when there
    are tags."""
    record: Record = {"image": path, **_caption_fields(captions[0])}
    if num_captions > 1:
        record["captions"] = [_caption_fields(c) for c in captions]
    if tags:
        record["tags"] = [tag.to_json() for tag in tags]
    return record


def error_record(path: str, error: str) -> Record:
    """``{"image", "error"}``: the image could not be captioned."""
    return {"image": path, "error": error}


def caption_batches(
    captioner: Captioner, paths: Sequence[str], options: DecodingOptions, batch_size: int = 32, workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS, num_tags: int = 0, ramp_up: bool = False,
) -> Iterator[list[Record]]:
    """Caption ``paths`` in batches; yields each batch's records (one per path, in order) as soon as it is done.
    With ``num_tags``, records also carry the image's top tags (from the same encoder pass; models with tags only).
    ``ramp_up``: the first batches hold 1, 2, 4, ... images, so that the first records come after one image.

    Nothing is kept between batches: the caller writes the records and forgets them.
    """
    loader = make_loader(
        paths, captioner.preprocess_config, batch_size, workers, captioner.device.type == "cuda", max_pixels, ramp_up
    )
    for batch in loader:
        results = iter(captioner.caption_tensors(batch.images, options, num_tags) if batch.images is not None else [])
        records = []
        for path, error in zip(batch.paths, batch.errors, strict=True):
            if error is not None:
                records.append(error_record(path, error))
            else:
                captions = next(results)
                records.append(caption_record(path, captions, options.num_captions, captions.tags))
        yield records


@dataclass
class BatchStats:
    """What a run did."""

    succeeded: int = 0
    failed: int = 0

    def add(self, records: Iterable[Record]) -> None:
        for record in records:
            if "error" in record:
                self.failed += 1
            else:
                self.succeeded += 1


def run_batch(
    captioner: Captioner, paths: Sequence[str], options: DecodingOptions, writer: RecordWriter,
    batch_size: int = 32, workers: int = 0, on_batch: Callable[[list[Record]], None] | None = None,
    num_tags: int = 0,
) -> BatchStats:
    """Caption ``paths`` into ``writer`` batch by batch; ``on_batch`` sees each batch's records after they are
    written (progress bars, benchmarks); the first batches ramp up from one image so that they come early. The
    caller closes the writer."""
    stats = BatchStats()
    batches = caption_batches(captioner, paths, options, batch_size, workers, num_tags=num_tags, ramp_up=True)
    for records in batches:
        writer.write(records)
        stats.add(records)
        if on_batch is not None:
            on_batch(records)
    return stats
