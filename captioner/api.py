"""The Python API: ``Captioner.load(path).caption(images)``.

This is the single decoding path behind the CLI, the batch command and the HTTP service.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from captioner.checkpoint import CaptionModel, load_model
from captioner.decoding import DecodingOptions, decode
from captioner.errors import CheckpointError
from captioner.preprocess import DEFAULT_MAX_PIXELS, ImageSource, load_image, to_tensor
from captioner.tags import DEFAULT_NUM_TAGS, Tag

DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"


@dataclass(frozen=True)
class Caption:
    """One generated caption."""

    text: str
    tokens: list[str]
    log_prob: float

    @property
    def probability(self) -> float:
        """exp(log_prob): the model's probability of the whole word sequence."""
        return math.exp(self.log_prob)


class Captioner:
    """A loaded model ready to caption images."""

    def __init__(self, model: CaptionModel, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device)
        self.device = torch.device(device)
        self.vocab = model.vocab
        self.preprocess_config = model.preprocess

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        encoder_weights: str | Path | None = None,
        allow_download: bool = True,
    ) -> Captioner:
        """Load a model directory (the bundled default model when ``path`` is None)."""
        if path is None:
            path = DEFAULT_MODEL_DIR
            if not (path / "config.json").is_file():
                raise CheckpointError(f"the bundled default model is missing from {path}; pass a model directory")
        return cls(load_model(path, device, encoder_weights, allow_download), device)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> str:
        return self.model.version

    def options(self, **overrides: object) -> DecodingOptions:
        """Decoding options: the model's recorded defaults, then ``overrides`` (None values are ignored)."""
        known = {f.name for f in fields(DecodingOptions)}
        values = {k: v for k, v in self.model.decoding.items() if k in known}
        values |= {k: v for k, v in overrides.items() if v is not None}
        return DecodingOptions(**values)

    def load_tensor(self, image: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """The one preprocessing path: any image source to the encoder's input tensor."""
        return to_tensor(load_image(image, self.preprocess_config, max_pixels), self.preprocess_config)

    def caption(
        self,
        images: ImageSource | Sequence[ImageSource],
        strategy: str | None = None,
        beam_size: int | None = None,
        max_length: int | None = None,
        num_captions: int | None = None,
        length_penalty: float | None = None,
        no_repeat_ngram_size: int | None = None,
    ) -> list[list[Caption]]:
        """Caption one image or a list of images (paths, bytes or PIL images): per image, captions best first.

        Options left as None take the model's recorded decoding defaults, then :class:`DecodingOptions`' defaults.
        """
        images = _image_list(images)
        options = self.options(
            strategy=strategy,
            beam_size=beam_size,
            max_length=max_length,
            num_captions=num_captions,
            length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
        )
        if not images:
            return []
        batch = torch.stack([self.load_tensor(image) for image in images])
        return self.caption_tensors(batch, options)

    def caption_tensors(self, batch: torch.Tensor, options: DecodingOptions) -> list[list[Caption]]:
        """Caption preprocessed images (B, 3, H, W) in one encoder and decoder batch."""
        with torch.inference_mode():
            grid = self.model.encoder(batch.to(self.device, non_blocking=True))
            return self.caption_grids(grid, options)

    def caption_grids(self, grid: torch.Tensor, options: DecodingOptions) -> list[list[Caption]]:
        """Caption encoder feature grids (B, C, h, w), e.g. from the training features cache."""
        results = decode(self.model.decoder, grid.to(self.device).float(), self.vocab, options)
        return [
            [Caption(self.vocab.decode(h.tokens), [self.vocab.words[t] for t in h.tokens], h.log_prob) for h in hyps]
            for hyps in results
        ]

    @property
    def has_tags(self) -> bool:
        """Whether the model tags images: its encoder's ImageNet classifier is known (see :mod:`captioner.tags`)."""
        return self.model.tagger is not None

    def tags(self, images: ImageSource | Sequence[ImageSource], k: int = DEFAULT_NUM_TAGS) -> list[list[Tag]]:
        """The ``k`` most likely ImageNet classes of one image or a list of images, most likely first; an empty list
        per image when the model has no tags."""
        images = _image_list(images)
        if not images:
            return []
        batch = torch.stack([self.load_tensor(image) for image in images])
        with torch.inference_mode():
            return self.tag_grids(self.model.encoder(batch.to(self.device, non_blocking=True)), k)

    def tag_grids(self, grid: torch.Tensor, k: int = DEFAULT_NUM_TAGS) -> list[list[Tag]]:
        """Tags from encoder feature grids (B, C, h, w): the grids captions are decoded from, so no second pass."""
        if k < 0:
            raise ValueError(f"the number of tags must be 0 or more, got {k}")
        if self.model.tagger is None or k == 0:
            return [[] for _ in range(len(grid))]
        return self.model.tagger.top_k(grid.to(self.device), k)

    def caption_and_tag_tensors(
        self, batch: torch.Tensor, options: DecodingOptions, k: int = DEFAULT_NUM_TAGS
    ) -> tuple[list[list[Caption]], list[list[Tag]]]:
        """Captions and tags of preprocessed images (B, 3, H, W) from one encoder pass."""
        with torch.inference_mode():
            grid = self.model.encoder(batch.to(self.device, non_blocking=True))
            return self.caption_grids(grid, options), self.tag_grids(grid, k)


def _image_list(images: ImageSource | Sequence[ImageSource]) -> list[ImageSource]:
    """One image source, or a sequence of them, as a list."""
    if isinstance(images, (str, Path, bytes, bytearray, memoryview)) or not isinstance(images, Sequence):
        return [images]
    return list(images)
