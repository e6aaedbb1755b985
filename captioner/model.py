"""The caption decoder: a word embedding, a (stacked) recurrent cell and a vocabulary classifier.

Reads like the papers it follows:

* ``conditioning="init"`` is Show and Tell (Vinyals et al. 2015): the pooled image vector initialises the recurrent
  state, and the RNN then writes the caption word by word.
* ``conditioning="attention"`` is Show, Attend and Tell (Xu et al. 2015): at every step a soft attention over the
  spatial feature grid, scaled by a learned gate, is fed to the cell beside the previous word.

The cell is an LSTM (default), GRU or vanilla tanh RNN, stacked ``num_layers`` deep, and the same parameters are
used at every time step. ``forward`` is teacher-forced (training); ``step`` advances one word (decoding).

State and memory are tuples of tensors whose first dimension is the batch, so the decoding code can expand and
reorder them for beam search without knowing what they hold. Memory has one row per image; state may have G rows
per image (beams, samples), consecutive, and those rows share their image's memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

State = tuple[Tensor, ...]  # (h, c) for LSTM, (h,) otherwise; each (batch, num_layers, hidden_dim)
Memory = tuple[Tensor, ...]  # (features (images, N, C), attention keys (images, N, A)); empty for "init"

CELLS = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "rnn": nn.RNNCell}
CONDITIONINGS = ("init", "attention")


@dataclass
class DecoderConfig:
    """Architecture hyperparameters, saved in the checkpoint's config.json."""

    vocab_size: int
    feature_dim: int  # channels of the encoder's feature grid
    embed_dim: int = 256
    hidden_dim: int = 512
    attention_dim: int = 256
    num_layers: int = 1
    cell: str = "lstm"
    conditioning: str = "attention"
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r} (expected one of {sorted(CELLS)})")
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {self.conditioning!r} (expected one of {CONDITIONINGS})")
        if self.num_layers < 1:
            raise ValueError("num_layers must be at least 1")

    def to_json(self) -> dict:
        """A JSON-serialisable dict."""
        return asdict(self)


class SoftAttention(nn.Module):
    """Additive attention: alpha = softmax(w . tanh(W_f f_i + W_h h)), context = sum_i alpha_i f_i.

    Several queries may share one image: with ``features`` for B images and ``hidden`` for B * G rows, rows
    ``b * G .. b * G + G - 1`` all attend over image ``b`` (the G beams or samples of one image), so the feature
    grid is never copied G times.
    """

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.key = nn.Linear(feature_dim, attention_dim)
        self.query = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, features: Tensor, keys: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Context (B * G, C) and weights (B * G, N) for queries ``hidden`` (B * G, H) over ``features`` (B, N, C)."""
        images = features.size(0)
        query = self.query(hidden).view(images, -1, 1, keys.size(2))  # (B, G, 1, A)
        energy = keys.unsqueeze(1) + query  # (B, G, N, A): the largest tensor of a decoding step
        scores = self.score(energy.tanh_()).squeeze(3)  # (B, G, N); tanh in place, so one such tensor, not two
        alpha = scores.softmax(dim=2)
        context = torch.bmm(alpha, features)  # (B, G, C)
        return context.flatten(0, 1), alpha.flatten(0, 1)


class CaptionDecoder(nn.Module):
    """Recurrent caption decoder conditioned on an image feature grid."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.is_lstm = c.cell == "lstm"
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=0)
        # The image initialises every layer's hidden (and cell) state, in both conditionings.
        self.init_h = nn.Linear(c.feature_dim, c.num_layers * c.hidden_dim)
        self.init_c = nn.Linear(c.feature_dim, c.num_layers * c.hidden_dim) if self.is_lstm else None
        if c.conditioning == "attention":
            self.attention = SoftAttention(c.feature_dim, c.hidden_dim, c.attention_dim)
            self.gate = nn.Linear(c.hidden_dim, c.feature_dim)  # the "beta" gate of Show, Attend and Tell
            input_dim = c.embed_dim + c.feature_dim
        else:
            self.attention, self.gate = None, None
            input_dim = c.embed_dim
        cell = CELLS[c.cell]
        self.cells = nn.ModuleList(
            [cell(input_dim if i == 0 else c.hidden_dim, c.hidden_dim) for i in range(c.num_layers)]
        )
        self.dropout = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(c.hidden_dim, c.vocab_size)

    def memory_and_state(self, grid: Tensor) -> tuple[Memory, State]:
        """Turn an encoder grid (batch, C, H, W) into the attention memory and the initial recurrent state."""
        features = grid.flatten(2).transpose(1, 2)  # (batch, N, C)
        pooled = features.mean(dim=1)
        batch, layers, hidden = features.size(0), self.config.num_layers, self.config.hidden_dim
        h = torch.tanh(self.init_h(pooled)).view(batch, layers, hidden)
        state: State = (h, torch.tanh(self.init_c(pooled)).view(batch, layers, hidden)) if self.is_lstm else (h,)
        memory: Memory = (features, self.attention.key(features)) if self.attention is not None else ()
        return memory, state

    def _recur(self, embedded: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, Tensor | None]:
        """One time step through the stacked cells; returns the top hidden state, the new state and alpha."""
        h_prev = state[0]
        alpha = None
        x = embedded
        if self.attention is not None:
            top = h_prev[:, -1]
            context, alpha = self.attention(memory[0], memory[1], top)
            x = torch.cat([embedded, torch.sigmoid(self.gate(top)) * context], dim=1)
        new_h, new_c = [], []
        for layer, cell in enumerate(self.cells):
            if self.is_lstm:
                h, c = cell(x, (h_prev[:, layer], state[1][:, layer]))
                new_c.append(c)
            else:
                h = cell(x, h_prev[:, layer])
            new_h.append(h)
            x = self.dropout(h)  # dropout between stacked layers (and before the classifier)
        h_stack = torch.stack(new_h, dim=1)
        new_state: State = (h_stack, torch.stack(new_c, dim=1)) if self.is_lstm else (h_stack,)
        return new_h[-1], new_state, alpha

    def step(self, tokens: Tensor, state: State, memory: Memory) -> tuple[Tensor, State, Tensor | None]:
        """Advance one word: previous tokens (batch,) -> logits (batch, vocab), new state, attention weights."""
        top, state, alpha = self._recur(self.dropout(self.embed(tokens)), state, memory)
        return self.classifier(self.dropout(top)), state, alpha

    def forward_from(
        self, tokens: Tensor, state: State, memory: Memory, sample_prob: float = 0.0
    ) -> tuple[Tensor, State, Tensor | None]:
        """Teacher-forced pass over ``tokens`` (batch, T) from a given state (truncated backprop continues from it).

        With ``sample_prob`` > 0 (scheduled sampling, Bengio et al. 2015) each row's input after the first step is,
        with that probability, a word sampled from the decoder's own previous prediction instead of the reference's,
        so training sees the model's own mistakes as it will when decoding. Returns logits (batch, T, vocab), the
        final state and attention weights (batch, T, N) or None.
        """
        embedded = self.dropout(self.embed(tokens))
        tops, alphas = [], []
        for t in range(tokens.size(1)):
            word = embedded[:, t]
            if sample_prob > 0 and t > 0:
                with torch.no_grad():  # the choice of input is not differentiated through
                    previous = self.classifier(self.dropout(tops[-1])).float().softmax(dim=1)
                    sampled = torch.multinomial(previous, 1).squeeze(1)
                    use_own = torch.rand(tokens.size(0), device=tokens.device) < sample_prob
                word = torch.where(use_own.unsqueeze(1), self.dropout(self.embed(sampled)), word)
            top, state, alpha = self._recur(word, state, memory)
            tops.append(top)
            if alpha is not None:
                alphas.append(alpha)
        logits = self.classifier(self.dropout(torch.stack(tops, dim=1)))
        return logits, state, (torch.stack(alphas, dim=1) if alphas else None)

    def forward(self, grid: Tensor, tokens: Tensor, sample_prob: float = 0.0) -> tuple[Tensor, Tensor | None]:
        """Teacher forcing: logits for predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]`` are returned for all T.

        ``sample_prob``: scheduled sampling's probability of feeding the decoder's own word (see ``forward_from``).
        """
        memory, state = self.memory_and_state(grid)
        logits, _, alphas = self.forward_from(tokens, state, memory, sample_prob)
        return logits, alphas


def masked_cross_entropy(logits: Tensor, targets: Tensor, pad: int = 0, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over non-padding target positions."""
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=pad, label_smoothing=label_smoothing
    )
