"""Sequence classification with a transformer encoder (ListOps, Pathfinder as pixels)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from effattn.nn.embedding import TokenEmbedding
from effattn.nn.stack import TransformerStack

POOLING = ("cls", "mean")


def masked_mean(x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over real positions: ``x [B, N, D]``, ``padding_mask`` bool ``[B, N]`` -> ``[B, D]``."""
    if padding_mask is None:
        return x.mean(1)
    w = padding_mask.to(x.dtype)[..., None]
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


class EncoderClassifier(nn.Module):
    """``tokens [B, N] -> logits [B, num_classes]`` through a bidirectional encoder.

    ``pool="cls"`` prepends a learned class token and reads its output; ``"mean"``
    averages real positions.  Padding (``padding_mask`` False) is never attended and never
    pooled, so the logits do not depend on what the padded positions hold.
    Remaining keyword arguments go to :class:`~effattn.nn.stack.TransformerStack`.
    """

    def __init__(self, vocab_size: int, num_classes: int, *, dim: int = 128, depth: int = 2,
                 heads: int = 4, method: str = "full", max_len: int = 2048, pos: str = "learned",
                 pool: str = "cls", dropout: float = 0.0, **stack_kwargs: Any):
        super().__init__()
        if pool not in POOLING:
            raise ValueError(f"pool: expected one of {POOLING}, got {pool!r}")
        self.pool = pool
        self.embed = TokenEmbedding(vocab_size, dim, max_len + (pool == "cls"), pos, dropout)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if pool == "cls" else None
        self.encoder = TransformerStack(dim, depth, heads, method, causal=False, dropout=dropout,
                                        rotary=pos == "rotary", **stack_kwargs)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``tokens [B, N]`` long, ``padding_mask`` bool ``[B, N]`` -> ``[B, num_classes]``."""
        b = tokens.shape[0]
        if self.cls is not None:
            x = self.embed(tokens, prefix=self.cls.expand(b, -1, -1))
            if padding_mask is not None:
                padding_mask = torch.cat([padding_mask.new_ones(b, 1), padding_mask], dim=1)
        else:
            x = self.embed(tokens)
        h = self.encoder(x, padding_mask=padding_mask)
        pooled = h[:, 0] if self.cls is not None else masked_mean(h, padding_mask)
        return self.head(pooled)
