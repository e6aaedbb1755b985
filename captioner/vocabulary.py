"""Tokeniser and vocabulary.

The tokeniser follows the COCO evaluation convention (lowercase, punctuation removed) so that the words the model
learns are the words the metrics score.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

# Apostrophes join ("man's" -> "mans", like the PTB-style tokeniser drops them); other punctuation splits words.
_APOSTROPHES = re.compile(r"['\u2019`]")
_NON_WORD = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """Split a caption into lowercase word tokens, dropping punctuation.

    >>> tokenize("A dog's ball, on the GRASS.")
    ['a', 'dogs', 'ball', 'on', 'the', 'grass']
    """
    text = _APOSTROPHES.sub("", text.lower())
    return [word for word in _NON_WORD.split(text) if word]


class Vocabulary:
    """A bidirectional map between words and integer ids; ids 0-3 are the special tokens."""

    def __init__(self, words: Sequence[str]) -> None:
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"vocabulary must start with the special tokens {SPECIALS}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary contains duplicate words")
        self.words: list[str] = list(words)
        self.index: dict[str, int] = {word: i for i, word in enumerate(self.words)}
        self.pad, self.start, self.end, self.unk = (self.index[s] for s in SPECIALS)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Build from raw captions, keeping words seen at least ``min_count`` times (most frequent first)."""
        counts = Counter(word for caption in captions for word in tokenize(caption))
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words

    def encode(self, caption: str, max_length: int | None = None) -> list[int]:
        """Token ids of ``<start> words... <end>``, unknown words as ``<unk>``, at most ``max_length`` words."""
        words = tokenize(caption)[:max_length]
        return [self.start, *(self.index.get(w, self.unk) for w in words), self.end]

    def decode(self, ids: Iterable[int]) -> str:
        """Words of a generated id sequence, stopping at ``<end>`` and skipping other special tokens."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end:
                break
            if i not in (self.pad, self.start):
                words.append(self.words[i])
        return " ".join(words)

    def to_json(self) -> list[str]:
        """The vocabulary as a JSON-serialisable word list (id = position)."""
        return list(self.words)

    @classmethod
    def from_json(cls, words: list[str]) -> Vocabulary:
        """Inverse of :meth:`to_json`."""
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError("vocabulary JSON must be a list of strings")
        return cls(words)
