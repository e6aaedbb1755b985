"""What ``ban_tokens`` forbids, exactly: the n-gram rule and the fixed rules, and that nothing else is forbidden.

A plain-Python statement of each rule (``expected_banned``) is compared with the batched tensor code on hand-picked
caption prefixes and on random ones, so a rule that forbids too much (n=2 blocking any repeated single word) or too
little fails here in milliseconds, without a model.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import TINY_CAPTIONS

from captioner.decoding import DecodingOptions, _log_probs, ban_tokens
from captioner.vocabulary import Vocabulary

VOCAB = Vocabulary.build(TINY_CAPTIONS, min_count=1)
A, B, C, D = (VOCAB.index[w] for w in ("a", "dog", "runs", "on"))


def expected_banned(words: list[int], options: DecodingOptions) -> set[int]:
    """The word ids the decoding rules forbid after ``words``, stated one rule at a time."""
    step, n = len(words), options.no_repeat_ngram_size
    banned = {VOCAB.pad, VOCAB.start} | ({VOCAB.unk} if not options.allow_unk else set())
    if step == 0:
        banned.add(VOCAB.end)  # no empty caption
    if n and step >= n:
        seen = {tuple(words[i : i + n]) for i in range(step - n + 1)}
        banned |= {w for w in range(len(VOCAB)) if tuple(words[step - n + 1 :] + [w]) in seen}
    if step == options.max_length:
        banned |= set(range(len(VOCAB))) - {VOCAB.end}
    return banned


def banned_by_code(rows: list[list[int]], options: DecodingOptions) -> list[set[int]]:
    """The ids ``ban_tokens`` sets to -inf in each row; every other entry must come back unchanged."""
    step = len(rows[0])
    generator = torch.Generator().manual_seed(step)
    logp = torch.randn(len(rows), len(VOCAB), generator=generator)
    original = logp.clone()
    words = torch.tensor(rows, dtype=torch.long).reshape(len(rows), step)
    out = ban_tokens(logp, words, step, VOCAB, options)
    assert out.shape == original.shape
    kept = out != -math.inf
    assert torch.equal(out[kept], original[kept])  # nothing but -inf is ever written
    return [set(torch.nonzero(~row).flatten().tolist()) for row in kept]


def ngram_banned(words: list[int], n: int) -> set[int]:
    """Only the n-gram rule's share of :func:`banned_by_code` (the fixed rules taken out)."""
    options = DecodingOptions(no_repeat_ngram_size=n, max_length=50)
    return banned_by_code([words], options)[0] - expected_banned(words, DecodingOptions(max_length=50))


@pytest.mark.parametrize(
    ("words", "n", "banned"),
    [
        ([A, B], 2, set()),  # two different words: no bigram can repeat yet
        ([A, B, A], 2, {B}),  # "a dog a" + "dog" would repeat "a dog"; "a a" and the rest are fine
        ([A, A], 2, {A}),  # "a a" + "a" would repeat "a a"
        ([A, B, C, A], 2, {B}),
        ([A, B, A, C, A], 2, {B, C}),  # every word that once followed "a"
        ([A, B, A, B], 2, {A}),  # "dog a" has been seen
        ([A, B], 3, set()),  # shorter than n: nothing to repeat
        ([A, B, C], 3, set()),
        ([A, B, C, A, B], 3, {C}),  # "a dog" + "runs" would repeat "a dog runs"
        ([A, B, A, B], 3, {A}),  # "a dog" + "a" would repeat "a dog a"
        ([A, B, C, A, C], 3, set()),  # "a runs" never occurred
        ([A, B, C, D, A, B, C], 4, {D}),
        ([A, B, C, D, A, B], 4, set()),
        ([A, B, C], 1, {A, B, C}),  # n=1: no word twice
        ([A, A, B], 1, {A, B}),
        ([], 2, set()),
        ([A], 2, set()),  # one word: a single word is not a bigram
    ],
)
def test_ngram_blocking_forbids_exactly_the_repeats(words: list[int], n: int, banned: set[int]) -> None:
    assert ngram_banned(words, n) == banned


def test_bigram_blocking_allows_a_repeated_single_word() -> None:
    # "a dog runs on a ...": "a" may come back, and so may any word after it except "dog".
    words = [A, B, C, D]
    assert A not in ngram_banned(words, 2)
    assert ngram_banned(words + [A], 2) == {B}
    assert ngram_banned(words + [A], 3) == set()  # "on a" is new, so no trigram can repeat yet


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4])
def test_random_prefixes_match_the_rules(n: int) -> None:
    """Prefixes drawn from four words (so repeats abound), many rows at once: each row is judged on its own."""
    rng = random.Random(n)
    for step in range(0, 9):
        rows = [[rng.choice([A, B, C, D]) for _ in range(step)] for _ in range(12)]
        options = DecodingOptions(no_repeat_ngram_size=n, max_length=8, allow_unk=step % 2 == 1)
        assert banned_by_code(rows, options) == [expected_banned(row, options) for row in rows], (n, step)


def test_fixed_rules() -> None:
    options = DecodingOptions(max_length=3)
    # Step 0: no <end>, and never <pad>, <start>, <unk>.
    assert banned_by_code([[]], options) == [{VOCAB.pad, VOCAB.start, VOCAB.unk, VOCAB.end}]
    # In the middle: only the three specials.
    assert banned_by_code([[A, B]], options) == [{VOCAB.pad, VOCAB.start, VOCAB.unk}]
    # After max_length words: only <end>.
    assert banned_by_code([[A, B, C]], options) == [set(range(len(VOCAB))) - {VOCAB.end}]
    # <unk> allowed on request.
    allowing = DecodingOptions(max_length=3, allow_unk=True)
    assert banned_by_code([[A]], allowing) == [{VOCAB.pad, VOCAB.start}]


def test_end_keeps_its_score_at_max_length_and_log_probs_are_normalised() -> None:
    logits = torch.randn(2, len(VOCAB), generator=torch.Generator().manual_seed(1))
    words = torch.tensor([[A, B], [C, D]])
    options = DecodingOptions(max_length=2)
    out = _log_probs(logits, words, 2, VOCAB, options)
    expected_end = torch.log_softmax(logits, dim=-1)[:, VOCAB.end]
    assert torch.allclose(out[:, VOCAB.end], expected_end)  # the full softmax's value, not renormalised
    middle = _log_probs(logits, words, 1, VOCAB, DecodingOptions(max_length=5))
    full = torch.log_softmax(logits, dim=-1)
    allowed = middle != -math.inf
    assert torch.allclose(middle[allowed], full[allowed])
