"""The pre-norm transformer block and its two residual branches."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from effattn.nn.attention import MultiheadAttention
from effattn.nn.feedforward import ChunkedFeedForward


class AttentionBranch(nn.Module):
    """``F(x) = Dropout(MultiheadAttention(LayerNorm(x)))``: ``[B, N, dim] -> [B, N, dim]``."""

    def __init__(self, dim: int, heads: int, method: str = "full", *, dropout: float = 0.0,
                 **attn_kwargs: Any):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiheadAttention(dim, heads, method, **attn_kwargs)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.dropout(self.attn(self.norm(x), padding_mask=padding_mask))


class FeedForwardBranch(nn.Module):
    """``G(x) = Dropout(ChunkedFeedForward(LayerNorm(x)))``: ``[B, N, dim] -> [B, N, dim]``."""

    def __init__(self, dim: int, *, mult: int = 4, chunks: int = 1, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ff = ChunkedFeedForward(dim, mult, dropout, chunks)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.ff(self.norm(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block ``x + F(x)`` then ``+ G(.)`` (attention, then feed-forward).

    ``forward(x [B, N, dim], padding_mask bool [B, N] | None) -> [B, N, dim]``.  Keyword
    arguments other than the feed-forward/dropout ones go to :class:`MultiheadAttention`
    (``causal``, ``shared_qk``, ``dim_head``, ``rotary`` and the method's own options).
    """

    def __init__(self, dim: int, heads: int, method: str = "full", *, ff_mult: int = 4,
                 ff_chunks: int = 1, dropout: float = 0.0, **attn_kwargs: Any):
        super().__init__()
        self.attn_branch = AttentionBranch(dim, heads, method, dropout=dropout, **attn_kwargs)
        self.ff_branch = FeedForwardBranch(dim, mult=ff_mult, chunks=ff_chunks, dropout=dropout)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn_branch(x, padding_mask=padding_mask)
        return x + self.ff_branch(x)
