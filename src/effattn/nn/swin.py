"""Swin-style hierarchy: ``window2d`` stages with alternating shifted windows, joined by
patch merging (each 2x2 group of patches becomes one token of twice the width)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from effattn.nn.stack import TransformerStack


def swin_layer_options(depth: int, grid: tuple[int, int], window) -> list[dict]:
    """Per-layer ``window2d`` options: the same grid and window, shift 0 then half a window, alternating."""
    win = (window, window) if isinstance(window, int) else tuple(window)
    half = tuple(w // 2 for w in win)
    return [{"grid": tuple(grid), "window": window,
             "shift": (0, 0) if i % 2 == 0 else (half if not isinstance(window, int) else half[0])}
            for i in range(depth)]


class PatchMerging(nn.Module):
    """``[B, h*w, dim]`` (row-major grid) -> ``[B, (h/2)*(w/2), 2*dim]``: concatenate each 2x2
    group, LayerNorm, project ``4*dim -> 2*dim`` (Swin).  ``h`` and ``w`` must be even."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.proj = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, d = x.shape
        h, w = grid
        x = x.view(b, h // 2, 2, w // 2, 2, d).permute(0, 1, 3, 4, 2, 5)  # [B, h/2, w/2, 2(w), 2(h), d]
        return self.proj(self.norm(x.reshape(b, (h // 2) * (w // 2), 4 * d)))


class SwinStages(nn.Module):
    """Stages of ``depths[i]`` window2d layers; stage ``i`` has width ``dim * 2^i``, ``heads * 2^i``
    heads and grid ``grid / 2^i``.  ``forward(x [B, h*w, dim]) -> [B, h*w / 4^(S-1), dim * 2^(S-1)]``.
    """

    def __init__(self, dim: int, depths: Sequence[int], heads: int, grid: tuple[int, int], window,
                 **stack_kwargs: Any):
        super().__init__()
        if not depths:
            raise ValueError("stages: expected at least one stage depth")
        h, w = grid
        if h % 2 ** (len(depths) - 1) or w % 2 ** (len(depths) - 1):
            raise ValueError(f"stages: a {h}x{w} patch grid cannot be halved {len(depths) - 1} times")
        self.grids, self.stages, self.merges = [], nn.ModuleList(), nn.ModuleList()
        for i, depth in enumerate(depths):
            g = (h >> i, w >> i)
            self.grids.append(g)
            if i:
                self.merges.append(PatchMerging(dim << (i - 1)))
            self.stages.append(TransformerStack(
                dim << i, depth, heads << i, "window2d",
                layer_options=swin_layer_options(depth, g, window), **stack_kwargs))
        self.out_dim = dim << (len(depths) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, stage in enumerate(self.stages):
            if i:
                x = self.merges[i - 1](x, self.grids[i - 1])
            x = stage(x)
        return x
