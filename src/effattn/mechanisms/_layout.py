"""Layout helpers shared by the block-sparse methods (``sparse_*``, ``longformer``,
``bigbird``, ``window2d``): they turn a block-level boolean pattern into the engine's
``kv_blocks``, answer "does this block pair hold an allowed pair" for position-difference
rules exactly, look per-position tables up inside a ``pair_mask``, and count the engine's
work for the FLOP columns.

Nothing here ever builds an ``N x N`` tensor; block-level patterns are
``[.., n_q_blocks, C]`` with ``C`` candidate key blocks per query block.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import torch

from effattn.masks import apply_masks
from effattn.softmax import merge_pair_, merge_partials, softmax_lse, stat_dtype


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int ``>= minimum``; ``ValueError`` naming option ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def check_same_length(q: torch.Tensor, k: torch.Tensor, method: str) -> int:
    """Patterns are defined on one sequence: ``Nq == Nk`` (returns N) or ``ValueError``."""
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"k: {method} is a self-attention pattern over one sequence; "
            f"expected Nk == Nq = {q.shape[2]}, got Nk = {k.shape[2]}")
    return q.shape[2]


def content_digest(t: torch.Tensor) -> str:
    """A digest of ``t``'s dtype, shape and values (copied to the CPU): what caches of
    layout-derived tables (FlexAttention's block tables, the engine's tiles) are keyed by
    when the same layout is rebuilt as a new tensor on every call."""
    c = t.detach().to("cpu").contiguous()
    h = hashlib.blake2b(c.numpy().tobytes(), digest_size=16)
    h.update(repr((c.dtype, tuple(c.shape))).encode())
    return h.hexdigest()


def n_blocks(n: int, block: int) -> int:
    """Number of blocks of ``block`` rows covering ``n`` rows."""
    return -(-n // block)


def block_bounds(n: int, block: int, idx: torch.Tensor):
    """First and last *real* position ``(lo, hi)`` of blocks ``idx`` (any shape, long)."""
    lo = idx * block
    hi = torch.clamp((idx + 1) * block, max=n) - 1
    return lo, hi


def diff_range(n: int, bq: int, bk: int, qb: torch.Tensor, kb: torch.Tensor):
    """Range ``(lo, hi)`` of ``i - j`` over query block ``qb`` x key block ``kb`` (broadcast).

    Every integer in the range is reached, since both blocks are contiguous position runs.
    """
    q_lo, q_hi = block_bounds(n, bq, qb)
    k_lo, k_hi = block_bounds(n, bk, kb)
    return q_lo - k_hi, q_hi - k_lo


def has_multiple(lo: torch.Tensor, hi: torch.Tensor, m) -> torch.Tensor:
    """True where the integer range ``[lo, hi]`` holds a multiple of ``m`` (``m >= 1``)."""
    return (torch.div(hi, m, rounding_mode="floor") * m >= lo) & (lo <= hi)


def compact_layout(allowed: torch.Tensor, candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Engine layout from a block pattern.

    ``allowed`` bool ``[.., n_q_blocks, C]``: whether candidate ``c`` is seen;
    ``candidates`` long, broadcastable to it: the key-block index of each candidate
    (default ``arange(C)``: ``allowed`` is then the full ``[.., n_q_blocks, n_k_blocks]``
    block pattern).  Returns long ``[.., n_q_blocks, S]``, ``S`` = the largest count
    (at least 1), each row's allowed key blocks first and ``-1`` after.  Candidates must
    be distinct within a row (a block listed twice would be counted twice by the engine).
    """
    if candidates is None:
        candidates = torch.arange(allowed.shape[-1], device=allowed.device)
    shape = torch.broadcast_shapes(allowed.shape, candidates.shape)
    candidates = candidates.expand(shape)
    allowed = allowed.expand(shape) & (candidates >= 0)
    order = torch.argsort((~allowed).to(torch.int8), dim=-1, stable=True)
    S = max(1, int(allowed.sum(-1).max()) if allowed.numel() else 1)
    order = order[..., :S]
    kept = torch.gather(allowed, -1, order)
    idx = torch.gather(candidates, -1, order)
    return torch.where(kept, idx, torch.full_like(idx, -1))


def range_candidates(first_key: torch.Tensor, last_key: torch.Tensor, bk: int) -> torch.Tensor:
    """Key blocks overlapping the key-position range ``[first_key, last_key]`` of each query
    block (long ``[.., n_q_blocks]`` each, already clamped to real positions): long
    ``[.., n_q_blocks, C]``, ``-1`` past a row's last block (and for empty ranges)."""
    first = torch.div(first_key, bk, rounding_mode="floor")
    last = torch.div(last_key, bk, rounding_mode="floor")
    last = torch.where(last_key < first_key, first - 1, last)
    C = max(1, int((last - first).max()) + 1)
    cand = first[..., None] + torch.arange(C, device=first.device)
    return torch.where(cand <= last[..., None], cand, torch.full_like(cand, -1))


def band_layout(n: int, bq: int, bk: int, before: int, after: int, device) -> torch.Tensor:
    """Layout ``[n_q_blocks, S]`` of every key block holding a key ``j`` with
    ``i - before <= j <= i + after`` for some query ``i`` of the query block (exact: every
    listed block holds such a pair)."""
    qb = torch.arange(n_blocks(n, bq), device=device)
    q_lo, q_hi = block_bounds(n, bq, qb)
    cand = range_candidates(torch.clamp(q_lo - before, min=0),
                            torch.clamp(q_hi + after, max=n - 1), bk)
    return compact_layout(cand >= 0, cand)


def band_full_slots(layout: torch.Tensor, n: int, block: int, before: int, after: int) -> torch.Tensor:
    """Bool like ``layout [.., n_q_blocks, S]`` (square blocks of ``block``, ``-1`` empty):
    slots whose every (query ``i``, key ``j``) pair has ``i - before <= j <= i + after`` —
    the engine's ``full_slots`` hint for a band pattern (those slots skip the pair rules)."""
    qb = torch.arange(layout.shape[-2], device=layout.device)[:, None]
    lo, hi = diff_range(n, block, block, qb, layout.clamp(min=0))  # range of i - j
    return (layout >= 0) & (hi <= before) & (lo >= -after)


def causal_blocks(n: int, bq: int, bk: int, qb: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """True where key block ``kb`` starts at or before the last real query of ``qb``."""
    _, q_hi = block_bounds(n, bq, qb)
    return kb * bk <= q_hi


def per_head(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``x [H]`` viewed to broadcast on dim 1 (heads) of a position tensor ``like``; a
    one-element ``x`` becomes a 0-d tensor (broadcasts with any ``like``, 0-d included)."""
    if x.numel() == 1:
        return x.reshape(())
    return x.view(1, -1, *([1] * (like.dim() - 2)))


def lookup(table: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``table [Bt, N]`` (Bt = 1 or B) read at positions ``pos [Bp, ...]`` (Bp = 1 or B),
    broadcast over batch; out-of-range positions (engine padding, ``-1``) read entry 0."""
    n = table.shape[-1]
    p = torch.where((pos >= 0) & (pos < n), pos, torch.zeros_like(pos))
    if table.shape[0] == 1:
        return table[0][p]
    b = torch.arange(table.shape[0], device=pos.device).view(-1, *([1] * (pos.dim() - 1)))
    return table[b, p]


def engine_flops(B: int, H: int, n_q: int, block_q: int, keys_per_row: int, D: int, Dv: int) -> float:
    """Matmul FLOPs of one engine pass: ``2 * B * H * rows * keys * (D + Dv)`` with rows padded
    to the query block and ``keys_per_row`` the gathered keys (slots x block_k)."""
    rows = n_blocks(n_q, block_q) * block_q
    return 2.0 * B * H * rows * keys_per_row * (D + Dv)


def pattern_reference(q, k, v, allowed: torch.Tensor, *, causal: bool,
                      padding_mask: Optional[torch.Tensor], scale: float, shared_qk: bool,
                      extra_kv: Optional[Sequence[torch.Tensor]] = None):
    """Dense reference for a sparse pattern (tests and debugging only: builds ``N x N``).

    ``q [B,H,N,D]``, ``k [B,H,N,D]``, ``v [B,H,N,Dv]``, ``allowed`` bool broadcastable to
    ``[B,H,N,N]`` (True = pair allowed by the pattern); the shared masks (causal, padding,
    shared-QK self penalty) come on top.  ``extra_kv=(k_extra [B|1,H,g,D], v_extra)``
    appends keys every query may see.  Materialized softmax in float64 or float32;
    returns ``(out [B,H,N,Dv], lse [B,H,N])``.
    """
    cdt = stat_dtype(q.dtype)
    N = q.shape[2]
    s = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    pos = torch.arange(N, device=q.device)
    kv = None if padding_mask is None else padding_mask[:, None, None, :]
    s = apply_masks(s, pos[:, None], pos[None, :], causal=causal, exclude_self=shared_qk,
                    k_valid=kv, pair_mask=lambda a, b: allowed)
    vv = v.to(cdt)
    if extra_kv is not None:
        ke, ve = (t.to(cdt).expand(q.shape[0], -1, -1, -1) for t in extra_kv)
        s = torch.cat([s, torch.matmul(q.to(cdt), ke.transpose(-1, -2)) * scale], -1)
        vv = torch.cat([vv, ve], 2)
    probs, lse = softmax_lse(s)
    return torch.matmul(probs, vv).to(q.dtype), lse


def flat_rows(pos: torch.Tensor, B: int, H: int, n: int) -> torch.Tensor:
    """Positions ``[B|1, H|1, L]`` -> flat row indices ``[B*H*L]`` into a ``[B*H*n, ·]`` view."""
    base = (torch.arange(B * H, device=pos.device) * n).view(B, H, 1)
    return (pos.expand(B, H, pos.shape[-1]) + base).reshape(-1)


def take_rows(x: torch.Tensor, idx: torch.Tensor, ws=None, name: str = "") -> torch.Tensor:
    """``x [B, H, N, F]`` (or ``[B, H, N]``) at positions ``idx [B|1, H|1, L]`` -> ``[B, H, L,
    F]`` (``[B, H, L]``); differentiable without ``ws``; with a
    :class:`~effattn.mechanisms._scratch.Workspace` ``ws``, written into its buffer
    ``name`` (no gradient).  One ``index_select`` over a 2-D view: 2x faster than
    ``index_select`` along dim 2 for ``[1, 4, 16384, 64]`` (14x for ``[B, H, N]``), and
    several times faster than ``gather`` with an expanded index."""
    B, H, N = x.shape[:3]
    rows = flat_rows(idx, B, H, N)
    flat = x.reshape(B * H * N, *x.shape[3:])
    out = None if ws is None else ws.get(name, (rows.shape[0], *x.shape[3:]), x)
    return torch.index_select(flat, 0, rows, out=out).view(B, H, -1, *x.shape[3:])


def merge_parts(*parts):
    """Merge ``(out [B,H,N,Dv], lse [B,H,N])`` parts over disjoint key sets with
    :func:`effattn.softmax.merge_partials` (``None`` parts are skipped); rows empty in
    every part keep output 0 and ``lse = -inf``."""
    parts = [p for p in parts if p is not None]
    if len(parts) == 1:
        return parts[0]
    if not torch.is_grad_enabled() or not any(t.requires_grad for p in parts for t in p):
        # no gradient: fold the parts in place, one lerp pass each (the stacked merge costs
        # a copy of every part and three passes over the stack: sparse_strided forward at
        # N = 16,384 spent 14 % of its time there)
        out, lse = parts[0][0].to(parts[0][1].dtype), parts[0][1]
        for o, l in parts[1:]:
            out, lse = merge_pair_(out, lse, o.to(l.dtype), l)
        return out, lse
    # outputs merge in the statistics dtype (lse's): bf16 parts are not re-rounded
    return merge_partials(torch.stack([p[0].to(p[1].dtype) for p in parts]),
                          torch.stack([p[1] for p in parts]))
