"""The Python API on a tiny random-weight model: input shapes, Caption fields, options, and the shipped samples."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from PIL import Image

import captioner.api as api
from captioner import Caption, Captioner, DecodingOptions
from captioner.decoding import decode
from captioner.errors import CheckpointError, NotAnImageError

SAMPLES = Path(api.__file__).parent / "samples"


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner(tiny_model())


def photo(colour: tuple[int, int, int], size: tuple[int, int] = (80, 60), fmt: str = "PNG") -> bytes:
    image = Image.new("RGB", size, colour)
    image.paste((255 - colour[0], colour[1] // 2, 255), (0, 0, size[0] // 2, size[1] // 3))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def assert_valid(caption: Caption, captioner: Captioner) -> None:
    assert isinstance(caption, Caption)
    assert caption.tokens and all(t in captioner.vocab.index for t in caption.tokens)
    assert not {"<pad>", "<start>", "<end>", "<unk>"} & set(caption.tokens)
    assert caption.text == " ".join(caption.tokens)
    assert isinstance(caption.log_prob, float) and caption.log_prob < 0
    assert caption.probability == pytest.approx(math.exp(caption.log_prob))


def test_single_image_gives_one_list(captioner: Captioner, tmp_path: Path) -> None:
    data = photo((200, 30, 30))
    (tmp_path / "a.png").write_bytes(data)
    sources = [data, tmp_path / "a.png", str(tmp_path / "a.png"), Image.open(io.BytesIO(data))]
    results = [captioner.caption(source) for source in sources]
    for result in results:
        assert len(result) == 1 and len(result[0]) == 1
        assert_valid(result[0][0], captioner)
    assert all(result == results[0] for result in results)


def test_list_of_images_gives_one_list_per_image(captioner: Captioner) -> None:
    images = [photo((200, 30, 30)), photo((20, 200, 30), (50, 90)), photo((30, 30, 200), fmt="JPEG")]
    together = captioner.caption(images, beam_size=3, num_captions=2)
    assert len(together) == 3
    for image, captions in zip(images, together, strict=True):
        assert len(captions) == 2
        for caption in captions:
            assert_valid(caption, captioner)
        assert captions[0].log_prob >= captions[1].log_prob
        (alone,) = captioner.caption(image, beam_size=3, num_captions=2)
        assert [c.tokens for c in alone] == [c.tokens for c in captions]
    assert captioner.caption(tuple(images), beam_size=3, num_captions=2) == together


def test_empty_list_gives_empty_list(captioner: Captioner) -> None:
    assert captioner.caption([]) == []


def test_greedy_and_limits(captioner: Captioner) -> None:
    (captions,) = captioner.caption(photo((90, 90, 90)), strategy="greedy", max_length=3)
    assert len(captions) == 1 and 1 <= len(captions[0].tokens) <= 3
    with pytest.raises(ValueError, match="num_captions"):
        captioner.caption(photo((90, 90, 90)), beam_size=2, num_captions=3)


def test_bad_image_raises_a_library_error(captioner: Captioner) -> None:
    with pytest.raises(NotAnImageError):
        captioner.caption([photo((1, 2, 3)), b"not an image"])


def test_options_use_the_model_defaults_then_overrides() -> None:
    model = tiny_model()
    model.decoding = {"beam_size": 5, "max_length": 7, "length_penalty": 0.5, "no_longer_an_option": 1}
    captioner = Captioner(model)
    assert captioner.options() == DecodingOptions(beam_size=5, max_length=7, length_penalty=0.5)
    assert captioner.options(beam_size=2, length_penalty=None) == DecodingOptions(
        beam_size=2, max_length=7, length_penalty=0.5
    )
    (captions,) = captioner.caption(photo((10, 120, 200)), num_captions=5)  # beam_size 5 comes from the model
    assert len(captions) == 5 and all(len(c.tokens) <= 7 for c in captions)


def test_caption_grids_and_tensors_agree(captioner: Captioner) -> None:
    images = [photo((200, 30, 30)), photo((30, 30, 200))]
    batch = torch.stack([captioner.load_tensor(image) for image in images])
    assert batch.shape == (2, 3, 64, 64)
    options = captioner.options(beam_size=2, num_captions=2)
    with torch.no_grad():
        grid = captioner.model.encoder(batch)
    # Grids (e.g. training's features cache) go straight to decode(), the function caption_tensors ends in.
    from_grids = [[(captioner.vocab.decode(h.tokens), h.log_prob, h.score) for h in hyps]
                  for hyps in decode(captioner.model.decoder, grid, captioner.vocab, options)]
    captions = captioner.caption_tensors(batch, options)
    assert [[(c.text, c.log_prob, c.score) for c in caps] for caps in captions] == from_grids
    assert captioner.caption_tensors(batch, options) == captioner.caption(images, beam_size=2, num_captions=2)
    # Per-image options (the service's mixed micro-batches) give each image what it would get alone.
    mixed = captioner.caption_tensors(batch, [captioner.options(strategy="greedy"), options])
    assert mixed == [captioner.caption_tensors(batch[:1], captioner.options(strategy="greedy"))[0], captions[1]]


def test_load_from_a_directory(tiny_model_dir: Path) -> None:
    captioner = Captioner.load(tiny_model_dir)
    assert (captioner.name, captioner.version) == ("tiny", "test")
    assert captioner.caption(photo((5, 5, 5))) == Captioner(tiny_model()).caption(photo((5, 5, 5)))


def test_missing_default_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(api, "DEFAULT_MODEL_DIR", tmp_path / "default")
    with pytest.raises(CheckpointError, match="bundled default model is missing"):
        Captioner.load()


def test_shipped_samples_are_small_licensed_photos(captioner: Captioner) -> None:
    samples = sorted(SAMPLES.glob("*.jpg"))
    assert len(samples) >= 3
    licences = (SAMPLES / "LICENSES.md").read_text()
    for sample in samples:
        assert sample.stat().st_size < 150_000
        assert f"`{sample.name}`" in licences
        with Image.open(sample) as image:
            assert image.format == "JPEG" and image.mode == "RGB" and min(image.size) >= 224
    assert not re.search(r"(?i)\bCC[ -]BY\b|non-?commercial", licences)
    results = captioner.caption(samples, beam_size=2)
    assert len(results) == len(samples)
    for (caption,) in results:
        assert_valid(caption, captioner)
