"""Model directories: ``model.safetensors`` (tensors) + ``config.json`` (everything else).

config.json records the architecture, the encoder's name and weights sha256, the preprocessing, the vocabulary,
default decoding options, training metadata, metrics and the format version. The encoder's pretrained weights are
referenced by hash, not copied, unless they were fine-tuned or are not a known pretrained file (then they are
stored under ``encoder.`` in the safetensors file). The tags head (:mod:`captioner.tags`) follows the encoder: taken
from the same verified pretrained file, or stored under ``tags.`` beside a stored encoder. Loading never unpickles
and checks that everything agrees.

An ensemble directory (:mod:`captioner.ensemble`, built by :func:`ensemble_of`) is the same format with several
decoders over the one encoder: config.json lists their architectures under ``decoders`` (in place of ``decoder``)
and the one safetensors file holds member ``i``'s tensors under ``decoders.<i>.`` (in place of ``decoder.``), so
the one sha256 check covers every member.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from captioner.atomic import atomic_write_dir
from captioner.encoder import BACKBONES, Encoder, build_encoder, sha256_file
from captioner.ensemble import DecoderEnsemble, decoders_of
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
    decoder: CaptionDecoder | DecoderEnsemble  # an ensemble's members all read the one encoder's grid
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
    decoders = _decoders_by_prefix(model.decoder)
    tensors = {f"{prefix}{k}": stored(v) for prefix, d in decoders.items() for k, v in d.state_dict().items()}
    if store_encoder:
        tensors |= {f"encoder.{k}": stored(v) for k, v in encoder.blocks.state_dict().items()}
        if model.tagger is not None:  # a referenced pretrained encoder brings its head; a stored one stores it
            tensors |= {f"tags.{k}": stored(v) for k, v in model.tagger.state_dict().items()}
    for decoder in decoders.values():
        if len(model.vocab) != decoder.config.vocab_size:
            raise CheckpointError(
                f"vocabulary has {len(model.vocab)} words but the decoder {decoder.config.vocab_size}"
            )
    # One decoder: "decoder" (as ever); an ensemble: "decoders", its members' architectures in order.
    decoder_key, decoder_json = (
        ("decoders", [d.config.to_json() for d in decoders.values()]) if isinstance(model.decoder, DecoderEnsemble)
        else ("decoder", model.decoder.config.to_json())
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
        decoder_key: decoder_json,
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
        decoder_configs = _decoder_configs(config)
        preprocess = PreprocessConfig.from_json(config["preprocess"])
        enc = config["encoder"]
        encoder_name = enc["name"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path / CONFIG_FILE} is inconsistent: {exc}") from exc
    if encoder_name not in BACKBONES:
        raise CheckpointError(f"unknown encoder {encoder_name!r} in {path / CONFIG_FILE}")
    for decoder_config in decoder_configs.values():
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

    decoders = {prefix: CaptionDecoder(decoder_config) for prefix, decoder_config in decoder_configs.items()}
    for prefix, member in decoders.items():
        _load_prefixed(member, tensors, prefix, weights_file)
    decoder = DecoderEnsemble(list(decoders.values())) if "decoders" in config else decoders["decoder."]
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


def ensemble_of(models: Sequence[CaptionModel], sources: Sequence[str] | None = None) -> CaptionModel:
    """One model whose decoder is the :class:`DecoderEnsemble` of ``models``' decoders, over their one encoder.

    A member that is itself an ensemble brings each of its decoders. The encoder, tags head, preprocessing,
    vocabulary, name, version and decoding defaults are the first model's; ``training`` records each member's name,
    version, training and metrics under ``members``, one record per decoder (an ensemble brings its own records);
    with ``sources`` (one per model, e.g. the directories they were read from) each record also gets a ``source``
    (a brought record keeps its own); ``metrics`` starts empty (the ensemble's are not measured yet).
    Raises :class:`CheckpointError`, naming the member (1-based) and what differs, unless every model has the same
    encoder (name, pretrained weights' sha256, fine-tuned blocks and every weight), preprocessing and vocabulary.
    """
    if not models:
        raise CheckpointError("an ensemble needs at least one model")
    if sources is not None and len(sources) != len(models):
        raise ValueError(f"{len(models)} models but {len(sources)} sources")
    first = models[0]
    for number, model in enumerate(models[1:], start=2):
        _check_same_encoder(first, model, number)
        if model.preprocess != first.preprocess:
            raise CheckpointError(
                f"member {number} preprocesses images as {model.preprocess}, member 1 as {first.preprocess}: "
                "ensemble members share the encoder's input"
            )
        if model.vocab != first.vocab:
            a, b = first.vocab.words, model.vocab.words
            index = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
            raise CheckpointError(
                f"member {number} has another vocabulary ({len(b)} words, member 1 {len(a)}; first difference at id "
                f"{index}): ensemble members must share the vocabulary"
            )
    members = [member for model in models for member in decoders_of(model.decoder)]
    provenance = []  # one record per decoder, as ``members``: an ensemble brings its members' records too
    for m, source in zip(models, sources or [None] * len(models), strict=True):
        records = m.training.get("members") or [
            {"name": m.name, "version": m.version, "training": m.training, "metrics": m.metrics}]
        if source is not None:
            records = [{**record, "source": record.get("source", str(source))} for record in records]
        provenance += records
    return CaptionModel(
        first.encoder, DecoderEnsemble(members), first.vocab, first.preprocess, name=first.name,
        version=first.version, decoding=dict(first.decoding), training={"members": provenance}, metrics={},
        tagger=first.tagger,
    )


def _check_same_encoder(first: CaptionModel, model: CaptionModel, number: int) -> None:
    """Raise unless ``model``'s encoder is ``first``'s: same name, recorded weights and every tensor equal."""
    a, b = first.encoder, model.encoder
    for what, mine, theirs in (
        ("name", a.name, b.name),
        ("pretrained weights sha256", a.weights_sha256, b.weights_sha256),
        ("fine-tuned blocks", a.fine_tune_blocks, b.fine_tune_blocks),
    ):
        if mine != theirs:
            raise CheckpointError(
                f"member {number}'s encoder has {what} {theirs!r}, member 1's {mine!r}: ensemble members share one "
                "encoder"
            )
    theirs_state = b.blocks.state_dict()
    for key, value in a.blocks.state_dict().items():
        if not torch.equal(value.cpu(), theirs_state[key].cpu()):
            raise CheckpointError(
                f"member {number}'s encoder weights differ from member 1's (tensor {key}): ensemble members share "
                "one encoder (train them on the same frozen encoder)"
            )


def _decoders_by_prefix(decoder: CaptionDecoder | DecoderEnsemble) -> dict[str, CaptionDecoder]:
    """A model's decoders by the prefix of their tensors: ``decoder.`` alone, or ``decoders.<i>.`` per member."""
    if isinstance(decoder, DecoderEnsemble):
        return {f"decoders.{i}.": member for i, member in enumerate(decoder.members)}
    return {"decoder.": decoder}


def _decoder_configs(config: dict[str, Any]) -> dict[str, DecoderConfig]:
    """The architectures config.json records, by tensor prefix (:func:`_decoders_by_prefix`'s layout)."""
    if "decoders" not in config:
        return {"decoder.": DecoderConfig(**config["decoder"])}
    members = config["decoders"]
    if "decoder" in config or not isinstance(members, list) or not members:
        raise ValueError("'decoders' must be a non-empty list of decoder configs, in place of 'decoder'")
    return {f"decoders.{i}.": DecoderConfig(**member) for i, member in enumerate(members)}


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
