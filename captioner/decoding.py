"""Decoding options and greedy and beam-search decoding, batched over images.

:class:`DecodingOptions` is the one options type of every door, :data:`OPTION_SPECS` the options a user may set
(with their ranges and help, read by the CLI flags, the HTTP parameters and the OpenAPI document) and
:func:`parse_option` the one parser of a user's text. :func:`decode` is the one batched decoding function: the
Python API, the batch command, the service and training's validation all end in it.

Many images times K beams run as one tensor batch: every step is one call to ``CaptionDecoder.step`` on
``batch * beam_size`` rows (the attention memory stays one row per image, shared by its beams), and beams are
reordered with tensor gathers, never a Python loop over images.

Conventions shared by both strategies:

* ``max_length`` bounds the number of words; the step after the last allowed word may only emit ``<end>``.
* The first word cannot be ``<end>`` (no empty captions); ``<pad>``, ``<start>`` and (unless allowed) ``<unk>``
  are never emitted.
* ``no_repeat_ngram_size=n`` forbids any word that would repeat an n-gram already in the caption.
* A hypothesis' ``log_prob`` is the summed log-probability of its words and ``<end>``; beams are ranked by
  ``log_prob / length ** length_penalty`` (``length_penalty=0`` ranks by the plain sum).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from captioner.ensemble import DecoderEnsemble, EnsembleSteps
from captioner.fast_decoder import FastDecoder, fast_decoder
from captioner.model import CaptionDecoder, Memory, State
from captioner.vocabulary import Vocabulary

STRATEGIES = ("greedy", "beam")


@dataclass(frozen=True)
class OptionSpec:
    """One decoding option as the doors offer it: its type, the range a user may ask for, and its help.

    The CLI flags (``add_decoding_arguments``), the HTTP parameters (``service/params.py``) and the OpenAPI document
    all read :data:`OPTION_SPECS`; :func:`parse_option` is the one parser of a user's text. The library itself
    accepts wider values (e.g. a beam as wide as the vocabulary in tests): these are the limits for requests.
    """

    name: str
    kind: type  # str, int or float
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``--beam-size``."""
        return "--" + self.name.replace("_", "-")

    def describe_range(self) -> str:
        """``one of greedy, beam`` or ``a whole number from 1 to 10``."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        what = "a whole number" if self.kind is int else "a number"
        return f"{what} from {self.low:g} to {self.high:g}"


OPTION_SPECS: tuple[OptionSpec, ...] = (
    OptionSpec("strategy", str, "decoding strategy", choices=STRATEGIES),
    OptionSpec("beam_size", int, "beams kept by beam search", 1, 10),
    OptionSpec("max_length", int, "most words per caption", 1, 50),
    OptionSpec("num_captions", int, "captions returned, best first: at most beam_size (beam) or 1 (greedy)", 1, 10),
    OptionSpec("length_penalty", float, "beams are ranked by log_prob / length ** length_penalty (0: the plain sum)",
               0, 2),
    OptionSpec("no_repeat_ngram_size", int, "forbid repeating any n-gram of this many words (0: off)", 0, 10),
)
OPTIONS_BY_NAME = {spec.name: spec for spec in OPTION_SPECS}

# Strict ASCII numbers: Python's int() and float() also take "1_0", "+3", "1e3", "nan" and Arabic-Indic digits.
_INT = re.compile(r"[0-9]+")
_FLOAT = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+")


def parse_option(name: str, text: str) -> str | int | float | None:
    """A user's text for option ``name`` as its value; None for a blank text ("not given": the model's default).

    Surrounding spaces are ignored; numbers are plain ASCII digits (no sign, exponent or ``_``); a value outside
    the option's range raises ``ValueError`` with a message naming the option and what it accepts.
    """
    spec = OPTIONS_BY_NAME.get(name)
    if spec is None:
        raise ValueError(f"unknown decoding option {name!r}; known: {', '.join(OPTIONS_BY_NAME)}")
    stripped = text.strip(" \t")
    if not stripped:
        return None
    if spec.choices:
        if stripped.lower() not in spec.choices:
            raise ValueError(f"{name} must be {spec.describe_range()}, got {text!r}")
        return stripped.lower()
    pattern = _INT if spec.kind is int else _FLOAT
    if not pattern.fullmatch(stripped):
        raise ValueError(f"{name} must be {spec.describe_range()}, got {text!r}")
    value = spec.kind(stripped)
    if not spec.low <= value <= spec.high:
        raise ValueError(f"{name} must be {spec.describe_range()}, got {text!r}")
    return value


def parse_options(values: Mapping[str, str]) -> dict[str, str | int | float]:
    """The given options among ``values`` (name -> text), parsed by :func:`parse_option`; blank ones are left out."""
    parsed = {name: parse_option(name, text) for name, text in values.items()}
    return {name: value for name, value in parsed.items() if value is not None}


@dataclass(frozen=True)
class DecodingOptions:
    """How to turn the decoder's distributions into captions.

    Every door builds one with :meth:`from_recorded`: the model's recorded defaults (its ``config.json``
    ``decoding``), then what the user gave; an option the user did not give is the model's, never the door's.
    """

    strategy: str = "beam"
    beam_size: int = 3
    max_length: int = 20
    num_captions: int = 1
    length_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    allow_unk: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be at least 1, got {self.beam_size}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be at least 1, got {self.max_length}")
        if not 1 <= self.num_captions <= self.width:
            limit = f"beam_size ({self.beam_size})" if self.strategy == "beam" else "1 with strategy=greedy"
            raise ValueError(f"num_captions must be from 1 to {limit}, got {self.num_captions}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError("no_repeat_ngram_size must be >= 0")

    @property
    def width(self) -> int:
        """Hypotheses kept while decoding: ``beam_size`` for beam search, 1 for greedy (the most captions)."""
        return self.beam_size if self.strategy == "beam" else 1

    @classmethod
    def from_recorded(cls, recorded: Mapping[str, object], **given: object) -> DecodingOptions:
        """``recorded`` (a model's decoding defaults; unknown keys are ignored), then ``given`` (None: not given)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in recorded.items() if k in known}
        values |= {k: v for k, v in given.items() if v is not None}
        return cls(**values)

    def to_json(self) -> dict[str, str | int | float]:
        """The options a user can set (:data:`OPTION_SPECS`), e.g. for an HTTP response's ``options``."""
        return {spec.name: getattr(self, spec.name) for spec in OPTION_SPECS}


@dataclass(frozen=True)
class Hypothesis:
    """One decoded caption: word ids (without ``<start>``/``<end>``), summed log-probability, ranking score."""

    tokens: list[int]
    log_prob: float
    score: float


Grids = Tensor | Sequence[Tensor]  # one batch of encoder grids, or one per ensemble member (different encoders)


def decode(
    decoder: CaptionDecoder | DecoderEnsemble, grid: Grids, vocab: Vocabulary,
    options: DecodingOptions | Sequence[DecodingOptions], precision: str = "float32",
) -> list[list[Hypothesis]]:
    """Decode a batch of encoder grids (batch, C, H, W); per image, its ``num_captions`` hypotheses, best first.

    The one batched decoding function: ``options`` is one :class:`DecodingOptions` for every image or one per image
    (the service's micro-batches mix requests). Images are grouped by their options and each group's rows of
    ``grid`` are decoded as one batch, so an image's captions never depend on what else is in the batch.
    ``decoder`` may be a :class:`~captioner.ensemble.DecoderEnsemble`: the same search, on averaged log-probabilities;
    its members read the one ``grid``, or, given a sequence of batches (the same images), each its own (members over
    different encoders).
    ``precision`` is the eval-mode fast path's (:data:`~captioner.fast_decoder.DECODER_PRECISIONS`): "float32" gives
    the reference's captions, "bfloat16" and "int8" are faster and change a few.
    """
    if not isinstance(grid, Tensor) and not isinstance(decoder, DecoderEnsemble):
        raise ValueError("one grid per member needs an ensemble of decoders")
    images = _first(grid).size(0)
    if not isinstance(grid, Tensor) and any(g.size(0) != images for g in grid):
        raise ValueError(f"the members' grids hold different numbers of images: {[g.size(0) for g in grid]}")
    per_image = [options] * images if isinstance(options, DecodingOptions) else list(options)
    if len(per_image) != images:
        raise ValueError(f"{images} images but {len(per_image)} decoding options")
    groups: dict[DecodingOptions, list[int]] = {}
    for index, opts in enumerate(per_image):
        groups.setdefault(opts, []).append(index)
    results: list[list[Hypothesis]] = [[] for _ in per_image]
    with torch.inference_mode():
        # In eval mode, the same step with precomputed tables (fast_decoder.py); an ensemble's members each use theirs.
        if isinstance(decoder, DecoderEnsemble):
            stepper: Stepper = decoder.steps(precision)
        else:
            stepper = fast_decoder(decoder, "auto", precision)
        for opts, indices in groups.items():
            rows = grid if len(indices) == len(per_image) else _rows(grid, torch.tensor(indices))
            for index, hyps in zip(indices, _decode_in_parts(stepper, rows, vocab, opts), strict=True):
                results[index] = hyps
    return results


def _first(grid: Grids) -> Tensor:
    """The batch of grids, or the first member's."""
    return grid if isinstance(grid, Tensor) else grid[0]


def _rows(grid: Grids, indices: Tensor) -> Grids:
    """Some images' rows of the batch, or of each member's."""
    if isinstance(grid, Tensor):
        return grid[indices.to(grid.device)]
    return [g[indices.to(g.device)] for g in grid]


def _decode_in_parts(
    decoder: Stepper, grid: Grids, vocab: Vocabulary, options: DecodingOptions
) -> list[list[Hypothesis]]:
    """:func:`_decode_group` on a CPU with several threads: the images split into one part per thread, each part
    decoded in its own Python thread with one torch thread.

    Why: a step's ops are small (a few hundred rows), so splitting each op over the cores gains little (nothing
    for the fast path on the 2-core development machine), while independent parts gained 1.6x there, more than a
    large matmul gains from its second core (1.45x); the kernels release the GIL. An image's captions do not depend
    on the other images of its batch, so the parts give exactly what one batch gives. While the parts run, torch
    uses one thread in the whole process (its thread count is global), then the count is restored.
    """
    parts = min(torch.get_num_threads(), _first(grid).size(0))
    # Only the inference fast path (eval mode, no dropout: nothing random) of every member is split.
    fast = all(isinstance(member, FastDecoder) for member in getattr(decoder, "members", [decoder]))
    if parts < 2 or _first(grid).device.type != "cpu" or not fast:
        return _decode_group(decoder, grid, vocab, options)

    def decode_part(part: Grids) -> list[list[Hypothesis]]:
        with torch.inference_mode():  # thread-local: each worker enters it
            return _decode_group(decoder, part, vocab, options)

    if isinstance(grid, Tensor):
        split: list[Grids] = list(grid.tensor_split(parts))
    else:  # part i of every member's grids
        split = [list(part) for part in zip(*(g.tensor_split(parts) for g in grid), strict=True)]
    with _one_torch_thread(), ThreadPoolExecutor(parts, thread_name_prefix="decode") as pool:
        return [hyps for part in pool.map(decode_part, split) for hyps in part]


_threads_lock = threading.Lock()
_lowered = 0  # decodes in parts now running
_threads_before = 1  # torch's thread count before the first of them began


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch.set_num_threads(1) while any decode in parts runs (several may, from several threads), then back."""
    global _lowered, _threads_before
    with _threads_lock:
        if _lowered == 0:
            _threads_before = torch.get_num_threads()
            torch.set_num_threads(1)
        _lowered += 1
    try:
        yield
    finally:
        with _threads_lock:
            _lowered -= 1
            if _lowered == 0:
                torch.set_num_threads(_threads_before)


Stepper = CaptionDecoder | FastDecoder | EnsembleSteps  # anything with the decoder's memory_and_state() and step()


def _decode_group(
    decoder: Stepper, grid: Grids, vocab: Vocabulary, options: DecodingOptions
) -> list[list[Hypothesis]]:
    memory, state = decoder.memory_and_state(grid)
    if options.strategy == "greedy":
        return [[h] for h in _greedy(decoder, memory, state, vocab, options)]
    return _beam_search(decoder, memory, state, vocab, options)


def _length_norm(lengths: Tensor, penalty: float) -> Tensor:
    return lengths.clamp(min=1).float().pow(penalty) if penalty else torch.ones_like(lengths, dtype=torch.float)


def _log_probs(logits: Tensor, words: Tensor, step: int, vocab: Vocabulary, options: DecodingOptions) -> Tensor:
    """Log-softmax of the logits with the disallowed continuations set to -inf.

    ``words`` (rows, step) holds the words generated so far in each row.
    """
    return ban_tokens(torch.log_softmax(logits.float(), dim=-1), words, step, vocab, options)


def ban_tokens(logp: Tensor, words: Tensor, step: int, vocab: Vocabulary, options: DecodingOptions) -> Tensor:
    """The decoding rules as -inf scores: ``<pad>``, ``<start>`` (and ``<unk>`` unless allowed) never, ``<end>`` not
    first, no repeated n-gram, only ``<end>`` after ``max_length`` words. Works on log-probabilities or logits (SCST
    sampling bans before its softmax); may modify ``logp`` in place.

    ``words`` (rows, step) holds the words generated so far in each row.
    """
    banned = [vocab.pad, vocab.start] + ([] if options.allow_unk else [vocab.unk])
    logp[:, banned] = -torch.inf
    if step == 0:
        logp[:, vocab.end] = -torch.inf
    n = options.no_repeat_ngram_size
    if n and step >= n:
        windows = words.unfold(1, n, 1)  # (rows, step - n + 1, n): every n-gram so far
        prefix = words[:, step - n + 1 :]  # the n-1 last words, which the next word would extend
        seen = (
            (windows[:, :, :-1] == prefix.unsqueeze(1)).all(dim=2)
            if n > 1
            else torch.ones_like(windows[..., 0], dtype=torch.bool)
        )
        rows, starts = seen.nonzero(as_tuple=True)  # each n-gram whose first n-1 words end the row...
        logp[rows, windows[rows, starts, -1]] = -torch.inf  # ...bans its last word
    if step == options.max_length:
        end = logp[:, vocab.end].clone()
        logp.fill_(-torch.inf)
        logp[:, vocab.end] = end
    return logp


def _greedy(
    decoder: Stepper, memory: Memory, state: State, vocab: Vocabulary, options: DecodingOptions
) -> list[Hypothesis]:
    batch = state[0].size(0)
    like = state[0]  # new tensors go on its device (new_full and friends)
    tokens = like.new_full((batch,), vocab.start, dtype=torch.long)
    words = like.new_empty((batch, 0), dtype=torch.long)
    log_prob = like.new_zeros(batch, dtype=torch.float)
    lengths = like.new_zeros(batch, dtype=torch.long)
    finished = like.new_zeros(batch, dtype=torch.bool)
    for step in range(options.max_length + 1):
        logits, state, _ = decoder.step(tokens, state, memory)
        logp = _log_probs(logits, words, step, vocab, options)
        best, tokens = logp.max(dim=1)
        tokens = tokens.masked_fill(finished, vocab.pad)
        log_prob += best.masked_fill(finished, 0.0)
        lengths += (~finished).long()
        words = torch.cat([words, tokens.unsqueeze(1)], dim=1)
        finished |= tokens == vocab.end
        if bool(finished.all()):
            break
    scores = log_prob / _length_norm(lengths, options.length_penalty)
    return [
        Hypothesis(_strip(row, vocab), float(lp), float(s))
        for row, lp, s in zip(words.tolist(), log_prob.tolist(), scores.tolist(), strict=True)
    ]


def _beam_search(
    decoder: Stepper, memory: Memory, state: State, vocab: Vocabulary, options: DecodingOptions
) -> list[list[Hypothesis]]:
    batch, k = state[0].size(0), options.beam_size
    like = state[0]  # new tensors go on its device (new_full and friends)
    # The first step runs once per image: all K beams would start from the same state, so its K best words
    # start the K beams. From then on row b * K + j is beam j of image b; the memory stays one row per image.
    logits, state, _ = decoder.step(like.new_full((batch,), vocab.start, dtype=torch.long), state, memory)
    logp = _log_probs(logits, like.new_empty((batch, 0), dtype=torch.long), 0, vocab, options)
    log_prob, tokens = logp.topk(min(k, logp.size(1)), dim=1)  # (batch, K) each, best first
    if tokens.size(1) < k:  # a beam wider than the vocabulary: the extra beams start dead
        log_prob = torch.nn.functional.pad(log_prob, (0, k - tokens.size(1)), value=-torch.inf)
        tokens = torch.nn.functional.pad(tokens, (0, k - tokens.size(1)), value=vocab.pad)
    log_prob, tokens = log_prob.reshape(-1), tokens.reshape(-1)
    state = tuple(s.repeat_interleave(k, dim=0) for s in state)
    words = tokens.unsqueeze(1)
    lengths = like.new_ones(batch * k, dtype=torch.long)
    finished = tokens == vocab.end  # never at step 0 (an empty caption is not allowed), kept for clarity
    images = torch.arange(batch, device=like.device)  # the input image of each image still in the batch
    results: list[list[Hypothesis]] = [[] for _ in range(batch)]
    for step in range(1, options.max_length + 1):
        # A finished beam's logits are never read (below): the fast path skips its rows.
        live = {"active": ~finished} if isinstance(decoder, (FastDecoder, EnsembleSteps)) else {}
        logits, state, _ = decoder.step(tokens, state, memory, **live)
        logp = _log_probs(logits, words, step, vocab, options)
        # A finished beam continues only with <pad>, at no cost, so it keeps its place and score.
        logp.masked_fill_(finished.unsqueeze(1), -torch.inf)
        logp[:, vocab.pad].masked_fill_(finished, 0.0)
        candidates = log_prob.unsqueeze(1) + logp  # (images * K, vocab)
        new_lengths = lengths + (~finished).long()
        ranking = candidates / _length_norm(new_lengths, options.length_penalty).unsqueeze(1)
        vocab_size = ranking.size(1)
        _, best = ranking.view(-1, k * vocab_size).topk(k, dim=1)  # (images, K)
        offsets = (torch.arange(best.size(0), device=like.device) * k).unsqueeze(1)
        source = (offsets + best // vocab_size).view(-1)  # which row each new beam extends
        tokens = (best % vocab_size).view(-1)
        log_prob = candidates.view(-1, k * vocab_size).gather(1, best).view(-1)
        lengths = new_lengths[source]
        finished = finished[source] | (tokens == vocab.end)
        words = torch.cat([words[source], tokens.unsqueeze(1)], dim=1)
        state = tuple(s[source] for s in state)
        settled = finished.view(-1, k).all(dim=1)
        if bool(settled.any()):
            # An image whose K beams have all ended cannot change any more: its hypotheses are read out and its
            # rows leave the batch, so the remaining steps only pay for the images still searching.
            rows = settled.repeat_interleave(k)
            _read_out(results, images[settled], words[rows], log_prob[rows], lengths[rows], vocab, options)
            keep, rows = (~settled).nonzero().squeeze(1), (~rows).nonzero().squeeze(1)
            images, memory = images[keep], tuple(m.index_select(0, keep) for m in memory)
            tokens, log_prob, lengths, finished = tokens[rows], log_prob[rows], lengths[rows], finished[rows]
            words, state = words[rows], tuple(s.index_select(0, rows) for s in state)
            if images.numel() == 0:
                break
    _read_out(results, images, words, log_prob, lengths, vocab, options)  # those stopped by max_length
    return results


def _read_out(
    results: list[list[Hypothesis]], images: Tensor, words: Tensor, log_prob: Tensor, lengths: Tensor,
    vocab: Vocabulary, options: DecodingOptions,
) -> None:
    """Store the ``options.num_captions`` best of each image's K beams, best first, in ``results[image]``."""
    k = options.beam_size
    scores = (log_prob / _length_norm(lengths, options.length_penalty)).view(-1, k)
    order = scores.argsort(dim=1, descending=True, stable=True)
    words_list, log_prob_list, scores_list = words.tolist(), log_prob.view(-1, k).tolist(), scores.tolist()
    for b, (image, beam_order) in enumerate(zip(images.tolist(), order.tolist(), strict=True)):
        hyps = [
            Hypothesis(_strip(words_list[b * k + j], vocab), log_prob_list[b][j], scores_list[b][j])
            for j in beam_order
            if log_prob_list[b][j] > -float("inf")
        ]
        results[image] = hyps[: options.num_captions]


def _strip(row: list[int], vocab: Vocabulary) -> list[int]:
    """Word ids up to (not including) ``<end>``."""
    out = []
    for token in row:
        if token == vocab.end:
            break
        if token != vocab.pad:
            out.append(token)
    return out
