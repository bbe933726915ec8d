"""Token embedding plus an additive positional encoding."""

from __future__ import annotations

import torch
from torch import nn

from effattn.nn.positional import make_positional


class TokenEmbedding(nn.Module):
    """``tokens [B, N] (long) -> [B, N, dim]``: embedding, additive positions, dropout.

    ``pos`` is ``learned`` (table of ``max_len``), ``sinusoidal``, or ``rotary``/``none``
    (nothing added here; rotary acts inside attention).
    """

    def __init__(self, vocab_size: int, dim: int, max_len: int, pos: str = "learned",
                 dropout: float = 0.0):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.tokens.weight, std=0.02)
        self.positional = make_positional(pos, max_len, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """``prefix [B, P, dim]`` (e.g. a CLS token) is prepended before positions are added."""
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens: expected an integer tensor [B, N], got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.tokens.num_embeddings):
            raise ValueError(f"tokens: ids must lie in [0, {self.tokens.num_embeddings}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        x = self.tokens(tokens)
        if prefix is not None:
            x = torch.cat([prefix.to(x.dtype), x], dim=1)
        if self.positional is not None:
            x = self.positional(x)
        return self.dropout(x)
