"""The LSTM language model (Anil et al. 2018: 2 layers x 1024 units, layer norm, 256-dim embeddings).

Each layer is one `nn.LSTM` (torch's fused kernel, cuDNN on GPU) followed by a
LayerNorm on its outputs. A layer-normalised LSTM *cell* (Ba et al. 2016) needs a
Python loop over time steps: measured 1.4x the training step here (H=256, E=64,
V=8k, 16x32 tokens, one CPU core, where the softmax dominates), and it would give up
cuDNN on GPU. Tied embeddings go through a projection when hidden != embedding_dim.

    logits, state = model(tokens, state)   # tokens [B, T] int, logits [B, T, V]

`state` is None (zero state) or the previous call's state: one (h, c) pair per
layer, each [1, B, H]. The returned state is detached, so carrying it across
steps (truncated backpropagation through time) never keeps an old graph alive.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codistill.datasets.commoncrawl import LSTMConfig

State = tuple[tuple[Tensor, Tensor], ...]


class LSTMLanguageModel(nn.Module):
    def __init__(self, config: LSTMConfig, vocab_size: int):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(vocab_size, config.embedding_dim)
        self.dropout = nn.Dropout(config.dropout)
        sizes = [config.embedding_dim] + [config.hidden] * config.layers
        self.lstms = nn.ModuleList(nn.LSTM(i, o, batch_first=True) for i, o in zip(sizes, sizes[1:]))
        self.norms = nn.ModuleList(nn.LayerNorm(config.hidden) if config.layer_norm else nn.Identity()
                                   for _ in range(config.layers))
        if config.tie_embeddings:
            self.projection = (nn.Linear(config.hidden, config.embedding_dim, bias=False)
                               if config.hidden != config.embedding_dim else nn.Identity())
            self.output_bias = nn.Parameter(torch.zeros(vocab_size))
        else:
            self.output = nn.Linear(config.hidden, vocab_size)

    def forward(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        x = self.dropout(self.embedding(tokens))
        new_state = []
        for i, (lstm, norm) in enumerate(zip(self.lstms, self.norms)):
            x, (h, c) = lstm(x, None if state is None else state[i])
            x = self.dropout(norm(x))
            new_state.append((h.detach(), c.detach()))
        if self.config.tie_embeddings:
            logits = nn.functional.linear(self.projection(x), self.embedding.weight, self.output_bias)
        else:
            logits = self.output(x)
        return logits, tuple(new_state)


def reset_streams(state: State | None, reset: Tensor) -> State | None:
    """Zero the state of the streams where `reset` [B] is True (a stream restarted from its beginning)."""
    if state is None or not bool(reset.any()):
        return state
    keep = (~reset).to(state[0][0].dtype).view(1, -1, 1)
    return tuple((h * keep, c * keep) for h, c in state)
