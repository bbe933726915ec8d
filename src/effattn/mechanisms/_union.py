"""Attention over a union of engine layouts ("parts"), as one autograd node.

Several methods attend over the union of two patterns that run as separate engine
calls: ``sparse_strided`` (a band and the residue classes, on reordered tokens),
``sparse_fixed`` (its blocks and the gathered summary keys).  Merging the parts' outputs on
their log-sum-exp and letting autograd differentiate the merge, the reorderings and the
gathers costs several full-size passes and zero-filled buffers in the backward (at
N = 16,384 the merge, permutation and gradient-sum passes were a third of
``sparse_strided``'s training step).  The union's gradient needs none of them: with the
union's own ``out`` and ``lse``, FlashAttention's backward of each part (``P = exp(S -
lse)``, ``D = rowsum(dO * O) - dlse``) is exactly that part's share of the gradient, so
:func:`union_attention` runs each part's engine backward with the union's statistics and
adds the results.  The parts must cover disjoint (query, key) pairs.

An :class:`EnginePart` is one engine layout, optionally on reordered tokens (``rows``, a
permutation with padding slots: residue classes, 2-D windows) or on a gathered subset of
the keys (``keys``: summary keys).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from effattn.mechanisms._layout import flat_rows, take_rows
from effattn.mechanisms.blocksparse import (
    BACKEND_CALLS, RecomputedAttention, block_sparse_attention, block_sparse_backward,
    block_sparse_forward,
)
from effattn.softmax import merge_pair_


@dataclass
class EnginePart:
    """One engine call of a union.

    ``kv_blocks`` and ``options`` (keywords of
    :func:`effattn.mechanisms.blocksparse.block_sparse_attention`: block sizes, scale,
    rules, positions, ``k_valid``, ...) describe it in the part's own token order:

    - ``rows`` long ``[L]``: slot ``s`` holds the query, key and value of original row
      ``rows[s]`` (padding slots repeat some row and must be masked as keys by ``k_valid``
      and marked in ``real``); ``back`` long ``[N]``: the slot of each original row;
      ``real`` bool ``[L]``;
    - ``keys`` long ``[M]``: the part's keys and values are original rows ``keys`` (the
      queries are not reordered).
    """

    kv_blocks: Optional[torch.Tensor]
    options: dict = field(default_factory=dict)
    rows: Optional[torch.Tensor] = None
    back: Optional[torch.Tensor] = None
    real: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None

    def _inputs(self, q, k, v):
        if self.rows is not None:
            r = self.rows[None, None]
            return take_rows(q, r), take_rows(k, r), take_rows(v, r)
        if self.keys is not None:
            r = self.keys[None, None]
            return q, take_rows(k, r), take_rows(v, r)
        return q, k, v

    def _query_order(self, x: torch.Tensor, padding=None) -> torch.Tensor:
        """Per-query tensor ``[B, H, N, ·]`` or ``[B, H, N]`` in the part's query order;
        padding slots get the value ``padding`` (None: whatever row they repeat)."""
        if self.rows is None:
            return x
        y = take_rows(x, self.rows[None, None])
        if padding is not None and not bool(self.real.all()):
            y = y.masked_fill(~self.real.view(-1, *([1] * (y.dim() - 3))), padding)
        return y

    def _original_order(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.rows is None else take_rows(x, self.back[None, None])

    def attend(self, q, k, v, need_lse: bool = True):
        """The part alone, differentiable (FlexAttention where it serves): ``q [B,H,N,D]``,
        ``k``, ``v [B,H,N,Dv]`` -> ``(out [B,H,N,Dv]`` in q's dtype, ``lse [B,H,N]`` or
        None) in the original order."""
        out, lse = block_sparse_attention(*self._inputs(q, k, v), self.kv_blocks,
                                          need_lse=need_lse, **self.options)
        return self._original_order(out), None if lse is None else self._original_order(lse)

    def forward(self, q, k, v):
        """No-grad forward: ``(out [B,H,N,Dv], lse [B,H,N])`` in the statistics dtype,
        original order."""
        out, lse = block_sparse_forward(*self._inputs(q, k, v), self.kv_blocks, **self.options)
        return self._original_order(out), self._original_order(lse)

    def backward(self, q, k, v, out, lse, dout, dlse):
        """This part's share ``(dq, dk, dv)`` (statistics dtype, shapes of q, k, v) of the
        gradient of a union whose final ``out [B,H,N,Dv]``, ``lse [B,H,N]`` and their
        gradients ``dout``, ``dlse`` (or None) are given."""
        qp, kp, vp = self._inputs(q, k, v)
        # padding slots: zero output gradient and lse = +inf, so their probabilities (and
        # every gradient they would add to the real keys) are 0, not exp(S - lse of a
        # row they repeat), which can overflow
        dq, dk, dv = block_sparse_backward(
            qp, kp, vp, self._query_order(out), self._query_order(lse, float("inf")),
            self._query_order(dout, 0.0),
            None if dlse is None else self._query_order(dlse, 0.0),
            self.kv_blocks, **self.options)
        if self.rows is not None:  # padding slots are masked keys: their gradients are 0
            return self._original_order(dq), self._original_order(dk), self._original_order(dv)
        if self.keys is not None:
            return dq, _add_rows(k.shape, self.keys, dk), _add_rows(v.shape, self.keys, dv)
        return dq, dk, dv


def _add_rows(shape, keys: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Zeros of ``shape [B, H, N, F]`` (``x``'s dtype) with ``x [B, H, M, F]`` added at
    rows ``keys [M]`` (repeats add up)."""
    B, H, N, F = shape
    out = torch.zeros(B * H * N, F, dtype=x.dtype, device=x.device)
    out.index_add_(0, flat_rows(keys[None, None], B, H, N), x.reshape(-1, F))
    return out.view(B, H, N, F)


def permuted_part(N: int, pos: torch.Tensor, kv_blocks: torch.Tensor, block: int, *,
                  padding_mask: Optional[torch.Tensor] = None, **options) -> EnginePart:
    """Engine part on tokens reordered into *slots* (residue classes, 2-D windows).

    ``pos`` long ``[L]``: the original position each slot holds; ``pos >= N`` marks a
    padding slot (each with its own position, never attended).  ``kv_blocks`` and
    ``block`` describe the layout in slot order; every mask rule (causal, padding,
    self-exclusion, ``pair_mask`` in ``options``) sees original positions;
    ``padding_mask`` bool ``[B, N]`` (True = real token) or None.
    """
    real = pos < N
    src = torch.where(real, pos, torch.zeros_like(pos))
    valid = real[None]
    if padding_mask is not None:
        valid = valid & padding_mask[:, src]
    back = torch.empty(N, dtype=torch.long, device=pos.device)
    back[pos[real]] = torch.nonzero(real)[:, 0]
    return EnginePart(kv_blocks, dict(options, block_q=block, block_k=block, q_pos=pos[None, None],
                                      k_pos=pos[None, None], k_valid=valid[:, None]),
                      rows=src, back=back, real=real)


def permuted_block_attention(q, k, v, pos: torch.Tensor, kv_blocks: torch.Tensor, block: int, *,
                             scale: float, causal: bool, exclude_self: bool,
                             padding_mask: Optional[torch.Tensor], pair_mask=None,
                             need_lse: bool = True):
    """Engine attention on reordered tokens (:func:`permuted_part`), alone: ``q [B,H,N,D]``,
    ``k``, ``v [B,H,N,Dv]`` -> ``(out [B,H,N,Dv], lse [B,H,N])`` in the original order
    (``lse`` may be ``None`` with ``need_lse=False``, see :func:`block_sparse_attention`)."""
    part = permuted_part(q.shape[2], pos, kv_blocks, block, padding_mask=padding_mask,
                         scale=scale, causal=causal, exclude_self=exclude_self, pair_mask=pair_mask)
    return part.attend(q, k, v, need_lse)


def _union_forward(parts, q, k, v):
    out = lse = None
    for part in parts:
        o, l = part.forward(q, k, v)
        out, lse = (o, l) if out is None else merge_pair_(out, lse, o, l)
    return out, lse


def _union_backward(parts, q, k, v, out, lse, dout, dlse):
    grads = None
    for part in parts:
        g = part.backward(q, k, v, out, lse, dout, dlse)
        grads = list(g) if grads is None else [a.add_(b) for a, b in zip(grads, g)]
    return grads


def union_attention(q, k, v, parts: Sequence[EnginePart]):
    """Attention over the union of ``parts`` (disjoint pairs) as one autograd node that
    saves only ``q, k, v, out, lse`` and recomputes each part in its backward: ``q
    [B,H,N,D]``, ``k``, ``v [B,H,N,Dv]`` -> ``(out [B,H,N,Dv]`` in q's dtype, ``lse
    [B,H,N])``.  Rows with no allowed key in any part give 0 and ``-inf``."""
    parts = list(parts)
    BACKEND_CALLS["engine"] += 1  # the bench reports which backend ran
    out, lse = RecomputedAttention.apply(q, k, v, functools.partial(_union_forward, parts),
                                         functools.partial(_union_backward, parts))
    return out.to(q.dtype), lse
