"""The decoder's inference fast path (captioner/fast_decoder.py) computes the same step as ``CaptionDecoder.step``."""

from __future__ import annotations

import gc
import importlib.util
import itertools
import weakref

import pytest
import torch
from conftest import tiny_model

import captioner.fast_decoder as fast_module
from captioner.decoding import DecodingOptions, _decode_group, decode
from captioner.fast_decoder import FastDecoder, Gemm, fast_decoder, resolve_gemm_backend
from captioner.model import CaptionDecoder, DecoderConfig

CONFIGS = list(itertools.product(("lstm", "gru", "rnn"), ("init", "attention"), (1, 2)))
HAS_ONNXRUNTIME = all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))
GEMMS = ["torch", pytest.param("onnxruntime", marks=pytest.mark.skipif(not HAS_ONNXRUNTIME,
                                                                      reason="onnxruntime is not installed"))]


def small_decoder(cell: str, conditioning: str, layers: int, seed: int = 0) -> CaptionDecoder:
    torch.manual_seed(seed)
    config = DecoderConfig(vocab_size=40, feature_dim=24, embed_dim=8, hidden_dim=16, attention_dim=12,
                           num_layers=layers, cell=cell, conditioning=conditioning)
    return CaptionDecoder(config).eval()


@pytest.mark.parametrize(("cell", "conditioning", "layers"), CONFIGS, ids=["-".join(map(str, c)) for c in CONFIGS])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 1], ids=["one-chunk", "chunk-per-image"])
@pytest.mark.parametrize("gemm", GEMMS)
def test_fast_step_equals_the_reference_step(
    cell: str, conditioning: str, layers: int, chunk_bytes: int, gemm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several steps of 3 images x 2 beams: logits and every state tensor agree within 1e-5, with either backend
    of the matrix products."""
    monkeypatch.setattr(fast_module, "ATTENTION_CHUNK_BYTES", chunk_bytes)
    decoder = small_decoder(cell, conditioning, layers)
    fast = FastDecoder(decoder, gemm)
    assert fast.gemm == gemm
    grid = torch.randn(3, 24, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        memory, state = decoder.memory_and_state(grid)
        fast_memory, fast_state = fast.memory_and_state(grid)
        for ours, theirs in zip(fast_state, state, strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
        if conditioning == "attention":  # the keys come doubled (for sigmoid(2x)), the features as they are
            assert torch.equal(fast_memory[0], memory[0])
            torch.testing.assert_close(fast_memory[1], 2 * memory[1], atol=1e-5, rtol=0)
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


@pytest.mark.parametrize("gemm", GEMMS)
@pytest.mark.parametrize("rows", [0, 1, 7])
def test_gemm_is_the_matrix_product(gemm: str, rows: int) -> None:
    """``Gemm`` adds its bias, or the addend given with the call, to ``x @ weight``, on every backend."""
    generator = torch.Generator().manual_seed(6)
    weight, bias = torch.randn(24, 10, generator=generator), torch.randn(10, generator=generator)
    x, addend = torch.randn(rows, 24, generator=generator), torch.randn(rows, 10, generator=generator)
    with torch.inference_mode():
        with_bias = Gemm(weight, bias, gemm)(x)
        with_addend = Gemm(weight, None, gemm)(x.t().contiguous().t(), addend)  # non-contiguous input too
    torch.testing.assert_close(with_bias, x @ weight + bias, atol=1e-5, rtol=0)
    torch.testing.assert_close(with_addend, x @ weight + addend, atol=1e-5, rtol=0)
    assert with_bias.shape == with_addend.shape == (rows, 10)


def test_gemm_backend_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """"auto" is ONNX Runtime for float32 on CPU where it is installed, but not on Intel CPUs (MKL is as fast there),
    torch otherwise; unknown or impossible choices raise."""
    cpu = torch.device("cpu")
    vendor = fast_module.cpu_vendor()
    assert isinstance(vendor, str) and " " not in vendor  # e.g. "GenuineIntel", "AuthenticAMD"; "" off Linux
    monkeypatch.setattr(fast_module, "cpu_vendor", lambda: "AuthenticAMD")
    assert resolve_gemm_backend("auto", cpu) == ("onnxruntime" if HAS_ONNXRUNTIME else "torch")
    monkeypatch.setattr(fast_module, "cpu_vendor", lambda: "GenuineIntel")
    assert resolve_gemm_backend("auto", cpu) == "torch"
    assert resolve_gemm_backend("onnxruntime", cpu) == "onnxruntime"  # asked for by name: still given
    if HAS_ONNXRUNTIME:  # int8 runs in ONNX Runtime on every CPU
        assert resolve_gemm_backend("auto", cpu, torch.float32, "int8") == "onnxruntime"
    assert resolve_gemm_backend("auto", torch.device("cuda")) == "torch"
    assert resolve_gemm_backend("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="unknown matrix-product backend 'mkl'"):
        resolve_gemm_backend("mkl", cpu)
    assert resolve_gemm_backend("auto", cpu, torch.float64) == "torch"
    with pytest.raises(ValueError, match="float32 weights on the CPU, not torch.float32 on cuda"):
        resolve_gemm_backend("onnxruntime", torch.device("cuda"))
    with pytest.raises(ValueError, match="float32 weights on the CPU, not torch.float64 on cpu"):
        resolve_gemm_backend("onnxruntime", cpu, torch.float64)
    decoder = small_decoder("lstm", "attention", 1)
    assert fast_decoder(decoder, "torch").gemm == "torch"
    assert fast_decoder(decoder, "torch") is not fast_decoder(decoder)  # the cache tells the backends apart


def varied_lengths_decoder() -> tuple[CaptionDecoder, object]:
    """The tiny model's decoder with sharpened distributions and a bias towards ``<end>``: captions of varied
    lengths, beams that end early and images that settle at different steps."""
    model = tiny_model(conditioning="attention", cell="lstm", seed=7)
    with torch.no_grad():
        model.decoder.classifier.weight.mul_(5.0)
        model.decoder.classifier.bias[model.vocab.end] += 2.5
    return model.decoder, model.vocab


SEARCHES = [
    *(dict(strategy="beam", beam_size=4, num_captions=4, length_penalty=penalty, no_repeat_ngram_size=ngram)
      for penalty in (0.0, 1.0, 2.0) for ngram in (0, 3)),
    dict(strategy="greedy", beam_size=1, length_penalty=1.0, no_repeat_ngram_size=0),
    dict(strategy="greedy", beam_size=1, length_penalty=0.0, no_repeat_ngram_size=2),
]


@pytest.mark.parametrize("images", [1, 9])
@pytest.mark.parametrize("search", SEARCHES, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_fast_decode_writes_the_plain_captions(search: dict, images: int) -> None:
    """decode() (the fast path) and the same search stepping ``CaptionDecoder.step`` write the same captions with
    the same log-probabilities and scores: beam (penalties 0, 1, 2; trigram blocking on and off) and greedy, one
    image or many whose captions end at different steps."""
    decoder, vocab = varied_lengths_decoder()
    grid = torch.randn(images, 1280, 2, 2, generator=torch.Generator().manual_seed(8)) * 3.0
    options = DecodingOptions(max_length=10, **search)
    fast = decode(decoder, grid, vocab, options)
    with torch.inference_mode():
        plain = _decode_group(decoder, grid, vocab, options)
    assert [[h.tokens for h in hs] for hs in fast] == [[h.tokens for h in hs] for hs in plain]
    for ours, theirs in zip(fast, plain, strict=True):
        assert len(ours) == options.num_captions
        assert [h.log_prob for h in ours] == pytest.approx([h.log_prob for h in theirs], abs=1e-4)
        assert [h.score for h in ours] == pytest.approx([h.score for h in theirs], abs=1e-4)
    if images > 1:  # the case is the one described: captions of several lengths, some ending before the limit
        lengths = {len(hs[0].tokens) for hs in fast}
        assert len(lengths) > 1 and min(lengths) < options.max_length
