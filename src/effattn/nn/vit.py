"""Vision Transformer: patch embedding, class token, learned positions, any attention method.

With ``method="window2d"`` the model is a Swin-style stage: attention inside local windows
of the patch grid, the windows shifted by half a window on every other layer, no class
token (mean pooling) since a class token has no place on the grid.  ``stages=(2, 2, ...)``
builds the Swin hierarchy (:class:`~effattn.nn.swin.SwinStages`): patch merging between
stages halves the grid and doubles the width and heads.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from effattn.nn.classifier import masked_mean
from effattn.nn.stack import TransformerStack
from effattn.nn.swin import SwinStages, swin_layer_options


class ViT(nn.Module):
    """``images [B, C, H, W] -> logits [B, num_classes]``.

    Patches of ``patch_size`` become tokens (a strided convolution), a class token is
    prepended (``pool="cls"``) or outputs are averaged (``pool="mean"``), learned positional
    embeddings are added and a :class:`~effattn.nn.stack.TransformerStack` encodes them.
    ``window`` (with ``method="window2d"``) sets the window size in patches; ``stages``
    (window2d only) gives the depth of each Swin stage (then ``depth`` is unused).
    """

    def __init__(self, image_size, patch_size: int, num_classes: int, *, in_channels: int = 3,
                 dim: int = 128, depth: int = 2, heads: int = 4, method: str = "full",
                 pool: Optional[str] = None, window=None, stages: Optional[Sequence[int]] = None,
                 dropout: float = 0.0, **stack_kwargs: Any):
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"image_size: {(h, w)} is not divisible by patch_size={patch_size}")
        self.grid = (h // patch_size, w // patch_size)
        self.image_size = (h, w)
        windowed = method == "window2d"
        pool = pool or ("mean" if windowed else "cls")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool: expected 'cls' or 'mean', got {pool!r}")
        if windowed and pool == "cls":
            raise ValueError("pool: window2d attends on the patch grid; use pool='mean' (no class token)")
        if windowed:
            if window is None:
                raise ValueError("window: method 'window2d' needs window=<patches per window side>")
            if "layer_options" in stack_kwargs:
                raise ValueError("layer_options: set by ViT for window2d (grid, window, alternating shift)")
            if stages is None:
                stack_kwargs["layer_options"] = swin_layer_options(depth, self.grid, window)
        elif window is not None or stages is not None:
            raise ValueError(f"window/stages: only used with method='window2d', got method={method!r}")
        self.pool = pool
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        n = self.grid[0] * self.grid[1] + (pool == "cls")
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if pool == "cls" else None
        self.positions = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.dropout = nn.Dropout(dropout)
        if stages is not None:
            self.encoder = SwinStages(dim, list(stages), heads, self.grid, window, dropout=dropout,
                                      **stack_kwargs)
            out_dim = self.encoder.out_dim
        else:
            self.encoder = TransformerStack(dim, depth, heads, method, dropout=dropout, **stack_kwargs)
            out_dim = dim
        self.head = nn.Linear(out_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, C, H, W]`` float -> ``[B, num_classes]``."""
        if images.dim() != 4 or tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"images: expected [B, C, {self.image_size[0]}, {self.image_size[1]}], "
                             f"got {tuple(images.shape)}")
        x = self.patch(images).flatten(2).transpose(1, 2)  # [B, h*w, dim], row-major grid
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.dropout(x + self.positions.to(x.dtype))
        h = self.encoder(x)
        return self.head(h[:, 0] if self.cls is not None else masked_mean(h, None))
