"""The Python API: ``Captioner.load(path).caption(images)``.

The one path behind every door (the CLI, the batch command, the HTTP service, evaluation): images are read and
turned into the encoder's input by :func:`captioner.preprocess.prepare_image`, decoding options come from
:meth:`Captioner.options` (the model's recorded defaults, then what the user gave), and
:meth:`Captioner.caption_tensors` encodes and decodes a batch, with one set of options or one per image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.checkpoint import CaptionModel, load_model
from captioner.decoding import DecodingOptions, decode
from captioner.errors import CheckpointError
from captioner.preprocess import DEFAULT_MAX_PIXELS, ImageSource, prepare_image
from captioner.runtime import AUTO, load_runtime

DEFAULT_MODEL_DIR = Path(__file__).parent / "models" / "default"


@dataclass(frozen=True)
class Caption:
    """One generated caption."""

    text: str
    tokens: list[str]
    log_prob: float  # summed log-probability of the words and <end>
    score: float  # the ranking score: log_prob / length ** length_penalty (captions come best score first)

    @property
    def probability(self) -> float:
        """exp(log_prob): the model's probability of the whole word sequence."""
        return math.exp(self.log_prob)


class Captioner:
    """A loaded model ready to caption images."""

    def __init__(self, model: CaptionModel, device: str | torch.device = "cpu", runtime: str | None = AUTO) -> None:
        self.model = model.to(device)
        self.device = torch.device(device)
        self.vocab = model.vocab
        self.preprocess_config = model.preprocess
        # The encoder in the chosen inference runtime (captioner.runtime); the decoder always runs in PyTorch.
        self.encode = load_runtime(model.encoder, model.preprocess.size, runtime, self.device)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        encoder_weights: str | Path | None = None,
        allow_download: bool = True,
        runtime: str | None = AUTO,
    ) -> Captioner:
        """Load a model directory (the bundled default model when ``path`` is None).

        ``runtime`` runs the encoder: "torch", "openvino", "onnxruntime" or "auto" (the fastest installed one).
        """
        if path is None:
            path = DEFAULT_MODEL_DIR
            if not (path / "config.json").is_file():
                raise CheckpointError(f"the bundled default model is missing from {path}; pass a model directory")
        return cls(load_model(path, device, encoder_weights, allow_download), device, runtime)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> str:
        return self.model.version

    def options(self, **given: object) -> DecodingOptions:
        """Decoding options: the model's recorded defaults, then ``given`` (None values mean "not given")."""
        return DecodingOptions.from_recorded(self.model.decoding, **given)

    def load_tensor(self, image: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Any image source to the encoder's input tensor, with this model's preprocessing."""
        return prepare_image(image, self.preprocess_config, max_pixels).tensor

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
        if isinstance(images, (str, Path, bytes, bytearray, memoryview)) or not isinstance(images, Sequence):
            images = [images]
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

    def caption_tensors(
        self, batch: torch.Tensor, options: DecodingOptions | Sequence[DecodingOptions]
    ) -> list[list[Caption]]:
        """Caption preprocessed images (B, 3, H, W): the one batched entry point of every door.

        ``options`` is one set for the whole batch or one per image (the service's micro-batches mix requests):
        the encoder runs once on the batch, then :func:`captioner.decoding.decode` once per distinct options.
        """
        if batch.size(0) == 0:
            return []
        with torch.inference_mode():
            grid = self.encode(batch.to(self.device, non_blocking=True))
            results = decode(self.model.decoder, grid.float(), self.vocab, options)
        return [
            [Caption(self.vocab.decode(h.tokens), [self.vocab.words[t] for t in h.tokens], h.log_prob, h.score)
             for h in hyps]
            for hyps in results
        ]
