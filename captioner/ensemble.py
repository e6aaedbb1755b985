"""An ensemble of caption decoders over one encoder: the members' log-probabilities averaged at every step.

Decoders trained apart (other seeds, other recipes) make different mistakes; decoding them together, the next word
of every beam is chosen from the average of their log-probabilities. The encoder, the expensive part, runs once:
every member reads the same feature grid. The members may differ in architecture (cell, layers, sizes,
conditioning) but share the encoder's feature channels and the vocabulary.

:class:`DecoderEnsemble` holds the members' weights (an ``nn.Module``: ``.to()``, ``.eval()``, ``state_dict``).
:class:`EnsembleSteps` has a decoder's ``memory_and_state`` / ``step`` interface, so
:func:`captioner.decoding.decode` runs greedy search, beam search, n-gram blocking and the length penalty with the
same code for one decoder or N: its memory and state are the members' tuples laid end to end (every tensor keeps
the batch first, which is all that decoding's reordering needs).

Renormalised: decoding takes a ``log_softmax`` of whatever ``step`` returns, so the average of the members'
log-probabilities (the log of their geometric mean, whose exponentials sum to at most 1) becomes a distribution
again: the normalised product of experts. We keep it so on purpose: a hypothesis' ``log_prob`` stays the
log-probability of its words under one distribution, on the same scale as a single model's (the recorded length
penalty and the reported probabilities keep their meaning), and a step where the members disagree does not cost a
beam an extra, word-independent ``log Z`` that a step where they agree does not.

Which is why ``step`` returns the mean of the members' *logits*: member i's log-probabilities are its logits minus
its log-normaliser, a constant per row, so their mean is the mean of the logits minus a constant per row, and the
renormalising ``log_softmax`` removes any such constant. The same distribution, without N extra softmaxes per step.
With one member the mean is its logits, unchanged: exactly the single decoder's captions and scores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from captioner.fast_decoder import FastDecoder, fast_decoder
from captioner.model import CaptionDecoder, DecoderConfig, Memory, State

Member = CaptionDecoder | FastDecoder  # anything with a decoder's memory_and_state() and step()


def _sizes(config: DecoderConfig) -> tuple[int, int]:
    """How many tensors a member's memory and state hold (see ``model.Memory`` and ``model.State``)."""
    return (2 if config.conditioning == "attention" else 0), (2 if config.cell == "lstm" else 1)


class EnsembleSteps:
    """``memory_and_state`` and ``step`` of N members, whose log-probabilities decoding sees averaged.

    Built by :meth:`DecoderEnsemble.steps` for each :func:`~captioner.decoding.decode` call; each member is its
    :class:`~captioner.fast_decoder.FastDecoder` in eval mode, or the decoder itself in train mode.
    """

    def __init__(self, members: Sequence[Member]) -> None:
        if not members:
            raise ValueError("an ensemble needs at least one decoder")
        self.members = list(members)
        self.sizes = [_sizes(member.config) for member in self.members]

    def memory_and_state(self, grid: Tensor | Sequence[Tensor]) -> tuple[Memory, State]:
        """Every member's memory and initial state, laid end to end: from the one encoder grid all members read, or
        from a sequence of grids, one per member (members over different encoders; the same images in each)."""
        grids = [grid] * len(self.members) if isinstance(grid, Tensor) else list(grid)
        if len(grids) != len(self.members):
            raise ValueError(f"{len(grids)} grids for {len(self.members)} ensemble members")
        memory: list[Tensor] = []
        state: list[Tensor] = []
        for member, member_grid in zip(self.members, grids, strict=True):
            member_memory, member_state = member.memory_and_state(member_grid)
            memory += member_memory
            state += member_state
        return tuple(memory), tuple(state)

    def _split(self, memory: Memory, state: State) -> list[tuple[Memory, State]]:
        """The flat memory and state tuples cut back into each member's."""
        parts, m, s = [], 0, 0
        for memory_size, state_size in self.sizes:
            parts.append((memory[m : m + memory_size], state[s : s + state_size]))
            m, s = m + memory_size, s + state_size
        return parts

    def step(
        self, tokens: Tensor, state: State, memory: Memory, active: Tensor | None = None
    ) -> tuple[Tensor, State, None]:
        """Advance every member one word: the mean of their logits (batch, vocab), which decoding's ``log_softmax``
        turns into the renormalised mean of their log-probabilities (see the module's docstring), and the new state.

        ``active`` (the rows whose results will be read, as in :meth:`FastDecoder.step`) is passed to the members
        that take it; the others compute every row.
        """
        logits: list[Tensor] = []
        new_state: list[Tensor] = []
        for member, (member_memory, member_state) in zip(self.members, self._split(memory, state), strict=True):
            live = {"active": active} if active is not None and isinstance(member, FastDecoder) else {}
            member_logits, member_state, _ = member.step(tokens, member_state, member_memory, **live)
            logits.append(member_logits)
            new_state += member_state
        mean = logits[0] if len(logits) == 1 else torch.stack(logits).float().mean(dim=0)
        return mean, tuple(new_state), None


class DecoderEnsemble(nn.Module):
    """N caption decoders that decode together (see the module's docstring); a model's ``decoder`` may be one.

    The members must agree on the vocabulary size and the encoder's feature channels; their weights stay their
    own (``state_dict`` keys ``members.<i>.<name>``; a model directory stores them as ``decoders.<i>.<name>``).
    """

    def __init__(self, members: Sequence[CaptionDecoder]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one decoder")
        first = members[0].config
        for i, member in enumerate(members[1:], start=2):
            config = member.config
            if (config.vocab_size, config.feature_dim) != (first.vocab_size, first.feature_dim):
                raise ValueError(
                    f"decoder {i} has vocab_size {config.vocab_size} and feature_dim {config.feature_dim}, but "
                    f"decoder 1 has {first.vocab_size} and {first.feature_dim}: ensemble members share the "
                    "vocabulary and the encoder"
                )
        self.members = nn.ModuleList(members)

    @property
    def configs(self) -> list[DecoderConfig]:
        """Each member's architecture, in order."""
        return [member.config for member in self.members]

    def steps(self, precision: str = "float32") -> EnsembleSteps:
        """What :func:`~captioner.decoding.decode` steps: each member's fast path in eval mode, in ``precision``
        (built once per set of weights, see :func:`~captioner.fast_decoder.fast_decoder`), the members themselves
        in train mode."""
        return EnsembleSteps([fast_decoder(member, "auto", precision) for member in self.members])

    def memory_and_state(self, grid: Tensor) -> tuple[Memory, State]:
        """The members' memories and initial states laid end to end (the plain modules, as in training)."""
        return EnsembleSteps(list(self.members)).memory_and_state(grid)

    def step(self, tokens: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, None]:
        """The members' mean logits and the new state (the plain modules, as in training)."""
        return EnsembleSteps(list(self.members)).step(tokens, state, memory)


def decoders_of(decoder: CaptionDecoder | DecoderEnsemble) -> list[CaptionDecoder]:
    """A model's decoders: an ensemble's members in order, or the one decoder."""
    return list(decoder.members) if isinstance(decoder, DecoderEnsemble) else [decoder]
