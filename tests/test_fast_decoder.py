"""The decoder's inference fast path (captioner/fast_decoder.py) computes the same step as ``CaptionDecoder.step``."""

from __future__ import annotations

import gc
import itertools
import weakref

import pytest
import torch
from conftest import tiny_model

import captioner.fast_decoder as fast_module
from captioner.decoding import DecodingOptions, _decode_group, decode
from captioner.fast_decoder import FastDecoder, fast_decoder
from captioner.model import CaptionDecoder, DecoderConfig

CONFIGS = list(itertools.product(("lstm", "gru", "rnn"), ("init", "attention"), (1, 2)))


def small_decoder(cell: str, conditioning: str, layers: int, seed: int = 0) -> CaptionDecoder:
    torch.manual_seed(seed)
    config = DecoderConfig(vocab_size=40, feature_dim=24, embed_dim=8, hidden_dim=16, attention_dim=12,
                           num_layers=layers, cell=cell, conditioning=conditioning)
    return CaptionDecoder(config).eval()


@pytest.mark.parametrize(("cell", "conditioning", "layers"), CONFIGS, ids=["-".join(map(str, c)) for c in CONFIGS])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 1], ids=["one-chunk", "chunk-per-image"])
def test_fast_step_equals_the_reference_step(
    cell: str, conditioning: str, layers: int, chunk_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several steps of 3 images x 2 beams: logits and every state tensor agree within 1e-5."""
    monkeypatch.setattr(fast_module, "ATTENTION_CHUNK_BYTES", chunk_bytes)
    decoder = small_decoder(cell, conditioning, layers)
    fast = FastDecoder(decoder)
    grid = torch.randn(3, 24, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        memory, state = decoder.memory_and_state(grid)
        fast_memory, fast_state = fast.memory_and_state(grid)
        state = fast_state = tuple(s.repeat_interleave(2, dim=0) for s in state)
        tokens = torch.randint(0, 40, (6,), generator=torch.Generator().manual_seed(2))
        for _ in range(4):
            logits, state, _ = decoder.step(tokens, state, memory)
            fast_logits, fast_state, _ = fast.step(tokens, fast_state, fast_memory)
            torch.testing.assert_close(fast_logits, logits, atol=1e-5, rtol=0)
            for ours, theirs in zip(fast_state, state, strict=True):
                torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
            tokens = logits.argmax(dim=1)


@pytest.mark.parametrize(("cell", "conditioning"), [("lstm", "attention"), ("gru", "init"), ("rnn", "attention")])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_decode_with_the_fast_path_equals_the_reference(cell: str, conditioning: str, strategy: str) -> None:
    """decode() (fast path) and the search run on CaptionDecoder.step itself write the same captions."""
    model = tiny_model(conditioning=conditioning, cell=cell, num_layers=2, seed=3)
    decoder, vocab = model.decoder, model.vocab
    with torch.no_grad():
        decoder.classifier.weight.mul_(5.0)
    grid = torch.randn(5, 1280, 2, 2, generator=torch.Generator().manual_seed(4)) * 3.0
    options = DecodingOptions(strategy=strategy, beam_size=4 if strategy == "beam" else 1,
                              num_captions=4 if strategy == "beam" else 1, max_length=12,
                              length_penalty=1.0, no_repeat_ngram_size=3)
    fast = decode(decoder, grid, vocab, options)
    with torch.inference_mode():
        reference = _decode_group(decoder, grid, vocab, options)
    assert [[h.tokens for h in hs] for hs in fast] == [[h.tokens for h in hs] for hs in reference]
    for ours, theirs in zip(fast, reference, strict=True):
        assert [h.log_prob for h in ours] == pytest.approx([h.log_prob for h in theirs], abs=1e-4)


def test_tables_follow_the_weights() -> None:
    """The cached fast path is rebuilt after the weights change (an optimizer step, load_state_dict)."""
    decoder = small_decoder("lstm", "attention", 1)
    first = fast_decoder(decoder)
    assert fast_decoder(decoder) is first  # same weights: built once
    with torch.no_grad():
        decoder.embed.weight.add_(1.0)
    second = fast_decoder(decoder)
    assert second is not first
    torch.testing.assert_close(second.word_gates[3], decoder.cells[0].weight_ih[:, :8] @ decoder.embed.weight[3]
                               + decoder.cells[0].bias_ih + decoder.cells[0].bias_hh)
    decoder.load_state_dict(small_decoder("lstm", "attention", 1, seed=5).state_dict())
    assert fast_decoder(decoder) is not second


def test_training_mode_uses_the_decoder_itself() -> None:
    """Dropout is live in train mode, so there is no fast path: the decoder steps itself."""
    decoder = small_decoder("lstm", "attention", 1).train()
    assert fast_decoder(decoder) is decoder
    with pytest.raises(ValueError, match="eval mode"):
        FastDecoder(decoder)


@pytest.mark.parametrize(("cell", "conditioning", "layers"), [("lstm", "attention", 1), ("gru", "attention", 2),
                                                              ("rnn", "init", 1)])
def test_inactive_rows_skip_the_step(cell: str, conditioning: str, layers: int) -> None:
    """``active`` rows get the full step's logits and state; the others zeros and their old state."""
    decoder = small_decoder(cell, conditioning, layers)
    fast = FastDecoder(decoder)
    grid = torch.randn(2, 24, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        memory, state = fast.memory_and_state(grid)
        state = tuple(s.repeat_interleave(3, dim=0) + 0.1 * torch.arange(6.0).view(6, 1, 1) for s in state)
        tokens = torch.tensor([4, 5, 6, 7, 8, 9])
        active = torch.tensor([True, False, True, False, False, True])
        logits, new_state, _ = fast.step(tokens, state, memory)
        some_logits, some_state, _ = fast.step(tokens, state, memory, active=active)
    torch.testing.assert_close(some_logits[active], logits[active], atol=1e-5, rtol=0)
    assert not some_logits[~active].any()
    for before, full, partial in zip(state, new_state, some_state, strict=True):
        torch.testing.assert_close(partial[active], full[active], atol=1e-5, rtol=0)
        assert torch.equal(partial[~active], before[~active])


def test_weights_made_under_inference_mode_are_not_cached() -> None:
    """Inference tensors have no version counter: the fast path is built afresh each time, and still correct."""
    with torch.inference_mode():
        decoder = small_decoder("lstm", "attention", 1)
        first = fast_decoder(decoder)
        decoder.embed.weight.add_(1.0)
        second = fast_decoder(decoder)
    assert second is not first
    torch.testing.assert_close(second.word_gates[3], decoder.cells[0].weight_ih[:, :8] @ decoder.embed.weight[3]
                               + decoder.cells[0].bias_ih + decoder.cells[0].bias_hh)


def test_the_cache_does_not_keep_decoders_alive() -> None:
    """A decoder that is no longer used is freed with its tables (the cache holds it weakly)."""
    decoder = small_decoder("gru", "attention", 1)
    fast_decoder(decoder)
    alive = weakref.ref(decoder)
    del decoder
    gc.collect()
    assert alive() is None
