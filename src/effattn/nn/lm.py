"""Causal (decoder-only) language model over any causal-capable attention method."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from effattn.nn.embedding import TokenEmbedding
from effattn.nn.stack import TransformerStack

IGNORE_INDEX = -100


def next_token_targets(tokens: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Targets ``[B, N]`` for next-token prediction: ``tokens[:, i+1]`` at position ``i``;
    :data:`IGNORE_INDEX` at the last position and wherever the target token is padding."""
    t = torch.full_like(tokens, IGNORE_INDEX)
    t[:, :-1] = tokens[:, 1:]
    if padding_mask is not None:
        real_next = torch.zeros_like(padding_mask)
        real_next[:, :-1] = padding_mask[:, 1:] & padding_mask[:, :-1]
        t = t.masked_fill(~real_next, IGNORE_INDEX)
    return t


class CausalLM(nn.Module):
    """``tokens [B, N] -> logits [B, N, vocab_size]``; position ``i`` sees tokens ``<= i``.

    Padded keys (``padding_mask`` False) are never attended.  :meth:`loss` is the mean
    next-token cross-entropy over non-ignored targets.
    """

    def __init__(self, vocab_size: int, *, dim: int = 128, depth: int = 2, heads: int = 4,
                 method: str = "full", max_len: int = 2048, pos: str = "learned",
                 dropout: float = 0.0, **stack_kwargs: Any):
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, dim, max_len, pos, dropout)
        self.decoder = TransformerStack(dim, depth, heads, method, causal=True, dropout=dropout,
                                        rotary=pos == "rotary", **stack_kwargs)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``tokens [B, N]`` long, ``padding_mask`` bool ``[B, N]`` -> logits ``[B, N, V]``."""
        return self.head(self.decoder(self.embed(tokens), padding_mask=padding_mask))

    def loss(self, tokens: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
             targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean cross-entropy; ``targets [B, N]`` default :func:`next_token_targets`."""
        if targets is None:
            targets = next_token_targets(tokens, padding_mask)
        logits = self(tokens, padding_mask)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
