"""Tags: what the encoder, an ImageNet classifier, sees in the image.

Every pretrained encoder is an ImageNet classifier whose classifier was cut off to get the feature grid. Putting it
back (global average pool of the grid, the classifier's linear layer, softmax) names the image's most likely
ImageNet classes, from the grid the captioner computes anyway: no second encoder pass, about a million
multiply-adds per image, and it works with whatever computes the grid.

Where a model's head comes from (see :func:`captioner.checkpoint.load_model`): a model directory whose encoder is
stored (fine-tuned, or not a known pretrained file) stores its head beside it (``tags.*`` tensors); a frozen
pretrained encoder, referenced by the hash of its weights file, takes its head from that same verified file. A
model with neither has no tags.

Labels are ImageNet-1k's 1,000 class names as torchvision ships them (offline, in class-index order).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from captioner.encoder import get_backbone, resolve_weights
from captioner.errors import CheckpointError

DEFAULT_NUM_TAGS = 5  # tags per image in every door


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in class-index order (torchvision's list, offline)."""
    # Imported when first needed: torchvision's package import costs every command seconds (torch._dynamo).
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)


def __getattr__(name: str) -> object:
    """``IMAGENET_LABELS``, read lazily (see :func:`imagenet_labels`)."""
    if name == "IMAGENET_LABELS":
        return imagenet_labels()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Tag:
    """One ImageNet class the image likely shows."""

    label: str  # human-readable class name, e.g. "espresso"
    probability: float  # the classifier's softmax probability, over all 1,000 classes
    index: int  # ImageNet-1k class index (0-999)

    def to_json(self) -> dict[str, str | float]:
        """``{"label", "probability"}``, the probability rounded to 4 decimals, as every door writes it."""
        return {"label": self.label, "probability": round(self.probability, 4)}


def check_num_tags(k: int) -> None:
    """Raise ValueError for a negative number of tags (0 means none), whether or not the model has tags."""
    if k < 0:
        raise ValueError(f"the number of tags must be 0 or more, got {k}")


class TagHead(nn.Module):
    """Global average pool + linear classifier + softmax over a feature grid (B, C, h, w)."""

    def __init__(self, channels: int, labels: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.labels = imagenet_labels() if labels is None else labels
        self.classifier = nn.Linear(channels, len(self.labels))

    def forward(self, grid: Tensor) -> Tensor:
        """Class probabilities (B, classes), in float32 whatever the grid's dtype."""
        pooled = grid.float().mean(dim=(2, 3))
        return self.classifier(pooled).softmax(dim=-1)

    def top_k(self, grid: Tensor, k: int = DEFAULT_NUM_TAGS) -> list[list[Tag]]:
        """Per image, the ``k`` most probable classes, most probable first (``k`` is capped at the class count)."""
        check_num_tags(k)
        k = min(k, len(self.labels))
        with torch.inference_mode():
            top = self(grid).topk(k, dim=-1)
        return [
            [Tag(self.labels[i], p, i) for p, i in zip(probs, indices, strict=True)]
            for probs, indices in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]


def head_from_state(state: Mapping[str, Tensor], prefix: str, channels: int, source: str | Path) -> TagHead:
    """A :class:`TagHead` from the ``{prefix}.weight`` / ``{prefix}.bias`` tensors of a state dict."""
    try:
        weight, bias = state[f"{prefix}.weight"], state[f"{prefix}.bias"]
    except KeyError as exc:
        raise CheckpointError(f"{source} has no classifier tensor {exc} for tags") from exc
    head = TagHead(channels)
    expected = tuple(head.classifier.weight.shape)
    if tuple(weight.shape) != expected or tuple(bias.shape) != expected[:1]:
        raise CheckpointError(
            f"{source}: classifier {prefix} has shapes {tuple(weight.shape)} / {tuple(bias.shape)}, expected "
            f"{expected} / {expected[:1]} (ImageNet's {len(imagenet_labels())} classes x {channels} channels)"
        )
    head.classifier.load_state_dict({"weight": weight.float(), "bias": bias.float()})
    return head.eval()


def pretrained_head(
    encoder_name: str, weights_path: str | Path | None = None, allow_download: bool = False
) -> TagHead | None:
    """The ImageNet classifier of encoder ``encoder_name``'s pretrained weights file, found and sha256-verified
    exactly as the encoder's own weights are (:func:`captioner.encoder.resolve_weights`); None when the backbone's
    file has no known classifier."""
    backbone = get_backbone(encoder_name)
    if not backbone.head:
        return None
    file, _digest = resolve_weights(encoder_name, weights_path, allow_download)
    state = torch.load(file, map_location="cpu", weights_only=True)
    return head_from_state(state, backbone.head, backbone.channels, file)
