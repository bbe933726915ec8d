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
adds the results.  The parts must cover disjoint (query, key) pairs.  Every part adds its gradient into one
set of buffers (the engine writes straight into them where no reordering is involved).

An :class:`EnginePart` is one engine layout, optionally on reordered tokens (``rows``, a
permutation with padding slots: residue classes, 2-D windows), on a gathered subset of
the keys (``keys``: summary keys), or on a range of the queries and a prefix of the keys
(``q_rows``, ``k_stop``: BigBird's global rows and the rest, each with its own layout).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from effattn.mechanisms._layout import flat_rows, take_rows
from effattn.mechanisms._scratch import Workspace, kept_workspace
from effattn.result_pool import pooled_empty, pooled_zeros
from effattn.mechanisms.blocksparse import (
    BACKEND_CALLS, RecomputedAttention, block_sparse_attention, block_sparse_backward,
    block_sparse_forward, native_rows_backward, native_rows_forward,
)
from effattn.softmax import merge_pair_, stat_dtype


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
      queries are not reordered);
    - ``q_rows = (a, b)``: the part's queries are rows ``a:b`` only (``options`` give their
      ``q_pos``); ``k_stop``: its keys and values are rows ``:k_stop`` (``options`` give
      ``k_valid`` for those).  Not with ``rows``.
    - ``sdpa``: a dense part (``kv_blocks`` None) without any mask rule — every query sees
      every key of the part — whose float32 CPU forward and backward inside a union run
      through torch's fused CPU flash-attention kernels, which return the log-sum-exp and
      take the union's ``out`` / ``lse`` in their backward (no ``dlse`` term: with a
      nonzero ``dlse`` the engine runs).  Measured on the 2-core CPU for sparse_fixed's
      summary part at N = 16,384 (1,024 gathered keys, B = 1, H = 4, D = 64): 76 vs 94 ms
      forward, 185 vs 217 ms backward.
    """

    kv_blocks: Optional[torch.Tensor]
    options: dict = field(default_factory=dict)
    rows: Optional[torch.Tensor] = None
    back: Optional[torch.Tensor] = None
    real: Optional[torch.Tensor] = None
    keys: Optional[torch.Tensor] = None
    q_rows: Optional[tuple] = None
    k_stop: Optional[int] = None
    sdpa: bool = False

    def __post_init__(self):
        if self.rows is not None and (self.q_rows is not None or self.k_stop is not None):
            raise ValueError("EnginePart: reordered rows cannot be combined with q_rows / k_stop")
        if self.sdpa and (self.kv_blocks is not None or self.rows is not None or any(
                self.options.get(key) for key in ("causal", "exclude_self", "pair_mask"))
                or self.options.get("k_valid") is not None):
            raise ValueError("EnginePart: sdpa needs a dense part without mask rules")

    def _flash(self, q: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether this call runs through the fused CPU flash kernels (see ``sdpa``; they
        need the values' head size to be the queries')."""
        return (self.sdpa and q.device.type == "cpu" and q.dtype == torch.float32
                and v.shape[-1] == q.shape[-1] and _FLASH is not None and _FLASH_BACKWARD is not None)

    def _q(self, x: torch.Tensor) -> torch.Tensor:
        """The part's query rows of a per-query tensor ``[B, H, N, ...]``."""
        return x if self.q_rows is None else x[:, :, self.q_rows[0]:self.q_rows[1]]

    def _kv(self, x: torch.Tensor) -> torch.Tensor:
        """The part's keys (or values) of ``x [B, H, N, F]``."""
        if self.keys is not None:
            return take_rows(x, self.keys[None, None])
        return x if self.k_stop is None else x[:, :, :self.k_stop]

    def _inputs(self, q, k, v, ws: Optional[Workspace] = None):
        """The part's ``(q, k, v)``: slices or views, or reordered copies (in ``ws``'s
        buffers when given: no gradient)."""
        if self.rows is not None:
            r = self.rows[None, None]
            return tuple(take_rows(x, r, ws, name) for x, name in zip((q, k, v), "qkv"))
        return self._q(q), self._kv(k), self._kv(v)

    def _query_order(self, x: torch.Tensor, padding=None, ws: Optional[Workspace] = None,
                     name: str = "") -> torch.Tensor:
        """Per-query tensor ``[B, H, N, ·]`` or ``[B, H, N]`` in the part's query order (its
        rows only, with ``q_rows``; reordered copies in ``ws``'s buffer ``name`` when
        given); padding slots get the value ``padding`` (None: whatever row they repeat)."""
        if self.rows is None:
            return self._q(x)
        y = take_rows(x, self.rows[None, None], ws, name)
        if padding is not None and not bool(self.real.all()):
            y.masked_fill_(~self.real.view(-1, *([1] * (y.dim() - 3))), padding)
        return y

    def _slot_rows(self) -> torch.Tensor:
        """The original row of each slot, ``-1`` for a padding slot (``rows`` given)."""
        return torch.where(self.real, self.rows, torch.full_like(self.rows, -1))

    def _original_order(self, x: torch.Tensor, ws: Optional[Workspace] = None,
                        name: str = "") -> torch.Tensor:
        return x if self.rows is None else take_rows(x, self.back[None, None], ws, name)

    def attend(self, q, k, v, need_lse: bool = True, out: Optional[torch.Tensor] = None):
        """The part alone, differentiable (FlexAttention where it serves): ``q [B,H,N,D]``,
        ``k``, ``v [B,H,N,Dv]`` -> ``(out [B,H,N,Dv]`` in q's dtype, ``lse [B,H,N]`` or
        None) in the original order (the ``q_rows`` only, with those).  ``out``: without
        gradients, the tensor that receives the output (``[B, H, b - a, Dv]`` with
        ``q_rows = (a, b)``, e.g. those rows of the whole output; not with ``rows``)."""
        if out is not None and self.rows is not None:
            raise ValueError("EnginePart.attend: out is not supported with reordered rows")
        o, lse = block_sparse_attention(*self._inputs(q, k, v), self.kv_blocks,
                                        need_lse=need_lse, out=out, **self.options)
        return self._original_order(o), None if lse is None else self._original_order(lse)

    def forward(self, q, k, v):
        """No-grad forward: ``(out [B,H,N,Dv], lse [B,H,N])`` in the statistics dtype,
        original order (the ``q_rows`` only, with those)."""
        if self._flash(q, v):
            return _FLASH(*self._inputs(q, k, v), 0.0, False, scale=self.options["scale"])
        if self.rows is not None:  # the native kernel reads and writes the rows in place
            got = native_rows_forward(q, k, v, self._slot_rows(), self.kv_blocks, **self.options)
            if got is not None:
                return got
        # reordered inputs in the thread's kept buffers (16 MB each at N = 16,384, H = 4:
        # page-faulted in afresh every call otherwise); the results are fresh tensors
        ws = kept_workspace("union", q.device)
        out, lse = block_sparse_forward(*self._inputs(q, k, v, ws), self.kv_blocks, **self.options)
        return self._original_order(out), self._original_order(lse)

    def backward(self, q, k, v, out, lse, dout, dlse, grads) -> None:
        """Add this part's share of the gradient of a union whose final ``out [B,H,N,Dv]``,
        ``lse [B,H,N]`` and their gradients ``dout``, ``dlse`` (or None) are given into
        ``grads = [dq, dk, dv]`` (statistics dtype, shapes of q, k, v, contiguous)."""
        if self.rows is not None and native_rows_backward(
                q, k, v, out, lse, dout, dlse, self._slot_rows(), self.kv_blocks, grads, **self.options):
            return
        ws = kept_workspace("union", q.device)  # reordered copies: the thread's kept buffers
        qp, kp, vp = self._inputs(q, k, v, ws)
        # padding slots: zero output gradient and lse = +inf, so their probabilities (and
        # every gradient they would add to the real keys) are 0, not exp(S - lse of a
        # row they repeat), which can overflow
        args = (qp, kp, vp, self._query_order(out, None, ws, "out"),
                self._query_order(lse, float("inf"), ws, "lse"),
                self._query_order(dout, 0.0, ws, "dout"),
                None if dlse is None else self._query_order(dlse, 0.0, ws, "dlse"), self.kv_blocks)
        dq_acc, dk_acc, dv_acc = grads
        if self._flash(q, v) and (dlse is None or not bool(dlse.any())):
            dq, dk, dv = _FLASH_BACKWARD(args[5].contiguous(), qp, kp, vp, args[3].to(qp.dtype),
                                         args[4], 0.0, False, scale=self.options["scale"])
            self._q(dq_acc).add_(dq)
            if self.keys is None:
                self._kv(dk_acc).add_(dk)
                self._kv(dv_acc).add_(dv)
            else:
                _add_rows_(dk_acc, self.keys, dk)
                _add_rows_(dv_acc, self.keys, dv)
            return
        if self.rows is None and self.keys is None:  # the engine adds into the buffers
            block_sparse_backward(*args, acc=(self._q(dq_acc), self._kv(dk_acc), self._kv(dv_acc)),
                                  **self.options)
            return
        dq, dk, dv = block_sparse_backward(*args, **self.options)
        if self.rows is not None:  # padding slots are masked keys: their gradients are 0
            for acc, g in zip(grads, (dq, dk, dv)):
                acc.add_(self._original_order(g, ws, "grad"))
            return
        self._q(dq_acc).add_(dq)
        _add_rows_(dk_acc, self.keys, dk)
        _add_rows_(dv_acc, self.keys, dv)


def _aten_op(name: str):
    try:
        return getattr(torch.ops.aten, name)
    except (AttributeError, RuntimeError):
        return None


#: torch's fused CPU flash-attention kernels: ``(out, lse)`` forward, and the backward from
#: given ``out`` / ``lse`` (private aten ops; None where this torch lacks them)
_FLASH = _aten_op("_scaled_dot_product_flash_attention_for_cpu")
_FLASH_BACKWARD = _aten_op("_scaled_dot_product_flash_attention_for_cpu_backward")


def _add_rows_(dst: torch.Tensor, keys: torch.Tensor, x: torch.Tensor) -> None:
    """``dst [B, H, N, F]`` (contiguous) += ``x [B, H, M, F]`` at rows ``keys [M]`` (repeats
    add up)."""
    B, H, N, F = dst.shape
    dst.view(B * H * N, F).index_add_(0, flat_rows(keys[None, None], B, H, N),
                                      x.reshape(-1, F).to(dst.dtype))


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
    """Each part's rows merged on their log-sum-exp (copied where no earlier part has
    any of them); rows no part covers stay 0 and ``-inf``."""
    N = q.shape[2]
    out = lse = None
    covered = []
    for part in parts:
        o, l = part.forward(q, k, v)
        a, b = part.q_rows or (0, N)
        if out is None and (a, b) == (0, N):
            out, lse = o, l
        else:
            if out is None:
                out = pooled_zeros((*q.shape[:3], o.shape[-1]), o.dtype, o.device)
                lse = pooled_empty(q.shape[:3], l.dtype, l.device).fill_(float("-inf"))
            if any(a < d and c < b for c, d in covered):
                merge_pair_(out[:, :, a:b], lse[:, :, a:b], o, l)
            else:
                out[:, :, a:b] = o
                lse[:, :, a:b] = l
        covered.append((a, b))
    return out, lse


def _union_backward(parts, q, k, v, out, lse, dout, dlse):
    grads = [pooled_zeros(x.shape, stat_dtype(x.dtype), x.device) for x in (q, k, v)]
    for part in parts:
        part.backward(q, k, v, out, lse, dout, dlse, grads)
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
