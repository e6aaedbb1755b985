"""``decode``'s bookkeeping, exactly: every hypothesis' score, the order of the n-best, dead beams, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from captioner.decoding import DecodingOptions, decode

MODEL = tiny_model(seed=21)
with torch.no_grad():
    MODEL.decoder.classifier.weight.mul_(8.0)  # sharper: captions end at different lengths
GRID = torch.randn(5, MODEL.encoder.channels, 2, 2, generator=torch.Generator().manual_seed(21)).abs()


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
@pytest.mark.parametrize("penalty", [0.0, 0.5, 1.0, 2.0])
def test_score_is_log_prob_over_length_to_the_penalty(strategy: str, penalty: float) -> None:
    options = DecodingOptions(strategy=strategy, beam_size=4, num_captions=4 if strategy == "beam" else 1,
                              max_length=12, length_penalty=penalty)
    results = decode(MODEL.decoder, GRID, MODEL.vocab, options)
    lengths = set()
    for hyps in results:
        assert len(hyps) == options.num_captions
        for h in hyps:
            length = len(h.tokens) + 1  # the words and <end>
            lengths.add(length)
            assert h.score == pytest.approx(h.log_prob / length**penalty, rel=1e-5)
            assert h.log_prob < 0 and 1 <= len(h.tokens) <= 12
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert len(lengths) > 1  # the check saw captions of several lengths


def test_a_beam_wider_than_the_vocabulary_returns_only_real_captions() -> None:
    vocab = MODEL.vocab
    words = len(vocab) - 4  # <pad>, <start>, <end> and <unk> are never emitted
    options = DecodingOptions(beam_size=len(vocab) + 3, num_captions=len(vocab) + 3, max_length=1)
    for hyps in decode(MODEL.decoder, GRID[:2], vocab, options):
        assert len(hyps) == words  # every one-word caption once; the dead extra beams are left out
        assert sorted(h.tokens[0] for h in hyps) == sorted(set(range(len(vocab))) - {0, 1, 2, 3})
        assert all(h.log_prob > -float("inf") for h in hyps)


def test_one_options_per_image_or_one_for_all() -> None:
    greedy, beam = DecodingOptions(strategy="greedy"), DecodingOptions(beam_size=3, num_captions=2)
    mixed = decode(MODEL.decoder, GRID, MODEL.vocab, [greedy, beam, greedy, beam, beam])
    assert [len(h) for h in mixed] == [1, 2, 1, 2, 2]
    assert [h[0].tokens for h in mixed] == [
        decode(MODEL.decoder, GRID[i : i + 1], MODEL.vocab, o)[0][0].tokens
        for i, o in enumerate([greedy, beam, greedy, beam, beam])]
    with pytest.raises(ValueError) as error:
        decode(MODEL.decoder, GRID, MODEL.vocab, [greedy, beam])
    assert str(error.value) == "5 images but 2 decoding options"
