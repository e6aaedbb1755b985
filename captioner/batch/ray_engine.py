"""``captioner caption --engine ray``: the batch command on Ray Data, from one laptop to a cluster.

The same paths, records and writers as the local engine; only who does the work changes::

    driver    paths (inputs.py, minus what --resume found) -> ray.data.from_items([{"image": path}, ...])
    CPU tasks preprocess_batch: read + decode + resize each file (image_loader.load_item: the library's one image
              path, s3:// URLs through fsspec); a bad file becomes an "error" cell, never an exception
    actors    CaptionImages: the model loaded once per actor (Captioner, the fast runtime; one GPU each when the
              cluster has GPUs), Captioner.caption_tensors per batch -> the batch command's records
              (records.caption_record / error_record) as JSON text
    driver    records -> the writer (writers.py), batch by batch as they arrive: written as it goes, resumable

Ray Data streams between the stages (back-pressure, retries of failed tasks and actors); records arrive in
completion order, not input order. :class:`CaptionImages` is public: it is a callable class that
``ray.data.Dataset.map_batches`` takes as it is, for pipelines of your own.

Ray is imported only inside these functions: the local engine does not need it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from captioner.api import Captioner
from captioner.batch.records import BatchStats, Record, caption_record, error_record
from captioner.batch.writers import RecordWriter
from captioner.decoding import DecodingOptions
from captioner.image_loader import load_item
from captioner.preprocess import DEFAULT_MAX_PIXELS, PreprocessConfig
from captioner.runtime import AUTO
from captioner.storage import aws_environment, is_url
from captioner.tags import DEFAULT_NUM_TAGS

PREPROCESS_CPUS = 0.5  # what each preprocessing task reserves
# Quiet, lean Ray processes: no usage reporting, no dashboard.
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_USAGE_DISABLED": "1"}


def preprocess_batch(
    batch: dict[str, np.ndarray], config: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, np.ndarray]:
    """A Ray Data batch ``{"image": paths or URLs}`` -> ``{"image", "pixels" (n, 3, H, W) float32, "error"}``.

    An optional ``file`` column is what to read when ``image`` is a spelling to keep in the records (the command
    passes absolute paths there: workers need not share the driver's working directory). Every file goes through
    :func:`captioner.image_loader.load_item` (read_image + to_tensor with the model's preprocessing), exactly
    as in the local engine; a file that cannot be used gets an ``error`` text and zero pixels, so one bad file never
    fails the task.
    """
    paths = [str(path) for path in batch["image"]]
    files = [str(file) for file in batch["file"]] if "file" in batch else paths
    pixels = np.zeros((len(paths), 3, config.size, config.size), dtype=np.float32)
    errors = []
    for row, (path, file) in enumerate(zip(paths, files, strict=True)):
        item = load_item(file, config, max_pixels)
        if item.tensor is not None:
            pixels[row] = item.tensor.numpy()
        errors.append((item.error or "").replace(file, path))  # messages name the file as the records do
    return {"image": np.array(paths, dtype=object), "pixels": pixels, "error": np.array(errors, dtype=object)}


class CaptionImages:
    """Caption Ray Data batches in an actor that loads the model once: a callable class for
    ``ray.data.Dataset.map_batches``.

    Input batches need an ``image`` column (paths or fsspec URLs, e.g. ``s3://bucket/a.jpg``); batches already
    made by :func:`preprocess_batch` (with ``pixels`` and ``error``) skip the reading. Output batches have
    ``image``, ``caption`` (the best caption, ``""`` when the image failed), ``error`` (``""`` when it did not) and
    ``record`` (the JSON text of the record ``captioner caption`` writes for the image: log_prob, score, tags...).
    The actor uses the GPU Ray gives it (``num_gpus=1``), else the CPU with ``threads`` torch threads (default:
    Ray's, i.e. the actor's ``num_cpus``). Decoding options are the model's recorded defaults, then those given
    (the ``DecodingOptions`` fields, or ``options=`` a whole :class:`DecodingOptions`).

    Example::

        import ray
        from captioner.batch.ray_engine import CaptionImages

        images = ray.data.from_items([{"image": "s3://my-bucket/photos/1.jpg"}, {"image": "/data/2.png"}])
        captions = images.map_batches(
            CaptionImages,
            fn_constructor_kwargs={"model": None, "beam_size": 3},   # None: the bundled model
            batch_size=32,
            compute=ray.data.ActorPoolStrategy(size=2),
            num_cpus=1,                                               # or num_gpus=1 on a GPU cluster
        )
        for row in captions.iter_rows():
            print(row["image"], row["caption"] or row["error"])
    """

    def __init__(
        self, model: str | None = None, runtime: str = AUTO, num_tags: int = DEFAULT_NUM_TAGS,
        options: DecodingOptions | None = None, threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
        decoder_precision: str = "float32", **given: object,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() and _assigned_gpus() else "cpu"
        self.captioner = Captioner.load(model, device=device, runtime=runtime, decoder_precision=decoder_precision)
        self.options = options if options is not None else self.captioner.options(**given)
        self.num_tags = num_tags if self.captioner.has_tags else 0
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "pixels" not in batch:
            batch = preprocess_batch(batch, self.captioner.preprocess_config, self.max_pixels)
        paths = [str(path) for path in batch["image"]]
        errors = [str(error) for error in batch["error"]]
        good = [row for row, error in enumerate(errors) if not error]
        captions = iter(
            self.captioner.caption_tensors(torch.from_numpy(np.ascontiguousarray(batch["pixels"][good])),
                                           self.options, self.num_tags)
            if good else []
        )
        records = []
        for path, error in zip(paths, errors, strict=True):
            if error:
                records.append(error_record(path, error))
            else:
                image_captions = next(captions)
                records.append(caption_record(path, image_captions, self.options.num_captions, image_captions.tags))
        return {
            "image": np.array(paths, dtype=object),
            "caption": np.array([r.get("caption", "") for r in records], dtype=object),
            "error": np.array([r.get("error", "") for r in records], dtype=object),
            "record": np.array([json.dumps(r) for r in records], dtype=object),
        }


def _assigned_gpus() -> list:
    import ray

    return ray.get_gpu_ids() if ray.is_initialized() else []


@dataclass(frozen=True)
class RaySettings:
    """How the Ray engine runs: where, how many model actors, their batch size and resources."""

    address: str | None = None  # None: start a local Ray instance (ray.init()); else "auto", "HOST:PORT", "ray://..."
    actors: int | None = None  # model actors; None: one per GPU, or (CPUs - 1) CPU actors (at least 1)
    batch_size: int = 32  # images per actor call
    actor_cpus: float = 1.0  # CPUs each actor reserves (and its torch threads on CPU)
    readers: int | None = None  # most preprocessing tasks at once; None: as many as free CPUs allow
    device: str = "auto"  # "auto": GPU actors when the cluster has GPUs; "cpu"; "cuda"
    model: str | None = None  # a model directory readable at this path on every node (None: the bundled model)
    runtime: str = AUTO
    decoder_precision: str = "float32"
    num_tags: int = DEFAULT_NUM_TAGS
    max_pixels: int = DEFAULT_MAX_PIXELS
    num_cpus: int | None = None  # CPUs of a local instance (None: all of this machine's)


def start_ray(settings: RaySettings) -> None:
    """Connect to ``settings.address`` or start a local instance (no dashboard, no usage stats); the AWS settings
    of this environment travel to the workers, so they read the same buckets."""
    import ray

    if ray.is_initialized():
        return
    os.environ.update({k: v for k, v in RAY_ENV.items() if k not in os.environ})
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": "warning"}
    if settings.address is None:  # a local instance: its workers inherit this environment
        ray.init(include_dashboard=False, num_cpus=settings.num_cpus, **kwargs)
        return
    # A cluster's workers get the AWS settings, and this checkout's captioner when it comes from PYTHONPATH.
    env_vars = {**RAY_ENV, **aws_environment()}
    if "PYTHONPATH" in os.environ:
        env_vars["PYTHONPATH"] = os.environ["PYTHONPATH"]
    ray.init(address=settings.address, runtime_env={"env_vars": env_vars}, **kwargs)


def _plan(settings: RaySettings) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for this cluster."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if settings.device.startswith("cuda") and not gpus:
        raise ValueError("--device cuda, but the Ray cluster has no GPUs; use --device cpu (or auto)")
    use_gpus = gpus > 0 and settings.device != "cpu"
    cpus = int(resources.get("CPU", 1))
    if settings.actors is not None:
        actors = settings.actors
    elif use_gpus:
        actors = gpus
    else:  # leave a CPU for the preprocessing tasks
        actors = max(1, int((cpus - 1) // settings.actor_cpus))
    return actors, settings.actor_cpus, 1.0 if use_gpus else 0.0


def ray_record_batches(
    paths: Sequence[str], options: DecodingOptions, settings: RaySettings, preprocess: PreprocessConfig
) -> Iterator[list[Record]]:
    """Caption ``paths`` on Ray (after :func:`start_ray`); yields lists of records as the actors finish them."""
    import ray

    if not paths:
        return
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the command draws its own
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its notices would interleave with the command's
    actors, actor_cpus, actor_gpus = _plan(settings)
    # Blocks of one actor batch: records stream back in batches, and the scheduler balances them across actors.
    blocks = max(1, -(-len(paths) // settings.batch_size))
    rows = [{"image": path, "file": path if is_url(path) else os.path.abspath(path)} for path in paths]
    dataset = ray.data.from_items(rows, override_num_blocks=blocks)
    dataset = dataset.map_batches(
        preprocess_batch, fn_kwargs={"config": preprocess, "max_pixels": settings.max_pixels},
        # Half a CPU each: two decode per free core, and resources unlike the actors' keep Ray Data from fusing
        # this step into the actors (the actors' CPUs would then decode instead of caption).
        batch_size=settings.batch_size, num_cpus=PREPROCESS_CPUS,
        compute=ray.data.TaskPoolStrategy(size=settings.readers),
    )
    dataset = dataset.map_batches(
        CaptionImages,
        fn_constructor_kwargs={
            "model": settings.model, "runtime": settings.runtime, "decoder_precision": settings.decoder_precision,
            "num_tags": settings.num_tags,
            "options": options, "threads": max(1, int(actor_cpus)) if not actor_gpus else None,
            "max_pixels": settings.max_pixels,
        },
        batch_size=settings.batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_cpus, num_gpus=actor_gpus,
    )
    # No select_columns here: it would be one more task operator, whose tasks wait for a free CPU (the actors and
    # readers hold them), so records would only come back once every image was read.
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        yield [json.loads(text) for text in batch["record"]]


def run_ray_batch(
    paths: Sequence[str], options: DecodingOptions, writer: RecordWriter, settings: RaySettings,
    preprocess: PreprocessConfig, on_batch: Callable[[list[Record]], None] | None = None,
) -> BatchStats:
    """:func:`captioner.batch.records.run_batch` on Ray: caption ``paths`` into ``writer`` as records arrive.
    Starts or joins Ray (:func:`start_ray`); the caller closes the writer and calls :func:`stop_ray`."""
    start_ray(settings)
    stats = BatchStats()
    for records in ray_record_batches(paths, options, settings, preprocess):
        writer.write(records)
        stats.add(records)
        if on_batch is not None:
            on_batch(records)
    return stats


def stop_ray() -> None:
    """Disconnect from Ray (and stop the local instance this process started)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()

