"""Self-critical sequence training (Rennie et al. 2017): optimise CIDEr-D directly.

For each image the decoder samples ``k`` captions; each sample's reward is its CIDEr-D against the references minus
the CIDEr-D of the greedy caption of the same image (the "self-critical" baseline), and the loss is the REINFORCE
estimate ``-(reward - baseline) * log p(sample)``. CIDEr-D's document frequencies come from the whole training set,
as in the paper; pycocoevalcap's scorer only computes them from the references it is given, so the small scorer
below reuses its n-gram counting and adds corpus-level frequencies. ``baseline="mean"`` replaces the greedy caption's
reward by the mean reward of the image's other samples. ``end_token`` adds the end of the sentence to every
reference and caption as one more word (Rennie et al. 2017, appendix E): without it a caption that stops
mid-phrase ("a dog runs through the") loses almost nothing, and the trained model learns to stop there.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
from pycocoevalcap.cider.cider_scorer import precook
from torch import Tensor

from captioner.decoding import DecodingOptions, ban_tokens, decode
from captioner.model import CaptionDecoder, Memory, State
from captioner.vocabulary import Vocabulary, tokenize


class CiderD:
    """CIDEr-D (clipped counts, Gaussian length penalty sigma=6, x10) with document frequencies of a corpus.

    With ``end_token``, that word ends every reference and every scored caption (see the module's docstring).
    """

    def __init__(
        self, references: dict[int, list[str]], n: int = 4, sigma: float = 6.0, end_token: str | None = None
    ) -> None:
        self.n, self.sigma = n, sigma
        self.suffix = f" {end_token}" if end_token else ""
        self.refs = {
            k: [precook(" ".join(tokenize(r)) + self.suffix, n) for r in refs] for k, refs in references.items()
        }
        self.df: dict[tuple, float] = defaultdict(float)
        for cooked in self.refs.values():
            for ngram in {g for ref in cooked for g in ref}:
                self.df[ngram] += 1
        self.log_num_docs = math.log(float(len(self.refs)))
        self.ref_vectors = {k: [self._vector(r) for r in cooked] for k, cooked in self.refs.items()}

    def _vector(self, counts: dict[tuple, int]) -> tuple[list[dict[tuple, float]], list[float], int]:
        vec: list[dict[tuple, float]] = [{} for _ in range(self.n)]
        norms = [0.0] * self.n
        length = 0
        for ngram, tf in counts.items():
            order = len(ngram) - 1
            df = math.log(max(1.0, self.df.get(ngram, 0.0)))
            vec[order][ngram] = float(tf) * (self.log_num_docs - df)
            norms[order] += vec[order][ngram] ** 2
            if order == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norms], length

    def score(self, image_id: int, caption: str) -> float:
        """CIDEr-D of one caption against the references of ``image_id``."""
        hyp_vec, hyp_norm, hyp_len = self._vector(precook(caption + self.suffix, self.n))
        total = np.zeros(self.n)
        for ref_vec, ref_norm, ref_len in self.ref_vectors[image_id]:
            delta = float(hyp_len - ref_len)
            for order in range(self.n):
                dot = sum(
                    min(v, ref_vec[order].get(g, 0.0)) * ref_vec[order].get(g, 0.0) for g, v in hyp_vec[order].items()
                )
                if hyp_norm[order] and ref_norm[order]:
                    total[order] += (
                        dot / (hyp_norm[order] * ref_norm[order]) * math.exp(-(delta**2) / (2 * self.sigma**2))
                    )
        return float(total.mean() / len(self.refs[image_id]) * 10.0)


def sample_captions(
    decoder: CaptionDecoder, memory: Memory, state: State, vocab: Vocabulary, max_length: int
) -> tuple[Tensor, Tensor]:
    """Sample one caption per row; returns word ids (rows, T) padded after ``<end>`` and summed log-probs (rows,)."""
    rows = state[0].size(0)
    device = state[0].device
    rules = DecodingOptions(strategy="greedy", max_length=max_length)  # the bans of decoding, no n-gram blocking
    tokens = torch.full((rows,), vocab.start, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    log_prob = torch.zeros(rows, device=device)
    words = torch.empty((rows, 0), dtype=torch.long, device=device)
    for step in range(max_length + 1):
        logits, state, _ = decoder.step(tokens, state, memory)
        # Banned before the softmax: the sample's log-probability is normalised over the allowed words.
        logp = torch.log_softmax(ban_tokens(logits.float(), words, step, vocab, rules), dim=-1)
        tokens = torch.multinomial(logp.detach().exp(), 1).squeeze(1)
        log_prob = log_prob + logp.gather(1, tokens.unsqueeze(1)).squeeze(1).masked_fill(finished, 0.0)
        tokens = tokens.masked_fill(finished, vocab.pad)
        words = torch.cat([words, tokens.unsqueeze(1)], dim=1)
        finished = finished | (tokens == vocab.end)
        if bool(finished.all()):
            break
    return words, log_prob


BASELINES = ("greedy", "mean")


def check_baseline(baseline: str, samples: int) -> None:
    """Raise ValueError unless ``baseline`` is known and has the samples it needs (``train`` calls it up front)."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown scst.baseline {baseline!r} (expected one of {BASELINES})")
    if baseline == "mean" and samples < 2:
        raise ValueError("scst.baseline 'mean' needs at least 2 samples per image (scst.samples)")


def scst_loss(
    decoder: CaptionDecoder,
    grid: Tensor,
    image_ids: list[int],
    vocab: Vocabulary,
    cider: CiderD,
    samples: int,
    max_length: int,
    baseline: str = "greedy",
) -> tuple[Tensor, float, float]:
    """One SCST loss for a batch of images; returns (loss, mean sample reward, mean baseline reward).

    ``baseline="greedy"`` is Rennie et al.'s self-critical baseline: the reward of the greedy caption.
    ``baseline="mean"`` uses, for each sample, the mean reward of the image's other samples (Luo 2020, "A Better
    Variant of Self-Critical Sequence Training"): no greedy decoding, and a baseline that tracks the samples.
    """
    check_baseline(baseline, samples)
    if baseline == "greedy":
        was_training = decoder.training
        decoder.eval()
        greedy = decode(decoder, grid, vocab, DecodingOptions(strategy="greedy", max_length=max_length))
        decoder.train(was_training)
        greedy_rewards = [cider.score(i, vocab.decode(h[0].tokens)) for i, h in zip(image_ids, greedy, strict=True)]
        baselines = torch.tensor(greedy_rewards).repeat_interleave(samples)

    memory, state = decoder.memory_and_state(grid)
    state = tuple(s.repeat_interleave(samples, dim=0) for s in state)  # the samples share their image's memory
    words, log_prob = sample_captions(decoder, memory, state, vocab, max_length)
    rewards = torch.tensor(
        [cider.score(image_ids[i // samples], vocab.decode(row)) for i, row in enumerate(words.tolist())]
    )
    if baseline == "mean":
        per_image = rewards.view(-1, samples)
        baselines = ((per_image.sum(dim=1, keepdim=True) - per_image) / (samples - 1)).view(-1)
    advantage = (rewards - baselines).to(grid.device)
    loss = -(advantage * log_prob).mean()
    return loss, float(rewards.mean()), float(baselines.mean())
