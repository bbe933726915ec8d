"""Sparse Transformer factorized attention (Child et al. 2019): ``sparse_strided`` and
``sparse_fixed``.

With stride ``l`` (and, for *fixed*, ``c`` summary positions), query ``i`` sees key ``j`` when

- strided: A1 = ``|i - j| < l`` (the previous ``l`` positions), A2 = ``(i - j) mod l == 0``;
- fixed:   A1 = ``floor(j / l) == floor(i / l)`` (same block), A2 = ``j mod l >= l - c``
  (the summary positions at the end of every block);

``causal=True`` (the paper's setting) adds ``j <= i``; without it the patterns are the
symmetric versions above.  Each head sees A1 ∪ A2, or with ``per_head=True`` even heads
see A1 and odd heads A2 (the paper's interleaved multi-head variant).

Both components run through the block-sparse engine so that the cost is the paper's
``O(N·(l + N/l))``: A1 is a band / block-diagonal layout; strided A2 runs on the tokens
reordered by residue ``i mod l`` (each residue class is a run of blocks that sees
itself); fixed A2 runs over the gathered summary keys.  The two parts are merged on
their log-sum-exp, the pairs both patterns contain (the diagonal for strided, the
summary keys of the own block for fixed) counted once, as one autograd node whose backward
runs each part's engine backward with the union's statistics
(:func:`effattn.mechanisms._union.union_attention`).
"""

from __future__ import annotations

import functools

import torch

from effattn.api import register
from effattn.masks import distance_rule, elementwise
from effattn.mechanisms._layout import (
    band_full_slots, band_layout, block_bounds, check_int, check_same_length, compact_layout,
    engine_flops, n_blocks, range_candidates,
)
from effattn.mechanisms._union import EnginePart, permuted_part, union_attention
from effattn.softmax import stat_dtype

SPARSE_OPTIONS = {"stride": 128, "block_size": 64, "per_head": False}


def _check(stride, block_size, per_head, summary=None):
    check_int("stride", stride, 1)
    check_int("block_size", block_size, 1)
    if not isinstance(per_head, bool):
        raise ValueError(f"per_head: expected a bool, got {per_head!r}")
    if summary is not None:
        check_int("summary", summary, 1)
        if summary > stride:
            raise ValueError(f"summary: expected 1 <= summary <= stride = {stride}, got {summary}")


# ---------------------------------------------------------------- the engine passes


def _local_part(layout, block, *, scale, causal, exclude_self, k_valid, pair_mask, full_slots=None):
    """A1 (the band / block-diagonal part) as an engine part on the original order."""
    return EnginePart(layout, dict(block_q=block, block_k=block, scale=scale, causal=causal,
                                   exclude_self=exclude_self, k_valid=k_valid,
                                   pair_mask=pair_mask, full_slots=full_slots))


def _strided_local_layout(N, stride, block, causal, device):
    return band_layout(N, block, block, stride - 1, 0 if causal else stride - 1, device)[None, None]


def _residue_order(N: int, stride: int, block: int, device):
    """Token order grouping positions by ``i mod stride``.

    Returns ``(pos [L], bm, per_class)``: slot ``s`` holds original position ``pos[s]``
    (``>= N`` marks a padding slot, each with its own position), classes occupy
    ``per_class`` blocks of ``bm`` slots.
    """
    m = n_blocks(N, stride)
    bm = min(m, block)
    per_class = n_blocks(m, bm)
    slots = per_class * bm
    r = torch.arange(stride, device=device)[:, None]
    t = torch.arange(slots, device=device)[None, :]
    pos = (t * stride + r).reshape(-1)
    real = (t < m).expand(stride, slots).reshape(-1) & (pos < N)
    pos = torch.where(real, pos, N + torch.arange(pos.numel(), device=device))
    return pos, bm, per_class


#: largest residue class (slots) attended as one engine block when non-causal: its keys are
#: then a view of the reordered rows (the engine's band path, no gathered block copies);
#: larger classes, and causal ones (which skip the blocks above the diagonal), stay in
#: blocks of ``min(block_size, N / stride)``
CLASS_BLOCK_MAX = 512


def _residue_plan(N: int, stride: int, block: int, causal: bool, device):
    """``(pos, layout, block)`` of the residue pass: slot order (:func:`_residue_order`),
    its engine layout and block size."""
    pos, bm, per_class = _residue_order(N, stride, block, device)
    if not causal and per_class * bm <= CLASS_BLOCK_MAX:  # one block per class, itself
        return pos, torch.arange(stride, device=device).view(1, 1, stride, 1), per_class * bm
    return pos, _residue_layout(stride, per_class, causal, device), bm


def _residue_layout(stride, per_class, causal, device):
    qb = torch.arange(stride * per_class, device=device)
    local = torch.arange(per_class, device=device)
    cand = (qb // per_class)[:, None] * per_class + local[None, :]
    allowed = torch.ones_like(cand, dtype=torch.bool)
    if causal:  # slots of a class are in increasing position order
        allowed = local[None, :] <= (qb % per_class)[:, None]
    return compact_layout(allowed, cand)[None, None]


def _strided_residue_part(N, stride, block, *, scale, causal, exclude_self, padding_mask,
                          skip_diagonal, device):
    """A2 of the strided pattern: an engine part on residue-ordered tokens."""
    pos, layout, bm = _residue_plan(N, stride, block, causal, device)
    return permuted_part(N, pos, layout, bm, padding_mask=padding_mask, scale=scale, causal=causal,
                         exclude_self=exclude_self,
                         pair_mask=distance_rule(off_diagonal=True) if skip_diagonal else None)


def _fixed_local_layout(N, stride, block, causal, device):
    qb = torch.arange(n_blocks(N, block), device=device)
    q_lo, q_hi = block_bounds(N, block, qb)
    first = torch.div(q_lo, stride, rounding_mode="floor") * stride
    last = torch.div(q_hi, stride, rounding_mode="floor") * stride + stride - 1
    last = torch.clamp(q_hi if causal else last, max=N - 1)
    cand = range_candidates(first, last, block)
    return compact_layout(cand >= 0, cand)[None, None]


def _summary_positions(N, stride, summary, device):
    j = torch.arange(N, device=device)
    return j[j % stride >= stride - summary]


def _fixed_summary_part(N, stride, summary, block, *, scale, causal, exclude_self, padding_mask,
                        device):
    """A2 of the fixed pattern: every query over the gathered summary keys (an engine part
    on a key subset); None when no summary position exists."""
    idx = _summary_positions(N, stride, summary, device)
    if idx.numel() == 0:
        return None
    valid = None if padding_mask is None else padding_mask[:, idx][:, None]
    # every query over every summary key: SDPA's fused kernels where nothing is masked
    return EnginePart(None, dict(block_q=block, block_k=min(block, idx.numel()), scale=scale,
                                 causal=causal, exclude_self=exclude_self, k_pos=idx[None, None],
                                 k_valid=valid), keys=idx,
                      sdpa=not causal and not exclude_self and valid is None)


# ---------------------------------------------------------------- combining the two parts


def _by_heads(H, part1, part2, q, k, v):
    """Even heads through ``part1``, odd heads through ``part2``; ``(out, lse)`` over all
    heads (``lse`` ``None`` when a part returned none)."""
    even, odd = torch.arange(0, H, 2), torch.arange(1, H, 2)
    res = [part1(q[:, even], k[:, even], v[:, even])]
    if odd.numel():
        res.append(part2(q[:, odd], k[:, odd], v[:, odd]))
    inv = torch.argsort(torch.cat([even, odd])).to(q.device)
    out = torch.cat([r[0] for r in res], 1).index_select(1, inv)
    if any(r[1] is None for r in res):
        return out, None
    lse = torch.cat([r[1] for r in res], 1).index_select(1, inv)
    return out, lse


def _attend_parts(q, k, v, part1, part2, per_head, return_lse):
    """The union of two disjoint parts (one autograd node: :func:`union_attention`), or
    with ``per_head`` even heads through ``part1`` and odd heads through ``part2`` alone
    (FlexAttention may serve those where no lse is needed)."""
    if not per_head:
        return union_attention(q, k, v, [p for p in (part1, part2) if p is not None])

    def alone(part):
        if part is not None:
            return functools.partial(part.attend, need_lse=return_lse)
        return lambda q, k, v: (q.new_zeros(*q.shape[:3], v.shape[-1]),
                                torch.full(q.shape[:3], float("-inf"), dtype=stat_dtype(q.dtype),
                                           device=q.device))
    return _by_heads(q.shape[1], alone(part1), alone(part2), q, k, v)


def sparse_strided(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk,
                   stride=128, block_size=64, per_head=False):
    """Strided Sparse Transformer attention.

    ``q [B,H,N,D]``, ``k [B,H,N,D]``, ``v [B,H,N,Dv]`` -> ``(out [B,H,N,Dv], lse [B,H,N])``.
    ``stride`` = l; ``block_size`` = engine block of the local part (the residue part uses
    ``min(block_size, ceil(N / l))``); ``per_head`` as in the module docstring.
    """
    _check(stride, block_size, per_head)
    dtype = q.dtype
    check_same_length(q, k, "sparse_strided")
    # the engine scales each query tile as it goes (a scaled copy of q up front was a pass
    # over a fresh [B, H, N, D] tensor: 4.3 ms of an 85 ms forward at N = 16,384)
    N = q.shape[2]
    local = _strided_local_layout(N, stride, block_size, causal, q.device)
    # slots inside |i - j| < stride (and j <= i, causal) skip the pair rules
    full = band_full_slots(local, N, block_size, stride - 1, 0 if causal else stride - 1)
    part1 = _local_part(local, block_size, scale=scale, causal=causal, exclude_self=shared_qk,
                        k_valid=None if padding_mask is None else padding_mask[:, None],
                        pair_mask=distance_rule(stride - 1),
                        full_slots=full)
    # the union counts the diagonal (in both patterns) once: the residue part skips it
    part2 = _strided_residue_part(N, stride, block_size, scale=scale, causal=causal,
                                  exclude_self=shared_qk,
                                  padding_mask=padding_mask, skip_diagonal=not per_head,
                                  device=q.device)
    out, lse = _attend_parts(q, k, v, part1, part2, per_head, return_lse)
    return out.to(dtype), lse


def sparse_fixed(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk,
                 stride=128, summary=8, block_size=64, per_head=False):
    """Fixed Sparse Transformer attention.

    Shapes as :func:`sparse_strided`; ``summary`` = c, the summary positions at the end
    of every block of ``stride`` positions.
    """
    _check(stride, block_size, per_head, summary)
    dtype = q.dtype
    check_same_length(q, k, "sparse_fixed")
    N = q.shape[2]
    local = _fixed_local_layout(N, stride, block_size, causal, q.device)
    l, c = stride, summary
    skip_summary = not per_head  # the union counts the own block's summary keys once

    @elementwise
    def same_block(a, b):
        same = torch.div(a, l, rounding_mode="floor") == torch.div(b, l, rounding_mode="floor")
        return same & (b % l < l - c) if skip_summary else same

    part1 = _local_part(local, block_size, scale=scale, causal=causal, exclude_self=shared_qk,
                        k_valid=None if padding_mask is None else padding_mask[:, None],
                        pair_mask=same_block)
    part2 = _fixed_summary_part(N, l, c, block_size, scale=scale, causal=causal,
                                exclude_self=shared_qk,
                                padding_mask=padding_mask, device=q.device)
    out, lse = _attend_parts(q, k, v, part1, part2, per_head, return_lse)
    return out.to(dtype), lse


# ---------------------------------------------------------------- FLOPs of what runs


def _head_split(H, per_head):
    return ((H + 1) // 2, H // 2) if per_head else (H, H)


def strided_flops(B, H, Nq, Nk, D, Dv, causal=False, stride=128, block_size=64,
                  per_head=False, **_):
    """Engine matmul FLOPs of :func:`sparse_strided` (both parts, slots as gathered)."""
    h1, h2 = _head_split(H, per_head)
    local = _strided_local_layout(Nq, stride, block_size, causal, "cpu")
    pos, res, bm = _residue_plan(Nq, stride, block_size, causal, "cpu")
    return (engine_flops(B, h1, Nq, block_size, local.shape[-1] * block_size, D, Dv)
            + engine_flops(B, h2, pos.numel(), bm, res.shape[-1] * bm, D, Dv))


def fixed_flops(B, H, Nq, Nk, D, Dv, causal=False, stride=128, summary=8, block_size=64,
                per_head=False, **_):
    """Engine matmul FLOPs of :func:`sparse_fixed` (both parts)."""
    h1, h2 = _head_split(H, per_head)
    local = _fixed_local_layout(Nq, stride, block_size, causal, "cpu")
    ns = int(_summary_positions(Nq, stride, summary, "cpu").numel())
    bk = max(1, min(block_size, ns))
    return (engine_flops(B, h1, Nq, block_size, local.shape[-1] * block_size, D, Dv)
            + engine_flops(B, h2, Nq, block_size, n_blocks(ns, bk) * bk, D, Dv))


register(
    "sparse_strided", exact=False, causal=True, time="O(N·(l + N/l)·D)", memory="O(N·D)",
    flops=strided_flops,
    flops_formula="2·B·H·(N·⌈l⌉_blocks + N·⌈N/l⌉)·(D+Dv): band blocks + residue-class blocks",
    options=dict(SPARSE_OPTIONS), family="sparse",
    description="Sparse Transformer strided pattern: previous l positions ∪ every l-th position",
)(sparse_strided)

register(
    "sparse_fixed", exact=False, causal=True, time="O(N·(l + c·N/l)·D)", memory="O(N·D)",
    flops=fixed_flops,
    flops_formula="2·B·H·(N·l_blocks + N·c·N/l)·(D+Dv): own-block layout + summary keys",
    options={**SPARSE_OPTIONS, "summary": 8}, family="sparse",
    description="Sparse Transformer fixed pattern: own block of l ∪ the c summary positions of every block",
)(sparse_fixed)
