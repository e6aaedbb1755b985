"""Tokeniser and vocabulary: tokenisation rules, building with min_count, encode/decode and JSON round trip."""

from __future__ import annotations

import json

import pytest

from captioner.vocabulary import END, PAD, SPECIALS, START, UNK, Vocabulary, tokenize

CAPTIONS = [
    "A dog runs on the grass.",
    "A dog jumps.",
    "The dog's ball is red",
    "a cat, a DOG and a bird",
    "Two dogs play",
]


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("A dog's ball, on the GRASS.", ["a", "dogs", "ball", "on", "the", "grass"]),
        ("a man\u2019s hat", ["a", "mans", "hat"]),
        ("rock `n` roll", ["rock", "n", "roll"]),
        ("black-and-white   photo\n of 2 cats!", ["black", "and", "white", "photo", "of", "2", "cats"]),
        ("  ...  ", []),
        ("", []),
    ],
)
def test_tokenize(text: str, tokens: list[str]) -> None:
    assert tokenize(text) == tokens


def test_build_orders_by_frequency_then_alphabet_after_specials() -> None:
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    assert tuple(vocab.words[:4]) == SPECIALS
    assert vocab.words[4:8] == ["a", "dog", "dogs", "the"]  # counts 5, 3, 2, 2 (ties alphabetical)
    assert vocab.words[8:] == sorted(vocab.words[8:])  # all seen once: alphabetical
    assert (vocab.pad, vocab.start, vocab.end, vocab.unk) == (0, 1, 2, 3)
    assert len(vocab) == len(vocab.words) == len(set(vocab.words))


@pytest.mark.parametrize(
    ("min_count", "words"), [(2, ["a", "dog", "dogs", "the"]), (3, ["a", "dog"]), (5, ["a"]), (6, [])]
)
def test_min_count(min_count: int, words: list[str]) -> None:
    assert Vocabulary.build(CAPTIONS, min_count=min_count).words == [*SPECIALS, *words]


def test_encode_decode() -> None:
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    ids = vocab.encode("A dog runs on the grass.")
    assert ids[0] == vocab.start and ids[-1] == vocab.end
    assert [vocab.words[i] for i in ids[1:-1]] == ["a", "dog", "runs", "on", "the", "grass"]
    assert vocab.decode(ids) == "a dog runs on the grass"
    for caption in CAPTIONS:
        assert vocab.decode(vocab.encode(caption)) == " ".join(tokenize(caption))


def test_encode_unknown_words_and_max_length() -> None:
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    assert vocab.encode("a zebra and a dog") == [vocab.start, 4, 3, 3, 4, 5, vocab.end]
    assert vocab.decode(vocab.encode("a zebra")) == "a <unk>"
    assert vocab.encode("a dog a dog a dog", max_length=3) == [vocab.start, 4, 5, 4, vocab.end]
    assert vocab.encode("", max_length=3) == [vocab.start, vocab.end]


def test_decode_stops_at_end_and_skips_pad_and_start() -> None:
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    a, dog = vocab.index["a"], vocab.index["dog"]
    assert vocab.decode([vocab.start, a, vocab.pad, dog, vocab.end, a, a]) == "a dog"
    assert vocab.decode([]) == ""
    assert vocab.decode([vocab.end, a]) == ""
    assert vocab.decode([vocab.unk]) == UNK


def test_decode_accepts_tensors_and_numpy_ints() -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    ids = vocab.encode("a dog")
    assert vocab.decode(torch.tensor(ids)) == "a dog"
    assert vocab.decode(np.array(ids)) == "a dog"


def test_json_round_trip() -> None:
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    restored = Vocabulary.from_json(json.loads(json.dumps(vocab.to_json())))
    assert restored == vocab
    assert restored.index == vocab.index
    assert vocab != Vocabulary([*SPECIALS, "a"])
    assert vocab != vocab.words


@pytest.mark.parametrize(
    "data",
    [
        {"words": ["a"]},
        "<pad> <start>",
        [PAD, START, END, UNK, 5],
        [PAD, START, UNK, END],
        [PAD, START, END, UNK, "a", "a"],
    ],
)
def test_from_json_rejects_bad_data(data: object) -> None:
    with pytest.raises(ValueError):
        Vocabulary.from_json(data)  # type: ignore[arg-type]


def test_specials_must_come_first() -> None:
    with pytest.raises(ValueError, match="special tokens"):
        Vocabulary(["a", *SPECIALS])
    with pytest.raises(ValueError, match="duplicate"):
        Vocabulary([*SPECIALS, "a", "b", "a"])
