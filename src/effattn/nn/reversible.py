"""Reversible residual layers (RevNet, as used by Reformer).

A block maps ``(x1, x2)`` to ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``.  The inputs can be
recomputed from the outputs (``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``), so a stack of them
keeps only its final output for backward: activation memory does not grow with depth.
Each branch records the RNG state of its forward call and replays it when recomputing,
so dropout (and any randomness in the attention method) is identical in backward.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class ReplayRNG(nn.Module):
    """Wraps a module; ``forward(*a, record_rng=bool, replay_rng=bool, **kw)``.

    ``record_rng=True`` saves the CPU (and CUDA, when initialized) RNG state before the call;
    ``replay_rng=True`` runs the call under that saved state, restoring the outer state after.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self._cpu_state: Optional[torch.Tensor] = None
        self._cuda_states = None
        self._cuda_devices: list = []

    def forward(self, *args, record_rng: bool = False, replay_rng: bool = False, **kwargs):
        if record_rng:
            self._cpu_state = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                self._cuda_devices = list(range(torch.cuda.device_count()))
                self._cuda_states = [torch.cuda.get_rng_state(d) for d in self._cuda_devices]
        if not replay_rng:
            return self.net(*args, **kwargs)
        if self._cpu_state is None:
            raise RuntimeError("replay_rng: no RNG state was recorded by a forward pass")
        with torch.random.fork_rng(devices=self._cuda_devices):
            torch.set_rng_state(self._cpu_state)
            if self._cuda_states is not None:
                for d, s in zip(self._cuda_devices, self._cuda_states):
                    torch.cuda.set_rng_state(s, d)
            return self.net(*args, **kwargs)


class ReversibleBlock(nn.Module):
    """``(x1, x2) -> (x1 + F(x2, **f_kwargs), x2 + G(y1))``, all ``[B, N, dim]``.

    ``F`` is typically :class:`~effattn.nn.block.AttentionBranch` (gets ``padding_mask``)
    and ``G`` a :class:`~effattn.nn.block.FeedForwardBranch`.
    """

    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        self.f = ReplayRNG(f)
        self.g = ReplayRNG(g)

    def forward(self, x1, x2, f_kwargs: Optional[dict] = None, record_rng: bool = False):
        f_kwargs = f_kwargs or {}
        y1 = x1 + self.f(x2, record_rng=record_rng, **f_kwargs)
        y2 = x2 + self.g(y1, record_rng=record_rng)
        return y1, y2

    def backward_pass(self, y1, y2, dy1, dy2, f_kwargs: Optional[dict] = None):
        """Recompute the inputs from ``(y1, y2)`` and push ``(dy1, dy2)`` through the block.

        Parameter gradients accumulate into ``.grad``; returns ``(x1, x2, dx1, dx2)``.
        """
        f_kwargs = f_kwargs or {}
        with torch.enable_grad():
            y1_leaf = y1.detach().requires_grad_(True)
            gy1 = self.g(y1_leaf, replay_rng=True)
            torch.autograd.backward(gy1, dy2)
        with torch.no_grad():
            x2 = y2 - gy1
            dx1 = dy1 + y1_leaf.grad
            del gy1
        with torch.enable_grad():
            x2_leaf = x2.detach().requires_grad_(True)
            fx2 = self.f(x2_leaf, replay_rng=True, **f_kwargs)
            torch.autograd.backward(fx2, dx1)
        with torch.no_grad():
            x1 = y1 - fx2
            dx2 = dy2 + x2_leaf.grad
        return x1, x2, dx1, dx2


class _ReversibleFunction(torch.autograd.Function):
    """Runs reversible blocks without storing activations; backward reconstructs them."""

    @staticmethod
    def forward(ctx, x1, x2, blocks, f_kwargs, *params):
        with torch.no_grad():
            for block in blocks:
                x1, x2 = block(x1, x2, f_kwargs, record_rng=True)
        ctx.blocks = blocks
        ctx.f_kwargs = f_kwargs
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        for block in reversed(ctx.blocks):
            y1, y2, dy1, dy2 = block.backward_pass(y1, y2, dy1, dy2, ctx.f_kwargs)
        return (dy1, dy2, None, None) + (None,) * len(ctx.needs_input_grad[4:])


class ReversibleSequence(nn.Module):
    """A stack of :class:`ReversibleBlock`: ``forward(x [B, N, dim], **f_kwargs) -> [B, N, dim]``.

    The input is duplicated into both streams and the output is their mean.  With
    ``reversible=False`` the same computation runs under ordinary autograd (storing every
    activation) — the reference the reversible backward must reproduce.  In eval mode or
    without gradients the plain forward is used (nothing to save either way).
    """

    def __init__(self, blocks: list[ReversibleBlock], reversible: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.reversible = reversible

    def forward(self, x: torch.Tensor, **f_kwargs) -> torch.Tensor:
        x1 = x2 = x
        if self.reversible and torch.is_grad_enabled():
            params = [p for p in self.parameters() if p.requires_grad]
            x1, x2 = _ReversibleFunction.apply(x1, x2, list(self.blocks), f_kwargs, *params)
        else:
            for block in self.blocks:
                x1, x2 = block(x1, x2, f_kwargs)
        return (x1 + x2) / 2
