"""Streaming batch captioning: image files in, one output record per image out.

The engine behind ``captioner caption``. Its modules, in the order a run uses them:

* :mod:`~captioner.batch.inputs`: files, folders and globs to one sorted, de-duplicated list of paths; sharding.
* :mod:`~captioner.batch.resume`: what an existing output file already has (``--resume``, repairing a cut line).
* :mod:`~captioner.batch.records`: the record loop, captioning the paths through :mod:`captioner.image_loader`'s
  DataLoader; a file that cannot be used becomes an error record, never an exception.
* :mod:`~captioner.batch.writers`: JSON lines, CSV or a COCO results file, written batch by batch.

The names below are the package's public interface, re-exported for the command and for scripts.
"""

from captioner.batch.inputs import (
    IMAGE_EXTENSIONS,
    Shard,
    discover_images,
    expand_path,
    image_key,
    path_exists,
    rank_output_path,
    read_path_list,
)
from captioner.batch.records import BatchStats, Record, caption_batches, caption_record, error_record, run_batch
from captioner.batch.resume import Completed, read_completed, repair_partial_line
from captioner.batch.writers import (
    FORMATS,
    BatchOutputError,
    CocoWriter,
    CsvWriter,
    JsonlWriter,
    RecordWriter,
    coco_image_id,
    csv_columns,
    infer_format,
    open_writer,
)
from captioner.image_loader import (
    ImageBatch,
    ImageFiles,
    LoadedImage,
    PathTable,
    collate,
    default_workers,
    load_item,
    make_loader,
)

__all__ = [
    "FORMATS", "IMAGE_EXTENSIONS", "BatchOutputError", "BatchStats", "CocoWriter", "Completed", "CsvWriter",
    "ImageBatch", "ImageFiles", "JsonlWriter", "LoadedImage", "PathTable", "Record", "RecordWriter", "Shard",
    "caption_batches", "caption_record", "coco_image_id", "collate", "csv_columns", "default_workers",
    "discover_images", "error_record", "expand_path", "image_key", "infer_format", "load_item", "make_loader",
    "open_writer", "path_exists", "rank_output_path", "read_completed", "read_path_list", "repair_partial_line",
    "run_batch",
]
