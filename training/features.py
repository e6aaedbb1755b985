"""The features cache: the frozen encoder runs once per image, its grids are kept in a memory-mapped file.

A cache entry is a directory named by a hash of everything that determines the features (encoder name, weights,
preprocessing parameters, storage dtype, the image list and whether the images were mirrored), so a
change to any of them computes a new entry and a rerun with the same settings reuses the old one, across epochs and
across runs. Mirrored entries hold the grids of the horizontally flipped images, for training-time augmentation.

The weights are named by the pretrained file's verified sha256 for an encoder that never trained, and by a digest
of the tensors themselves for one with fine-tuned blocks (a fine-tuned encoder keeps its pretrained file's sha256
as a record of where it started, but computes other grids). A fine-tuning run caches the *trunk*, the frozen
blocks' output (``trunk=True``), and runs the blocks it trains on top (:class:`TopOfTrunk`), so its epochs read
memory-mapped arrays as a frozen run's do instead of decoding and encoding every photo again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from captioner.atomic import AtomicFile, atomic_write_text
from captioner.checkpoint import CaptionModel
from captioner.encoder import Encoder
from captioner.image_loader import make_loader
from captioner.preprocess import PreprocessConfig
from captioner.runtime import AUTO, load_runtime, weights_digest
from training.data import CaptionDataset, load_coco

log = logging.getLogger(__name__)
CACHE_VERSION = 1


@dataclass
class FeatureCache:
    """Encoder grids for a list of images: ``features[i]`` is the (C, h, w) grid of ``paths[i]``."""

    features: np.ndarray  # memory-mapped (N, C, h, w)
    paths: list[Path]
    failed: set[int]  # rows whose image could not be read (all zeros)

    def grids(self, rows: torch.Tensor | list[int]) -> torch.Tensor:
        """Float32 grids for the given rows."""
        rows = np.asarray(rows)
        return torch.from_numpy(np.ascontiguousarray(self.features[rows])).float()


class TopOfTrunk:
    """A trunk cache read through the encoder's fine-tuned blocks: the grids the encoder computes *now*.

    What a fine-tuning run validates with: ``grids`` runs :meth:`Encoder.top` in eval mode (its batch-norm
    statistics, not the batch's) without gradients, on the device of the encoder's weights.
    """

    def __init__(self, trunk: FeatureCache, encoder: Encoder) -> None:
        self.trunk, self.encoder = trunk, encoder

    @property
    def failed(self) -> set[int]:
        return self.trunk.failed

    def grids(self, rows: torch.Tensor | list[int]) -> torch.Tensor:
        """Float32 grids for the given rows."""
        device = next(self.encoder.parameters()).device
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            with torch.no_grad():
                return self.encoder.top(self.trunk.grids(rows).to(device)).float()
        finally:
            self.encoder.train(was_training)


def cache_key(
    encoder: Encoder, config: PreprocessConfig, paths: list[Path], dtype: str, mirrored: bool = False,
    trunk: bool = False,
) -> str:
    """Hash of everything the cached features depend on."""
    identity = {
        "version": CACHE_VERSION,
        "encoder": encoder.name,
        "weights": encoder.weights_sha256,
        "preprocess": config.to_json(),
        "dtype": dtype,
        "paths": [str(Path(p).resolve()) for p in paths],
    }
    # Only where they apply, so the keys of existing entries (a frozen encoder's whole grids) stay valid.
    if mirrored:
        identity["mirrored"] = True
    if trunk and encoder.fine_tune_blocks:  # the frozen blocks only: still the pretrained file's weights
        identity["trunk_blocks"] = encoder.frozen_blocks
    elif encoder.fine_tune_blocks:  # trained weights: the pretrained file's sha256 no longer says what they compute
        identity["weights"] = weights_digest(encoder)
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def build_feature_cache(
    encoder: Encoder,
    config: PreprocessConfig,
    paths: list[Path],
    cache_root: str | Path,
    dtype: str = "float16",
    batch_size: int = 64,
    workers: int = 2,
    device: str = "cpu",
    mirrored: bool = False,
    trunk: bool = False,
) -> FeatureCache:
    """Load the cache entry for ``paths`` or compute it (with a progress bar) and then load it.

    ``mirrored`` encodes each preprocessed image flipped left to right (the same preprocessing, then a mirror).
    ``trunk`` keeps the output of the encoder's frozen blocks (:meth:`Encoder.trunk`), for a run that fine-tunes
    the others; it is the whole grid when no block is fine-tuned.
    """
    if encoder.weights_sha256 is None:
        raise ValueError("the features cache needs a pretrained encoder (its weights hash is part of the key)")
    entry = Path(cache_root) / cache_key(encoder, config, paths, dtype, mirrored, trunk)
    meta_file = entry / "meta.json"
    if not meta_file.is_file():
        # The DataLoader draws a seed from the global RNG; a training run must not depend on whether its cache
        # already existed, so computing one leaves the RNG as it found it.
        with torch.random.fork_rng(devices=[]):
            _compute(encoder, config, paths, entry, dtype, batch_size, workers, device, mirrored, trunk)
    meta = json.loads(meta_file.read_text())
    features = np.memmap(entry / "features.bin", dtype=meta["dtype"], mode="r", shape=tuple(meta["shape"]))
    log.info("features cache %s: %d images, %d unreadable", entry, len(paths), len(meta["failed"]))
    return FeatureCache(features, paths, set(meta["failed"]))


def _compute(
    encoder: Encoder,
    config: PreprocessConfig,
    paths: list[Path],
    entry: Path,
    dtype: str,
    batch_size: int,
    workers: int,
    device: str,
    mirrored: bool,
    trunk: bool,
) -> None:
    entry.mkdir(parents=True, exist_ok=True)
    encoder = encoder.to(device).eval()
    if trunk and encoder.fine_tune_blocks:
        encode = encoder.trunk  # part of the network: PyTorch (computed once per run's images)
    else:
        encode = load_runtime(encoder, config.size, AUTO, device)  # the fastest installed runtime; grids match torch's
    with torch.inference_mode():
        probe = encode(torch.zeros(1, 3, config.size, config.size, device=device))
    shape = (len(paths), *probe.shape[1:])
    file = AtomicFile(entry / "features.bin")  # published whole, only once every row is written
    features = np.memmap(file.tmp, dtype=dtype, mode="w+", shape=shape)
    loader = make_loader([str(p) for p in paths], config, batch_size, workers)  # the batch command's loader
    failed: list[int] = []
    row = 0
    desc = "encoding mirrored images" if mirrored else "encoding images"
    with torch.inference_mode(), tqdm(total=len(paths), desc=desc, unit="img") as bar:
        for batch in loader:
            good = [row + i for i, error in enumerate(batch.errors) if error is None]
            failed += [row + i for i, error in enumerate(batch.errors) if error is not None]
            if batch.images is not None:
                images = batch.images.flip(-1) if mirrored else batch.images
                features[good] = encode(images.to(device)).float().cpu().numpy().astype(dtype)
            row += len(batch)
            bar.update(len(batch))
    features.flush()
    del features
    file.commit()
    if failed:
        log.warning("%d of %d images could not be read, e.g. %s", len(failed), len(paths), paths[failed[0]])
    # meta.json is written last: its presence marks a complete entry.
    atomic_write_text(entry / "meta.json", json.dumps({"shape": list(shape), "dtype": dtype, "failed": sorted(failed)}))


@dataclass
class CachedSplit:
    """An annotated split ready to score a model on: its images' grids (cached) and their references."""

    dataset: CaptionDataset
    cache: FeatureCache
    rows: list[int]  # the images whose grids could be computed, in the annotations' order
    references: dict[int, list[str]]  # image id -> reference captions, for those rows

    def grids(self, rows: list[int]) -> torch.Tensor:
        """Float32 grids for the given rows."""
        return self.cache.grids(rows)


def cached_split(
    model: CaptionModel, annotations: str | Path, images: str | None, cache_root: str | Path
) -> CachedSplit:
    """``annotations`` (COCO format; ``images`` its image folder, None: the annotations' own) with ``model``'s grids,
    from the features cache: what the decoding scripts score a model on."""
    dataset = load_coco(annotations, images)
    cache = build_feature_cache(model.encoder, model.preprocess, [r.path for r in dataset.images], cache_root)
    rows = [r for r in range(len(dataset.images)) if r not in cache.failed]
    return CachedSplit(dataset, cache, rows, {dataset.images[r].image_id: dataset.images[r].captions for r in rows})
