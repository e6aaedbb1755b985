"""Shared fixtures: tiny random-weight models so the suite runs in seconds on 2 CPU cores."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from captioner.checkpoint import CaptionModel, save_model
from captioner.encoder import build_encoder
from captioner.model import CaptionDecoder, DecoderConfig
from captioner.preprocess import PreprocessConfig
from captioner.vocabulary import Vocabulary

SHARED = Path(__file__).resolve().parents[2] / "shared"
FLICKR8K = SHARED / "data" / "flickr8k"
COCO_VAL = SHARED / "data" / "coco" / "captions_val2017.json"

TINY_CAPTIONS = [
    "a dog runs on the grass",
    "a black dog jumps over a log",
    "a cat sits on a red mat",
    "two children play in the snow",
    "a man rides a bike down the street",
    "a woman in a red dress walks on the beach",
]


def tiny_model(conditioning: str = "attention", cell: str = "lstm", num_layers: int = 1, seed: int = 0) -> CaptionModel:
    """A random-weight model: MobileNetV2 architecture (random init) at 64px, a small decoder."""
    torch.manual_seed(seed)
    vocab = Vocabulary.build(TINY_CAPTIONS, min_count=1)
    encoder = build_encoder("mobilenet_v2", pretrained=False)
    decoder = CaptionDecoder(
        DecoderConfig(len(vocab), encoder.channels, embed_dim=16, hidden_dim=32, attention_dim=16,
                      num_layers=num_layers, cell=cell, conditioning=conditioning, dropout=0.0)
    )
    return CaptionModel(encoder.eval(), decoder.eval(), vocab, PreprocessConfig(size=64), name="tiny", version="test")


def varied_tiny_model() -> CaptionModel:
    """The tiny model with its encoder's batch-norm statistics calibrated on noise, so that (unlike the plain tiny
    model, whose random-init features vanish) different images get different captions."""
    model = tiny_model()
    norms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: one batch sets the statistics exactly
        norm.train()
    torch.manual_seed(0)
    with torch.no_grad():
        model.encoder.blocks(torch.randn(16, 3, 64, 64))
    model.encoder.eval()
    return model


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    """Tests use tiny tensors: one thread is faster, and does not fight other processes on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _private_runtime_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Exported encoder graphs (captioner.runtime) go to a session directory, not the user's ~/.cache; child
    processes (the CLI, gunicorn) inherit it."""
    previous = os.environ.get("CAPTIONER_CACHE_DIR")
    os.environ["CAPTIONER_CACHE_DIR"] = str(tmp_path_factory.mktemp("captioner-cache"))
    yield
    if previous is None:
        os.environ.pop("CAPTIONER_CACHE_DIR", None)
    else:
        os.environ["CAPTIONER_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model directory (read-only use: copy it before modifying)."""
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model(tiny_model(), path)
    return path


@pytest.fixture(scope="session")
def flickr8k_dir() -> Path:
    """The real Flickr8k data beside the checkout; tests using it skip when it is absent."""
    if not (FLICKR8K / "Flickr8k.token.txt").is_file():
        pytest.skip("../shared/data/flickr8k is not available")
    return FLICKR8K
