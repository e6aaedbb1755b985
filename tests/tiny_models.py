"""Tiny random-weight models for the tests, each built once per process and handed out as fresh copies.

A plain module, not conftest.py: pytest re-executes conftest.py in every session, while this module stays
imported. Mutation testing (scripts/mutation.sh) runs one pytest session per mutant, each in a process forked from
mutmut's fork server after it collected the tests, so what is built here before the fork is not built again by
each of ~1,500 mutants.
"""

from __future__ import annotations

import copy
import functools
import os
import resource

import torch

from captioner.checkpoint import CaptionModel
from captioner.encoder import build_encoder
from captioner.model import CaptionDecoder, DecoderConfig
from captioner.preprocess import PreprocessConfig
from captioner.vocabulary import Vocabulary

TINY_CAPTIONS = [
    "a dog runs on the grass",
    "a black dog jumps over a log",
    "a cat sits on a red mat",
    "two children play in the snow",
    "a man rides a bike down the street",
    "a woman in a red dress walks on the beach",
]


def tiny_model(conditioning: str = "attention", cell: str = "lstm", num_layers: int = 1, seed: int = 0) -> CaptionModel:
    """A random-weight model: MobileNetV2 architecture (random init) at 64px, a small decoder.

    A fresh copy on every call (callers may train or edit it) of a model built once per argument set: building a
    MobileNetV2 costs ~0.3 s of Python module construction, a copy ~0.03 s. The global torch RNG is left as a
    fresh build leaves it, so that what a test draws after this call does not depend on the cache."""
    return _fresh_copy(*_built_tiny_model(conditioning, cell, num_layers, seed))


def _fresh_copy(model: CaptionModel, rng_after_build: torch.Tensor) -> CaptionModel:
    """A copy of a built model, with the torch RNG as its build left it."""
    torch.set_rng_state(rng_after_build)
    return copy.deepcopy(model)


@functools.cache
def _built_tiny_model(conditioning: str, cell: str, num_layers: int, seed: int) -> tuple[CaptionModel, torch.Tensor]:
    torch.manual_seed(seed)
    vocab = Vocabulary.build(TINY_CAPTIONS, min_count=1)
    encoder = build_encoder("mobilenet_v2", pretrained=False)
    decoder = CaptionDecoder(
        DecoderConfig(len(vocab), encoder.channels, embed_dim=16, hidden_dim=32, attention_dim=16,
                      num_layers=num_layers, cell=cell, conditioning=conditioning, dropout=0.0)
    )
    model = CaptionModel(encoder.eval(), decoder.eval(), vocab, PreprocessConfig(size=64), name="tiny", version="test")
    return model, torch.get_rng_state()


def varied_tiny_model() -> CaptionModel:
    """The tiny model with its encoder's batch-norm statistics calibrated on noise, so that (unlike the plain tiny
    model, whose random-init features vanish) different images get different captions. A fresh copy, as above."""
    return _fresh_copy(*_built_varied_tiny_model())


@functools.cache
def _built_varied_tiny_model() -> tuple[CaptionModel, torch.Tensor]:
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
    return model, torch.get_rng_state()


def _prewarm() -> None:
    """Load, before any test runs, what the tests would each load in a fresh process: mutation testing
    (scripts/mutation.sh sets CAPTIONER_TEST_PREWARM) imports this module once in mutmut's fork server and forks a
    process per mutant from it, so what is loaded here is not paid again by each of ~1,500 mutants (torchvision's
    import alone is ~4 s, building these models ~4 s). One torch thread, so that no thread pool exists to be forked.

    It also caps the heap of those processes: a mutant that computes a giant resize (``size * min(w, h)`` for
    ``size / min(w, h)``) kept Pillow allocating for 85 s until the process was killed; with the cap the
    allocation fails at once and the test fails."""
    torch.set_num_threads(1)
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = 4 << 30 if hard == resource.RLIM_INFINITY else min(4 << 30, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    import onnx  # noqa: F401  (the decoder's fast path builds its matrix-product graphs with these)
    import onnxruntime  # noqa: F401
    import torchvision  # noqa: F401
    from PIL import Image

    Image.init()  # every image plugin, as the first open of an unusual format would
    for seed in range(22):  # the seeds the decoding tests use
        _built_tiny_model("attention", "lstm", 1, seed)
    _built_varied_tiny_model()


if os.environ.get("CAPTIONER_TEST_PREWARM"):
    _prewarm()
