"""The Python API: ``Captioner.load(path).caption(images)``.

The one path behind every door (the CLI, the batch command, the HTTP service, evaluation): images are read and
turned into the encoder's input by :func:`captioner.preprocess.prepare_image`, decoding options come from
:meth:`Captioner.options` (the model's recorded defaults, then what the user gave), and
:meth:`Captioner.caption_tensors` encodes and decodes a batch, with one set of options or one per image; from the
same encoder pass it also gives each image's top ImageNet tags when asked (see :mod:`captioner.tags`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.checkpoint import CaptionModel, load_model
from captioner.decoding import DecodingOptions, decode
from captioner.errors import CheckpointError
from captioner.fast_decoder import resolve_gemm_backend
from captioner.preprocess import DEFAULT_MAX_PIXELS, ImageSource, prepare_image
from captioner.runtime import AUTO, load_runtime
from captioner.tags import DEFAULT_NUM_TAGS, Tag, check_num_tags

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


class Captions(list[Caption]):
    """One image's captions, best first (a plain list of :class:`Caption`), and its ``tags``: the top ImageNet classes
    from the same encoder pass, most likely first (empty unless asked for, or when the model has no tags)."""

    def __init__(self, captions: Iterable[Caption] = (), tags: Iterable[Tag] = ()) -> None:
        super().__init__(captions)
        self.tags: list[Tag] = list(tags)


class Captioner:
    """A loaded model ready to caption images."""

    def __init__(
        self, model: CaptionModel, device: str | torch.device = "cpu", runtime: str | None = AUTO,
        decoder_precision: str = "float32",
    ) -> None:
        self.model = model.to(device)
        self.device = torch.device(device)
        self.vocab = model.vocab
        self.preprocess_config = model.preprocess
        # Fail here, not at the first request, where the precision cannot run (int8 needs ONNX Runtime on a CPU).
        resolve_gemm_backend("auto", self.device, next(model.decoder.parameters()).dtype, decoder_precision)
        self.decoder_precision = decoder_precision
        # The encoder in the chosen inference runtime (captioner.runtime); the decoder steps through decoding.decode
        # (its products in ONNX Runtime where installed, in decoder_precision).
        self.encode = load_runtime(model.encoder, model.preprocess.size, runtime, self.device)

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        encoder_weights: str | Path | None = None,
        allow_download: bool = True,
        runtime: str | None = AUTO,
        decoder_precision: str = "float32",
    ) -> Captioner:
        """Load a model directory (the bundled default model when ``path`` is None).

        ``runtime`` runs the encoder: "torch", "openvino", "onnxruntime" or "auto" (the fastest installed one).
        ``decoder_precision``: "float32" (the default; the reference's captions), "bfloat16" (the decoder's
        products in bfloat16: CPUs with AMX or AVX-512 BF16, GPUs) or "int8" (in int8, ONNX Runtime on the CPU):
        faster, a few captions change; see the README's "Decoder precision".
        """
        if path is None:
            path = DEFAULT_MODEL_DIR
            if not (path / "config.json").is_file():
                raise CheckpointError(f"the bundled default model is missing from {path}; pass a model directory")
        return cls(load_model(path, device, encoder_weights, allow_download), device, runtime, decoder_precision)

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
        num_tags: int = 0,
    ) -> list[Captions]:
        """Caption one image or a list of images (paths, bytes or PIL images): per image, captions best first, and
        with ``num_tags`` its top tags (``.tags``).

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
        return self.caption_tensors(batch, options, num_tags)

    def caption_tensors(
        self, batch: torch.Tensor, options: DecodingOptions | Sequence[DecodingOptions], num_tags: int = 0
    ) -> list[Captions]:
        """Caption preprocessed images (B, 3, H, W): the one batched entry point of every door.

        ``options`` is one set for the whole batch or one per image (the service's micro-batches mix requests):
        the encoder runs once on the batch, then :func:`captioner.decoding.decode` once per distinct options.
        ``num_tags``: also the ``num_tags`` top tags of each image, from the same feature grid (no second pass).
        """
        check_num_tags(num_tags)
        if batch.size(0) == 0:
            return []
        with torch.inference_mode():
            grid = self.encode(batch.to(self.device, non_blocking=True))
            results = decode(self.model.decoder, grid.float(), self.vocab, options, self.decoder_precision)
            tags = self._tag_grid(grid, num_tags)
        return [
            Captions(
                (Caption(self.vocab.decode(h.tokens), [self.vocab.words[t] for t in h.tokens], h.log_prob, h.score)
                 for h in hyps),
                image_tags,
            )
            for hyps, image_tags in zip(results, tags, strict=True)
        ]

    @property
    def has_tags(self) -> bool:
        """Whether the model tags images: its encoder's ImageNet classifier is known (see :mod:`captioner.tags`)."""
        return self.model.tagger is not None

    def tags(self, images: ImageSource | Sequence[ImageSource], k: int = DEFAULT_NUM_TAGS) -> list[list[Tag]]:
        """Tags only, without captions: the ``k`` most likely ImageNet classes of one image or a list of images, most
        likely first; an empty list per image when the model has no tags."""
        check_num_tags(k)
        images = _image_list(images)
        if not images:
            return []
        batch = torch.stack([self.load_tensor(image) for image in images])
        with torch.inference_mode():
            return self._tag_grid(self.encode(batch.to(self.device, non_blocking=True)), k)

    def _tag_grid(self, grid: torch.Tensor, k: int) -> list[list[Tag]]:
        """The top ``k`` tags of each encoder feature grid (B, C, h, w); empty lists without a head or with k = 0."""
        if self.model.tagger is None or k == 0:
            return [[] for _ in range(len(grid))]
        return self.model.tagger.top_k(grid, k)


def _image_list(images: ImageSource | Sequence[ImageSource]) -> list[ImageSource]:
    """One image source, or a sequence of them, as a list."""
    if isinstance(images, (str, Path, bytes, bytearray, memoryview)) or not isinstance(images, Sequence):
        return [images]
    return list(images)
