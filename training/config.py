"""Training configuration: a TOML file, then ``--set section.key=value`` overrides from the command line.

Every field has a default, so a config file only states what differs. The effective config is saved beside the
trained model, so a run can always be reproduced from its own output. Three sections are the library's own types,
so a model is built, fed and decoded with exactly what the file says: ``[model]`` is the decoder's
:class:`~captioner.model.DecoderConfig`, ``[preprocess]`` the :class:`~captioner.preprocess.PreprocessConfig` and
``[decoding]`` the :class:`~captioner.decoding.DecodingOptions` that validation uses and the model records as its
default. Their fields that a run derives (the vocabulary size, the encoder's channels and input normalisation) are
not in the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from captioner.decoding import DecodingOptions
from captioner.model import DecoderConfig
from captioner.preprocess import PreprocessConfig


@dataclass
class DataConfig:
    train_annotations: str = ""  # COCO-format captions file (see `captioner prepare`)
    val_annotations: str = ""  # used for model selection (CIDEr) and early stopping
    test_annotations: str = ""  # optional: scored once at the end, for the report only
    images: str = ""  # folder the annotation files' file_name entries are relative to
    min_word_count: int = 5
    max_caption_length: int = 30  # longer training captions are truncated (in words)
    max_images: int = 0  # use only the first N images of each split (a quick trial run); 0: all


@dataclass
class EncoderConfig:
    name: str = "mobilenet_v2"
    weights: str = ""  # explicit weights file; empty: hub cache, offline package, download
    fine_tune_blocks: int = 0  # > 0 trains the last blocks too (the cache then holds the frozen blocks' output)
    # A model directory whose encoder (fine-tuned, say) this run uses as it is, frozen: how a second decoder is
    # trained on a fine-tuned encoder, for an ensemble that shares it. Empty: the pretrained encoder.
    from_model: str = ""

    def __post_init__(self) -> None:
        if self.from_model and self.fine_tune_blocks:
            raise ValueError("encoder.from_model's encoder is used frozen: set encoder.fine_tune_blocks = 0")
        if self.from_model and self.weights:
            raise ValueError("encoder.weights names a pretrained file, but encoder.from_model brings its own encoder")


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    bucket_by_length: bool = True  # batches of similar caption lengths (less padding, faster epochs)
    lr: float = 4e-4
    encoder_lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    lr_schedule: str = "cosine"  # "cosine" (to lr_min_ratio * lr) or "constant" after warmup
    lr_min_ratio: float = 0.05
    grad_clip: float = 5.0
    label_smoothing: float = 0.0
    # Augmentation: each epoch, every training pair uses its image's grid or (with probability 1/2) the grid of the
    # mirrored image, from a second features cache.
    mirror_images: bool = False
    # > 0: validate and keep (best/) an exponential moving average of the decoder weights with this decay per step.
    # On the Flickr8k recipe (cosine schedule) 0.999 scored 0.9-1.8 dev CIDEr below the trained weights: left off.
    ema_decay: float = 0.0
    # > 0: scheduled sampling. The chance that an input word is the decoder's own sampled word instead of the
    # reference's rises linearly from 0 in the first epoch to this in the last (cross-entropy epochs).
    scheduled_sampling: float = 0.0
    attention_penalty: float = 1.0  # doubly stochastic attention regularisation (Show, Attend and Tell)
    tbptt: int = 0  # > 0: truncated backpropagation through time in chunks of this many steps
    seed: int = 0
    eval_every: int = 1  # epochs
    patience: int = 4  # evaluations without CIDEr improvement before stopping
    device: str = "auto"  # "auto": cuda when available
    amp: bool = True  # bfloat16 autocast on CUDA
    amp_on_cpu: bool = False  # bfloat16 autocast on CPU too (fast on CPUs with AVX-512 BF16 or AMX)
    cache_dir: str = "cache/features"
    cache_dtype: str = "float16"
    workers: int = 2
    threads: int = 0  # torch CPU threads; 0 keeps torch's default


@dataclass
class EvalConfig:
    """How validation runs (how it decodes is the ``[decoding]`` section)."""

    batch_size: int = 100
    max_images: int = 0  # 0: the whole validation split


@dataclass
class ScstConfig:
    epochs: int = 0  # > 0: self-critical sequence training on CIDEr-D after cross-entropy training
    lr: float = 2e-5
    samples: int = 5  # sampled captions per image
    batch_size: int = 50  # images per step
    max_length: int = 16
    # "greedy": the reward of the greedy caption (self-critical); "mean": the mean reward of the image's other samples
    baseline: str = "greedy"
    # The end of the sentence counts as a word in the reward, so captions that stop mid-phrase score low
    # (Rennie et al. 2017, appendix E)
    reward_end: bool = True


@dataclass
class OutputConfig:
    name: str = "captioner"
    version: str = "1"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)  # mean/std: the encoder's
    model: DecoderConfig = field(default_factory=lambda: DecoderConfig(vocab_size=0, feature_dim=0))
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    decoding: DecodingOptions = field(default_factory=DecodingOptions)
    scst: ScstConfig = field(default_factory=ScstConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every section's settable fields (the derived ones left out)."""
        sections = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {
            name: {k: v for k, v in values.items() if k not in DERIVED.get(name, ())}
            for name, values in sections.items()
        }

    def to_toml(self) -> str:
        """The config as TOML text (flat sections of scalars)."""
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


# Fields of the library's types that a run derives rather than reads: not settable, not saved.
DERIVED: dict[str, tuple[str, ...]] = {
    "model": ("vocab_size", "feature_dim"),  # from the vocabulary and the encoder
    "preprocess": ("mean", "std"),  # the encoder's input normalisation
}
# Config files written before the [decoding] section held its keys in [eval]; they still work there.
_DECODING_KEYS = {f.name for f in dataclasses.fields(DecodingOptions)}


def _apply(config: Config, data: dict[str, Any], source: str) -> None:
    for section_name, values in data.items():
        if not hasattr(config, section_name) or not isinstance(values, dict):
            raise ValueError(f"{source}: unknown config section [{section_name}]")
        if section_name == "eval":
            _apply(config, {"decoding": {k: v for k, v in values.items() if k in _DECODING_KEYS}}, source)
            values = {k: v for k, v in values.items() if k not in _DECODING_KEYS}
        section = getattr(config, section_name)
        known = [f.name for f in dataclasses.fields(section) if f.name not in DERIVED.get(section_name, ())]
        changes = {}
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)  # a typo: name the key that was meant
                hint = f"did you mean {section_name}.{close[0]}? " if close else ""
                raise ValueError(f"{source}: unknown key {section_name}.{key} ({hint}known: {', '.join(known)})")
            expected = type(getattr(section, key))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ValueError(f"{source}: {section_name}.{key} must be {expected.__name__}, got {value!r}")
            changes[key] = value
        try:  # the library's types check their own values (e.g. an unknown cell or strategy)
            setattr(config, section_name, dataclasses.replace(section, **changes))
        except ValueError as exc:
            raise ValueError(f"{source}: [{section_name}] {exc}") from exc


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file, then each ``section.key=value`` override (value in TOML syntax)."""
    config = Config()
    if path:
        with open(path, "rb") as f:
            _apply(config, tomllib.load(f), str(path))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"override {item!r} must look like section.key=value")
        section, name = key.strip().split(".", 1)
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # bare words are strings: --set model.cell=gru
        _apply(config, {section: {name: value}}, f"--set {item}")
    return config
