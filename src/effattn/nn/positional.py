"""Positional encodings: learned and sinusoidal (added to token embeddings) and rotary
(applied to queries and keys inside attention).
"""

from __future__ import annotations

import math

import torch
from torch import nn

POSITIONAL = ("learned", "sinusoidal", "rotary", "none")


def sinusoidal_table(n: int, dim: int, *, base: float = 10000.0, device=None,
                     dtype=torch.float32) -> torch.Tensor:
    """The Transformer's fixed encoding ``[n, dim]``: sin on even, cos on odd channels."""
    pos = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float64)
                     * (-math.log(base) / dim))
    table = torch.zeros(n, dim, device=device, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.to(dtype)


class LearnedPositional(nn.Module):
    """Adds a learned embedding per position: ``[B, N, dim] -> [B, N, dim]`` (N <= max_len)."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.max_len = max_len
        self.embedding = nn.Parameter(torch.randn(max_len, dim) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        if n > self.max_len:
            raise ValueError(f"x: sequence length {n} exceeds the positional table's max_len {self.max_len}")
        return x + self.embedding[:n].to(x.dtype)


class SinusoidalPositional(nn.Module):
    """Adds the fixed sinusoidal encoding: ``[B, N, dim] -> [B, N, dim]``, any N."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + sinusoidal_table(x.shape[1], self.dim, device=x.device, dtype=x.dtype)


class Rotary(nn.Module):
    """Rotary position embedding (RoFormer) for ``[B, H, N, D]`` queries/keys (D even).

    Channel pairs ``(2i, 2i+1)`` are rotated by angle ``pos * base^(-2i/D)``, so the score
    of a query at ``m`` and key at ``n`` depends on ``m - n`` only through the rotation.
    """

    def __init__(self, dim_head: int, base: float = 10000.0):
        super().__init__()
        if dim_head % 2:
            raise ValueError(f"dim_head: rotary embeddings need an even head dim, got {dim_head}")
        self.dim_head = dim_head
        self.base = base

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, H, N, D]`` rotated by position (``positions [N]``, default ``arange(N)``)."""
        n, d = x.shape[-2], x.shape[-1]
        cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        if positions is None:
            positions = torch.arange(n, device=x.device)
        inv = self.base ** (-torch.arange(0, d, 2, device=x.device, dtype=cdt) / d)
        ang = positions.to(cdt)[:, None] * inv[None, :]
        cos, sin = ang.cos(), ang.sin()
        xf = x.to(cdt)
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        return out.to(x.dtype)


def make_positional(kind: str, max_len: int, dim: int) -> nn.Module | None:
    """The additive encoding module for ``kind`` (None for ``rotary``/``none``)."""
    if kind not in POSITIONAL:
        raise ValueError(f"pos: expected one of {POSITIONAL}, got {kind!r}")
    if kind == "learned":
        return LearnedPositional(max_len, dim)
    if kind == "sinusoidal":
        return SinusoidalPositional(dim)
    return None
