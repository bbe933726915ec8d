"""A depth-``L`` stack of transformer blocks, standard or reversible."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from effattn.nn.block import TransformerBlock
from effattn.nn.reversible import ReversibleBlock, ReversibleSequence


class TransformerStack(nn.Module):
    """``depth`` :class:`TransformerBlock` s followed by a final LayerNorm.

    ``forward(x [B, N, dim], padding_mask bool [B, N] | None) -> [B, N, dim]``.
    ``reversible=True`` runs the same branches as :class:`ReversibleBlock` s (Reformer),
    whose backward recomputes activations instead of storing them.  ``layer_options``
    (one dict per layer) adds per-layer method options, e.g. Swin's alternating ``shift``.
    Other keyword arguments go to every block (``causal``, ``shared_qk``, ``rotary``,
    ``ff_mult``, ``ff_chunks``, ``dropout`` and the method's options).
    """

    def __init__(self, dim: int, depth: int, heads: int, method: str = "full", *,
                 reversible: bool = False, layer_options: Optional[Sequence[dict]] = None,
                 **block_kwargs: Any):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth: expected a positive int, got {depth!r}")
        if layer_options is not None and len(layer_options) != depth:
            raise ValueError(f"layer_options: expected {depth} dicts (one per layer), got {len(layer_options)}")
        per_layer = list(layer_options) if layer_options is not None else [{}] * depth
        blocks = [TransformerBlock(dim, heads, method, **{**block_kwargs, **opts}) for opts in per_layer]
        self.reversible = reversible
        if reversible:
            self.layers = ReversibleSequence(
                [ReversibleBlock(b.attn_branch, b.ff_branch) for b in blocks])
        else:
            self.layers = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.reversible:
            x = self.layers(x, padding_mask=padding_mask)
        else:
            for block in self.layers:
                x = block(x, padding_mask=padding_mask)
        return self.norm(x)
