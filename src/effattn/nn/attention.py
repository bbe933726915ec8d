"""Multi-head self-attention over any registered method."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

import effattn
from effattn.nn.positional import Rotary


class MultiheadAttention(nn.Module):
    """Self-attention with q/k/v/out projections around ``effattn.get(method, **options)``.

    ``forward(x [B, N, dim], padding_mask bool [B, N] | None) -> [B, N, dim]``.
    ``shared_qk=True`` (Reformer) has no key projection: the method gets ``k=None`` and
    builds keys from the queries.  ``rotary=True`` rotates q and k by position before
    the method sees them.  Methods with learned parameters (Linformer) become submodules.
    """

    def __init__(self, dim: int, heads: int, method: str = "full", *, causal: bool = False,
                 shared_qk: bool = False, dim_head: Optional[int] = None, rotary: bool = False,
                 bias: bool = False, **method_options: Any):
        super().__init__()
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"dim: {dim} is not divisible by heads={heads}; pass dim_head")
            dim_head = dim // heads
        inner = heads * dim_head
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.method, self.causal, self.shared_qk = method, causal, shared_qk
        spec = effattn.api.spec(method)
        if causal and not spec.causal:
            raise ValueError(f"causal: method {method!r} cannot be causal. {spec.causal_error}".strip())
        if shared_qk and not spec.shared_qk:
            raise ValueError(f"shared_qk: method {method!r} does not support shared-QK")
        self.method_options = dict(method_options)
        if spec.module is not None:  # learned-parameter methods may need the head geometry
            accepted = inspect.signature(spec.module).parameters
            for name, val in (("heads", heads), ("dim", dim_head), ("dim_head", dim_head), ("dim_v", dim_head)):
                if name in accepted and self.method_options.get(name) is None:
                    self.method_options[name] = val
        self.attn = effattn.get(method, **self.method_options)
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = None if shared_qk else nn.Linear(dim, inner, bias=bias)
        self.to_v = nn.Linear(dim, inner, bias=bias)
        self.to_out = nn.Linear(inner, dim)
        self.rotary = Rotary(dim_head) if rotary else None

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x [B, N, dim]`` -> ``[B, N, dim]``; ``padding_mask`` bool ``[B, N]``, True = real."""
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected [B, N, dim={self.dim}], got shape {tuple(x.shape)}")
        q = self._heads(self.to_q(x))
        k = None if self.to_k is None else self._heads(self.to_k(x))
        v = self._heads(self.to_v(x))
        if self.rotary is not None:
            q = self.rotary(q)
            k = None if k is None else self.rotary(k)
        out = self.attn(q, k, v, causal=self.causal, padding_mask=padding_mask)
        if isinstance(out, tuple):
            out = out[0]
        b, h, n, d = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, h * d))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, method={self.method!r}, "
                f"causal={self.causal}, shared_qk={self.shared_qk}")
