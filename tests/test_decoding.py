"""Properties of greedy and beam-search decoding on tiny random-weight decoders (every cell and conditioning)."""

from __future__ import annotations

import functools
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_model

from captioner import decoding
from captioner.decoding import DecodingOptions, Hypothesis, decode
from captioner.fast_decoder import fast_decoder
from captioner.model import CaptionDecoder
from captioner.vocabulary import Vocabulary

CONFIGS = [(cell, conditioning) for cell in ("lstm", "gru", "rnn") for conditioning in ("init", "attention")]
CONFIG_IDS = [f"{cell}-{conditioning}" for cell, conditioning in CONFIGS]
NUM_IMAGES = 6


@functools.cache
def decoder_and_vocab(cell: str, conditioning: str, num_layers: int = 1) -> tuple[CaptionDecoder, Vocabulary]:
    """A tiny decoder with sharpened distributions and a bias towards ``<end>``, so captions end at varied lengths."""
    model = tiny_model(conditioning=conditioning, cell=cell, num_layers=num_layers, seed=1)
    decoder, vocab = model.decoder, model.vocab
    with torch.no_grad():
        decoder.classifier.weight.mul_(5.0)
        decoder.classifier.bias[vocab.end] += 1.0
    return decoder, vocab


def grids(n: int = NUM_IMAGES, seed: int = 0) -> torch.Tensor:
    """Random encoder grids (n, 1280, 2, 2)."""
    return torch.randn(n, 1280, 2, 2, generator=torch.Generator().manual_seed(seed)) * 3.0


def run(cell: str, conditioning: str, grid: torch.Tensor | None = None, **options: object) -> list[list[Hypothesis]]:
    decoder, vocab = decoder_and_vocab(cell, conditioning)
    return decode(decoder, grids() if grid is None else grid, vocab, DecodingOptions(**options))


def teacher_forced_log_prob(decoder: CaptionDecoder, vocab: Vocabulary, grid: torch.Tensor, tokens: list[int]) -> float:
    """Sum of the decoder's log-probabilities of ``tokens`` then ``<end>``, by one teacher-forced forward pass."""
    sequence = torch.tensor([[vocab.start, *tokens, vocab.end]])
    with torch.no_grad():
        logits, _ = decoder(grid.unsqueeze(0), sequence[:, :-1])
    log_probs = torch.log_softmax(logits.double(), dim=-1)
    return float(log_probs.gather(2, sequence[:, 1:].unsqueeze(2)).sum())


def ngrams(tokens: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


@pytest.mark.parametrize(("cell", "conditioning"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize(
    "extra", [{}, {"no_repeat_ngram_size": 2}, {"length_penalty": 1.0}], ids=["plain", "ngram", "lp"]
)
def test_beam_size_one_is_greedy(cell: str, conditioning: str, extra: dict) -> None:
    greedy = run(cell, conditioning, strategy="greedy", max_length=10, **extra)
    beam = run(cell, conditioning, strategy="beam", beam_size=1, max_length=10, **extra)
    for (g,), (b,) in zip(greedy, beam, strict=True):
        assert b.tokens == g.tokens
        assert b.log_prob == pytest.approx(g.log_prob, abs=1e-5)
        assert b.score == pytest.approx(g.score, abs=1e-5)


@pytest.mark.parametrize(("cell", "conditioning"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize(
    "options",
    [{"strategy": "greedy"}, {"beam_size": 4, "num_captions": 3}, {"beam_size": 3, "no_repeat_ngram_size": 2}],
    ids=["greedy", "beam", "beam-ngram"],
)
def test_batch_equals_each_image_alone(cell: str, conditioning: str, options: dict) -> None:
    batch = grids()
    together = run(cell, conditioning, batch, max_length=12, **options)
    assert len(together) == NUM_IMAGES
    for i in range(NUM_IMAGES):
        (alone,) = run(cell, conditioning, batch[i : i + 1], max_length=12, **options)
        assert [h.tokens for h in together[i]] == [h.tokens for h in alone]
        for a, b in zip(together[i], alone, strict=True):
            assert a.log_prob == pytest.approx(b.log_prob, abs=1e-4)


def test_batched_lstm_with_two_layers_equals_each_image_alone() -> None:
    decoder, vocab = decoder_and_vocab("lstm", "attention", num_layers=2)
    options = DecodingOptions(beam_size=3, num_captions=2, max_length=8)
    together = decode(decoder, grids(), vocab, options)
    for i, hyps in enumerate(together):
        (alone,) = decode(decoder, grids()[i : i + 1], vocab, options)
        assert [h.tokens for h in hyps] == [h.tokens for h in alone]


@pytest.mark.parametrize(("cell", "conditioning"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_nbest_is_sorted_distinct_and_complete(cell: str, conditioning: str, length_penalty: float) -> None:
    results = run(cell, conditioning, beam_size=5, num_captions=5, max_length=10, length_penalty=length_penalty)
    for hyps in results:
        assert len(hyps) == 5
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in hyps}) == 5
        for h in hyps:  # the documented ranking: log_prob / length ** length_penalty, length counting <end>
            assert h.score == pytest.approx(h.log_prob / (len(h.tokens) + 1) ** length_penalty, rel=1e-5)


@pytest.mark.parametrize(("cell", "conditioning"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("max_length", [1, 2, 5])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_max_length_and_no_special_tokens(cell: str, conditioning: str, max_length: int, strategy: str) -> None:
    _, vocab = decoder_and_vocab(cell, conditioning)
    num_captions = 3 if strategy == "beam" else 1
    results = run(cell, conditioning, strategy=strategy, beam_size=3, num_captions=num_captions, max_length=max_length)
    specials = {vocab.pad, vocab.start, vocab.end, vocab.unk}
    for hyps in results:
        assert len(hyps) == num_captions
        for h in hyps:
            assert 1 <= len(h.tokens) <= max_length  # never empty, never longer than allowed
            assert not specials & set(h.tokens)
            assert h.log_prob < 0.0


def test_captions_end_at_varied_lengths() -> None:
    """The fixture decoders exercise both early <end> and the max_length cut-off (else the tests above are weak)."""
    lengths = {
        len(h.tokens)
        for cell, conditioning in CONFIGS
        for hyps in run(cell, conditioning, beam_size=3, num_captions=3, max_length=8)
        for h in hyps
    }
    assert 1 in lengths and 8 in lengths and len(lengths) >= 4


@pytest.mark.parametrize("allow_unk", [False, True])
def test_unk_only_when_allowed(allow_unk: bool) -> None:
    decoder, vocab = decoder_and_vocab("gru", "attention")
    decoder = CaptionDecoder(decoder.config)
    decoder.load_state_dict(decoder_and_vocab("gru", "attention")[0].state_dict())
    decoder.eval()
    with torch.no_grad():
        decoder.classifier.bias[vocab.unk] += 20.0  # <unk> would win every step
    hyps = decode(decoder, grids(), vocab, DecodingOptions(beam_size=2, max_length=4, allow_unk=allow_unk))
    tokens = [t for (h,) in hyps for t in h.tokens]
    assert (vocab.unk in tokens) == allow_unk


@pytest.mark.parametrize(("cell", "conditioning"), CONFIGS, ids=CONFIG_IDS)
def test_decoding_is_deterministic(cell: str, conditioning: str) -> None:
    for options in ({"strategy": "greedy"}, {"beam_size": 4, "num_captions": 4, "length_penalty": 0.7}):
        first = run(cell, conditioning, max_length=10, **options)
        second = run(cell, conditioning, max_length=10, **options)
        assert first == second


@pytest.mark.parametrize(("cell", "conditioning"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_no_repeat_ngram(cell: str, conditioning: str, n: int, strategy: str) -> None:
    num_captions = 3 if strategy == "beam" else 1
    options = {"strategy": strategy, "beam_size": 3, "num_captions": num_captions, "max_length": 15}
    for hyps in run(cell, conditioning, no_repeat_ngram_size=n, **options):
        for h in hyps:
            grams = ngrams(h.tokens, n)
            assert len(grams) == len(set(grams)), h.tokens


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_a_decoder_in_train_mode_decodes_like_in_eval_mode(strategy: str) -> None:
    """Training's validation may decode its decoder in train mode (the plain step, no fast path); without dropout
    it must give the eval mode's captions and scores."""
    decoder, vocab = decoder_and_vocab("lstm", "attention")
    options = DecodingOptions(strategy=strategy, beam_size=3, max_length=8)
    evaluated = decode(decoder, grids(), vocab, options)
    try:
        trained = decode(decoder.train(), grids(), vocab, options)
    finally:
        decoder.eval()
    for a, b in zip(evaluated, trained, strict=True):
        assert [h.tokens for h in a] == [h.tokens for h in b]
        assert [h.log_prob for h in a] == pytest.approx([h.log_prob for h in b], abs=1e-4)


def test_unblocked_decoders_do_repeat() -> None:
    """Without blocking the random decoders repeat words, so the blocking test above is not vacuous."""
    repeats = [
        h.tokens
        for cell, conditioning in CONFIGS
        for (h,) in run(cell, conditioning, strategy="greedy", max_length=15)
        if len(set(ngrams(h.tokens, 2))) < len(ngrams(h.tokens, 2))
    ]
    assert len(repeats) >= 5


@pytest.mark.parametrize(("cell", "conditioning"), CONFIGS, ids=CONFIG_IDS)
def test_length_penalty_favours_longer_captions(cell: str, conditioning: str) -> None:
    """With length_penalty=0 the plain sum ranks (short captions win); a positive penalty divides by length**p."""
    plain = run(cell, conditioning, grids(12), beam_size=4, num_captions=4, max_length=10)
    for hyps in plain:  # plain sum: sorted by log_prob itself
        assert [h.score for h in hyps] == [h.log_prob for h in hyps]
        assert [h.log_prob for h in hyps] == sorted((h.log_prob for h in hyps), reverse=True)
    penalised = run(cell, conditioning, grids(12), beam_size=4, num_captions=4, max_length=10, length_penalty=2.0)
    plain_lengths = [len(hyps[0].tokens) for hyps in plain]
    penalised_lengths = [len(hyps[0].tokens) for hyps in penalised]
    assert sum(penalised_lengths) >= sum(plain_lengths)
    for hyps in penalised:
        for h in hyps:
            assert h.score == pytest.approx(h.log_prob / (len(h.tokens) + 1) ** 2.0, rel=1e-5)


def test_length_penalty_changes_the_ranking() -> None:
    results = {
        penalty: [
            hyps[0].tokens
            for cell, conditioning in CONFIGS
            for hyps in run(cell, conditioning, grids(12), beam_size=4, max_length=10, length_penalty=penalty)
        ]
        for penalty in (0.0, 2.0)
    }
    changed = [(a, b) for a, b in zip(results[0.0], results[2.0], strict=True) if a != b]
    assert changed
    assert all(len(b) >= len(a) for a, b in changed)


@pytest.mark.parametrize(("cell", "conditioning"), CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize(
    "options",
    [
        {"strategy": "greedy"},
        {"beam_size": 4, "num_captions": 4},
        {"beam_size": 3, "num_captions": 3, "no_repeat_ngram_size": 2, "length_penalty": 1.0},
        {"beam_size": 2, "num_captions": 2, "max_length": 3},
    ],
    ids=["greedy", "beam", "beam-ngram-lp", "beam-short"],
)
def test_log_prob_matches_teacher_forcing(cell: str, conditioning: str, options: dict) -> None:
    """Each hypothesis' log_prob is exactly what the decoder assigns to its words and <end> (beam bookkeeping)."""
    decoder, vocab = decoder_and_vocab(cell, conditioning)
    batch = grids()
    options = {"max_length": 10} | options
    for i, hyps in enumerate(decode(decoder, batch, vocab, DecodingOptions(**options))):
        for h in hyps:
            assert h.log_prob == pytest.approx(teacher_forced_log_prob(decoder, vocab, batch[i], h.tokens), abs=1e-4)


@pytest.mark.parametrize("conditioning", ["init", "attention"])
def test_wide_beam_finds_the_exact_nbest(conditioning: str) -> None:
    """With max_length=2 and a beam as wide as all 2-word prefixes, beam search is exhaustive: check by brute force."""
    decoder, vocab = decoder_and_vocab("lstm", conditioning)
    grid = grids(1)
    words = [i for i in range(len(vocab)) if i not in (vocab.pad, vocab.start, vocab.end, vocab.unk)]
    candidates = [[w] for w in words] + [list(pair) for pair in itertools.product(words, repeat=2)]
    exact = sorted(
        ((teacher_forced_log_prob(decoder, vocab, grid[0], c), c) for c in candidates), key=lambda x: x[0], reverse=True
    )
    width = len(words) * (len(words) + 1)
    (hyps,) = decode(decoder, grid, vocab, DecodingOptions(beam_size=width, num_captions=10, max_length=2))
    assert [h.tokens for h in hyps] == [c for _, c in exact[:10]]
    assert [h.log_prob for h in hyps] == pytest.approx([lp for lp, _ in exact[:10]], abs=1e-4)


@pytest.mark.parametrize(
    "options",
    [
        {"strategy": "sample"},
        {"beam_size": 0},
        {"max_length": 0},
        {"num_captions": 0},
        {"beam_size": 3, "num_captions": 4},
        {"strategy": "greedy", "num_captions": 2},
        {"no_repeat_ngram_size": -1},
    ],
)
def test_invalid_options_raise(options: dict) -> None:
    with pytest.raises(ValueError):
        DecodingOptions(**options)


@pytest.mark.parametrize("conditioning", ["init", "attention"])
def test_settled_images_leave_the_beam_batch(conditioning: str) -> None:
    """Images whose beams have all ended drop out of later steps, and this changes no result."""
    decoder, vocab = decoder_and_vocab("lstm", conditioning)
    batch_sizes: list[int] = []
    stepper = fast_decoder(decoder)  # what decode() steps with (the decoder's inference fast path)
    original_step = stepper.step

    def counting_step(tokens: torch.Tensor, state: tuple, memory: tuple, **live: torch.Tensor) -> tuple:
        batch_sizes.append(tokens.size(0))
        return original_step(tokens, state, memory, **live)

    grid = grids(12, seed=3)
    options = DecodingOptions(beam_size=3, num_captions=3, max_length=12)
    stepper.step = counting_step
    try:
        together = decode(decoder, grid, vocab, options)
    finally:
        del stepper.step
    assert batch_sizes[0] == 12 and batch_sizes[1] == 36  # the first step once per image, then K rows each
    assert batch_sizes[1:] == sorted(batch_sizes[1:], reverse=True) and batch_sizes[-1] < 36  # rows were dropped
    assert all(size % 3 == 0 for size in batch_sizes[1:])
    alone = [decode(decoder, grid[i : i + 1], vocab, options)[0] for i in range(12)]
    assert [[h.tokens for h in hs] for hs in together] == [[h.tokens for h in hs] for hs in alone]
    for hs_together, hs_alone in zip(together, alone, strict=True):
        for a, b in zip(hs_together, hs_alone, strict=True):
            assert a.log_prob == pytest.approx(b.log_prob, abs=1e-4)


@pytest.fixture
def group_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str, int]]:
    """Every call of decoding._decode_group from now on: (images, calling thread's name, torch threads)."""
    calls: list[tuple[int, str, int]] = []
    decode_group = decoding._decode_group

    def spy(stepper: object, part: torch.Tensor, *args: object) -> list[list[Hypothesis]]:
        calls.append((part.size(0), threading.current_thread().name, torch.get_num_threads()))
        return decode_group(stepper, part, *args)

    monkeypatch.setattr(decoding, "_decode_group", spy)
    return calls


@pytest.mark.parametrize(
    "options", [{"strategy": "greedy"}, {"beam_size": 3, "num_captions": 2, "no_repeat_ngram_size": 2}]
)
def test_two_threads_decode_two_parts_side_by_side_as_one_batch(
    options: dict, group_calls: list[tuple[int, str, int]]
) -> None:
    """With two torch threads, decode() splits a batch into two parts decoded in two threads with one torch
    thread each (decoding._decode_in_parts): the same hypotheses as one batch on one thread, and afterwards
    torch's thread count is back to two."""
    decoder, vocab = decoder_and_vocab("lstm", "attention")
    grid = grids(7)
    one_batch = decode(decoder, grid, vocab, DecodingOptions(**options))  # one thread (conftest)
    group_calls.clear()
    torch.set_num_threads(2)
    try:
        in_parts = decode(decoder, grid, vocab, DecodingOptions(**options))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    assert sorted((rows, thread.split("_")[0], threads) for rows, thread, threads in group_calls) == [
        (3, "decode", 1), (4, "decode", 1)
    ]
    assert [[h.tokens for h in hyps] for hyps in in_parts] == [[h.tokens for h in hyps] for hyps in one_batch]
    for parts_hyps, batch_hyps in zip(in_parts, one_batch, strict=True):
        assert [h.log_prob for h in parts_hyps] == pytest.approx([h.log_prob for h in batch_hyps], abs=1e-5)


def test_concurrent_decodes_in_parts_restore_the_thread_count() -> None:
    """Two decodes in parts at once (a service's requests, a user's threads): both give one batch's captions, and
    torch's thread count is restored when the last one ends, not set to the other's lowered value."""
    decoder, vocab = decoder_and_vocab("lstm", "attention")
    options = DecodingOptions(beam_size=3)
    batches = [grids(6, seed) for seed in (1, 2)]
    expected = [decode(decoder, grid, vocab, options) for grid in batches]
    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(2) as pool:
            for _ in range(3):
                results = list(pool.map(lambda grid: decode(decoder, grid, vocab, options), batches))
                assert [[h.tokens for h in hyps] for r in results for hyps in r] == [
                    [h.tokens for h in hyps] for e in expected for hyps in e
                ]
                assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("case", ["one image", "train mode"])
def test_what_is_not_decoded_in_parts(case: str, group_calls: list[tuple[int, str, int]]) -> None:
    """One image (one HTTP request) cannot be split, and a decoder in train mode (training's validation, which may
    draw dropout) is not: both are decoded in the calling thread, with torch's threads as they were."""
    decoder, vocab = decoder_and_vocab("lstm", "attention")
    grid = grids(1 if case == "one image" else 4)
    torch.set_num_threads(2)
    try:
        decoder.train(case == "train mode")
        decode(decoder, grid, vocab, DecodingOptions(beam_size=2))
    finally:
        decoder.eval()
        torch.set_num_threads(1)
    assert group_calls == [(grid.size(0), threading.current_thread().name, 2)]
