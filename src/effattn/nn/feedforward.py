"""Position-wise feed-forward networks, plain and chunked (Reformer)."""

from __future__ import annotations

import torch
from torch import nn


class FeedForward(nn.Module):
    """``Linear(dim, mult*dim) -> GELU -> Dropout -> Linear(mult*dim, dim)``: ``[B, N, dim] -> [B, N, dim]``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ChunkedFeedForward(nn.Module):
    """A :class:`FeedForward` applied to ``chunks`` groups of positions one at a time.

    ``[B, N, dim] -> [B, N, dim]``; the result equals the unchunked FFN (it is position-wise)
    while the ``[B, N, mult*dim]`` hidden tensor only ever exists for ``N / chunks``
    positions at once (Reformer's chunking; the saving is realized where activations are
    not kept, e.g. inside a reversible block or at inference).
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, chunks: int = 1):
        super().__init__()
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks: expected a positive int, got {chunks!r}")
        self.chunks = chunks
        self.ff = FeedForward(dim, mult, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunks == 1:
            return self.ff(x)
        return torch.cat([self.ff(c) for c in x.chunk(self.chunks, dim=1)], dim=1)
