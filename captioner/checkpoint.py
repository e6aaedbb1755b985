"""Model directories: ``model.safetensors`` (tensors) + ``config.json`` (everything else).

config.json records the architecture, the encoder's name and weights sha256, the preprocessing, the vocabulary,
default decoding options, training metadata, metrics and the format version. The encoder's pretrained weights are
referenced by hash, not copied, unless they were fine-tuned or are not a known pretrained file (then they are
stored under ``encoder.`` in the safetensors file). The tags head (:mod:`captioner.tags`) follows the encoder: taken
from the same verified pretrained file, or stored under ``tags.`` beside a stored encoder. Loading never unpickles
and checks that everything agrees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from captioner.atomic import atomic_write_dir
from captioner.encoder import BACKBONES, Encoder, build_encoder, sha256_file
from captioner.errors import CheckpointError
from captioner.model import CaptionDecoder, DecoderConfig
from captioner.preprocess import PreprocessConfig
from captioner.tags import TagHead, pretrained_head
from captioner.vocabulary import Vocabulary

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class CaptionModel:
    """Everything needed to caption: encoder, decoder, vocabulary, preprocessing and the config it came with."""

    encoder: Encoder
    decoder: CaptionDecoder
    vocab: Vocabulary
    preprocess: PreprocessConfig
    name: str = "captioner"
    version: str = "0"
    decoding: dict[str, Any] = field(default_factory=dict)  # default DecodingOptions fields
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    tagger: TagHead | None = None  # the encoder's ImageNet classifier, for tags; None: the model has no tags

    def to(self, device: str | torch.device) -> CaptionModel:
        self.encoder.to(device)
        self.decoder.to(device)
        if self.tagger is not None:
            self.tagger.to(device)
        return self


def save_model(model: CaptionModel, path: str | Path, half_precision: bool = False) -> Path:
    """Write ``model`` to the directory ``path`` atomically (a crash leaves the previous version intact).

    ``half_precision`` stores floating-point tensors as float16 (half the size; they are float32 again once loaded).
    """
    encoder = model.encoder

    def stored(value: torch.Tensor) -> torch.Tensor:
        value = value.detach().cpu().contiguous()
        return value.half() if half_precision and value.is_floating_point() else value

    store_encoder = encoder.fine_tune_blocks > 0 or encoder.weights_sha256 is None
    tensors = {f"decoder.{k}": stored(v) for k, v in model.decoder.state_dict().items()}
    if store_encoder:
        tensors |= {f"encoder.{k}": stored(v) for k, v in encoder.blocks.state_dict().items()}
        if model.tagger is not None:  # a referenced pretrained encoder brings its head; a stored one stores it
            tensors |= {f"tags.{k}": stored(v) for k, v in model.tagger.state_dict().items()}
    if len(model.vocab) != model.decoder.config.vocab_size:
        raise CheckpointError(
            f"vocabulary has {len(model.vocab)} words but the decoder {model.decoder.config.vocab_size}"
        )
    config = {
        "format_version": FORMAT_VERSION,
        "name": model.name,
        "version": model.version,
        "encoder": {
            "name": encoder.name,
            "weights_sha256": encoder.weights_sha256,
            "stored": store_encoder,
            "fine_tune_blocks": encoder.fine_tune_blocks,
        },
        "preprocess": model.preprocess.to_json(),
        "decoder": model.decoder.config.to_json(),
        "vocabulary": model.vocab.to_json(),
        "decoding": model.decoding,
        "training": model.training,
        "metrics": model.metrics,
    }

    def fill(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format_version": str(FORMAT_VERSION)})
        config["weights_sha256"] = sha256_file(tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")

    return atomic_write_dir(path, fill)


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed config.json of a model directory, with a clear error when it is missing or malformed."""
    file = Path(path) / CONFIG_FILE
    if not Path(path).is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{file} is missing") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file} has format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}")
    return config


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    encoder_weights: str | Path | None = None,
    allow_download: bool = True,
) -> CaptionModel:
    """Load and verify a model directory written by :func:`save_model`."""
    path = Path(path)
    config = read_config(path)
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise CheckpointError(f"{weights_file} is missing")
    digest = sha256_file(weights_file)
    if digest != config.get("weights_sha256"):
        raise CheckpointError(
            f"{weights_file} has sha256 {digest} but config.json records {config.get('weights_sha256')}: "
            "the file is corrupted or does not belong to this config"
        )
    try:
        vocab = Vocabulary.from_json(config["vocabulary"])
        decoder_config = DecoderConfig(**config["decoder"])
        preprocess = PreprocessConfig.from_json(config["preprocess"])
        enc = config["encoder"]
        encoder_name = enc["name"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE} is inconsistent: {exc}") from exc
    if encoder_name not in BACKBONES:
        raise CheckpointError(f"unknown encoder {encoder_name!r} in {path / CONFIG_FILE}")
    if decoder_config.vocab_size != len(vocab):
        raise CheckpointError(f"decoder vocab_size {decoder_config.vocab_size} != vocabulary size {len(vocab)}")
    if decoder_config.feature_dim != BACKBONES[encoder_name].channels:
        raise CheckpointError(
            f"decoder feature_dim {decoder_config.feature_dim} != {encoder_name} channels "
            f"{BACKBONES[encoder_name].channels}"
        )
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_file} is not a valid safetensors file: {exc}") from exc

    decoder = CaptionDecoder(decoder_config)
    _load_prefixed(decoder, tensors, "decoder.", weights_file)
    tagger = None
    if enc.get("stored"):
        encoder = Encoder(encoder_name, int(enc.get("fine_tune_blocks", 0)))
        _load_prefixed(encoder.blocks, tensors, "encoder.", weights_file)
        encoder.weights_sha256 = enc.get("weights_sha256")
        if any(key.startswith("tags.") for key in tensors):
            tagger = TagHead(encoder.channels)
            _load_prefixed(tagger, tensors, "tags.", weights_file)
    else:
        encoder = build_encoder(encoder_name, weights_path=encoder_weights, allow_download=allow_download)
        if encoder.weights_sha256 != enc.get("weights_sha256"):
            raise CheckpointError(
                f"encoder weights have sha256 {encoder.weights_sha256}, but the model was trained with "
                f"{enc.get('weights_sha256')}"
            )
        tagger = pretrained_head(encoder_name, encoder_weights)  # the same file, found and verified the same way
    encoder.eval()
    decoder.eval()
    model = CaptionModel(
        encoder,
        decoder,
        vocab,
        preprocess,
        name=str(config.get("name", path.name)),
        version=str(config.get("version", "0")),
        decoding=dict(config.get("decoding") or {}),
        training=dict(config.get("training") or {}),
        metrics=dict(config.get("metrics") or {}),
        tagger=tagger.eval() if tagger is not None else None,
    )
    return model.to(device)


def _load_prefixed(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, file: Path) -> None:
    """Load the ``prefix``-ed tensors into ``module``, naming any missing, unexpected or mis-shaped tensor."""
    state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{file}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise CheckpointError(
                f"{file}: tensor {prefix}{key} has shape {tuple(state[key].shape)}, expected {tuple(value.shape)}"
            )
    module.load_state_dict(state)
