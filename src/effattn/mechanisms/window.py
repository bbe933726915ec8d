"""Window attention: ``longformer`` (sliding / dilated window + global tokens, Beltagy et
al. 2020) and ``window2d`` (Swin's shifted windows on a 2-D grid, Liu et al. 2021).

Both run through the block-sparse engine: Longformer as a band layout (per head when
the dilation differs between heads) with the exact window rule as ``pair_mask``, plus
two small dense passes for the global tokens; Swin on the tokens permuted into window
order, one block per window that sees only itself, the shifted regions as ``pair_mask``.
"""

from __future__ import annotations

from typing import Optional

import torch

from effattn.api import register
from effattn.mechanisms._layout import (
    band_full_slots, block_bounds, check_int, check_same_length, compact_layout, diff_range, engine_flops,
    has_multiple, lookup, merge_parts, n_blocks, per_head, range_candidates,
)
from effattn.mechanisms._union import permuted_block_attention
from effattn.masks import distance_rule, elementwise
from effattn.mechanisms.blocksparse import block_sparse_attention

# ================================================================ Longformer


def _dilations(dilation, H: int, device) -> torch.Tensor:
    """``dilation`` (int, or list of H ints) as long ``[1]`` (one value for every head) or ``[H]``."""
    if isinstance(dilation, (list, tuple)):
        if len(dilation) != H:
            raise ValueError(f"dilation: expected an int or a list of H = {H} ints, got {len(dilation)} values")
        dil = [check_int("dilation", d, 1) for d in dilation]
        if len(set(dil)) == 1:  # the same for every head: one value (no per-head tables)
            dil = dil[:1]
        return torch.tensor(dil, device=device)
    return torch.tensor([check_int("dilation", dilation, 1)], device=device)


def longformer_layout(N: int, window: int, dil: torch.Tensor, block: int, causal: bool) -> torch.Tensor:
    """Key blocks holding a pair ``j = i ± d·m`` (``m = 0..window``; causal: ``j <= i``):
    long ``[1, H|1, n_blocks, S]`` for dilations ``dil [H|1]`` (exact per block pair)."""
    W = (window * dil)[:, None]  # [Hd, 1]
    qb = torch.arange(n_blocks(N, block), device=dil.device)
    q_lo, q_hi = block_bounds(N, block, qb)
    first = torch.clamp(q_lo - W, min=0)
    last = torch.clamp(q_hi + (0 if causal else W), max=N - 1).expand_as(first)
    cand = range_candidates(first, last, block)  # [Hd, nqb, C]
    lo, hi = diff_range(N, block, block, qb[:, None], cand.clamp(min=0))
    lo = torch.maximum(lo, torch.zeros_like(lo) if causal else -W[..., None])
    hi = torch.minimum(hi, W[..., None])
    return compact_layout(has_multiple(lo, hi, dil[:, None, None]), cand)[None]


def longformer_full_slots(layout: torch.Tensor, N: int, window: int, dil: torch.Tensor, block: int,
                          causal: bool) -> torch.Tensor:
    """Bool like ``layout [1, H|1, nqb, S]``: slots whose every (query, key) pair is in the
    window (``|i - j| <= window`` and, causal, ``j <= i``) — only with dilation 1, where
    every difference is a multiple."""
    W = int(window * dil.max())
    return band_full_slots(layout, N, block, W, 0 if causal else W) & bool((dil == 1).all())


def _global_index(global_tokens, B: int, N: int, device):
    """``global_tokens`` -> ``(gidx [Bg, G] long, gvalid [Bg, G] bool, is_global [Bg, N])``,
    or ``None`` when there is none.  Accepts a list of indices, a 1-D integer tensor, or a
    bool tensor ``[B, N]`` / ``[N]``."""
    if global_tokens is None:
        return None
    if isinstance(global_tokens, torch.Tensor) and global_tokens.dtype == torch.bool:
        m = global_tokens
        if m.dim() == 1:
            m = m[None]
        if m.dim() != 2 or m.shape[1] != N or m.shape[0] not in (1, B):
            raise ValueError(f"global_tokens: expected a bool tensor [B={B}, N={N}] or [N], "
                             f"got shape {tuple(global_tokens.shape)}")
        m = m.to(device)
    else:
        if isinstance(global_tokens, torch.Tensor):
            if global_tokens.dim() != 1 or global_tokens.is_floating_point():
                raise ValueError("global_tokens: expected a list of indices, a 1-D integer tensor "
                                 f"or a bool tensor [B, N]; got {global_tokens.dtype} {tuple(global_tokens.shape)}")
            global_tokens = global_tokens.tolist()
        if not isinstance(global_tokens, (list, tuple)):
            raise ValueError(f"global_tokens: expected a list of indices or a bool tensor [B, N], "
                             f"got {type(global_tokens).__name__}")
        for t in global_tokens:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < N:
                raise ValueError(f"global_tokens: indices must be ints in [0, {N}), got {t!r}")
        m = torch.zeros(1, N, dtype=torch.bool, device=device)
        m[0, list(global_tokens)] = True
    count = m.sum(1)
    G = int(count.max()) if m.numel() else 0
    if G == 0:
        return None
    gidx = torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :G]
    gvalid = torch.arange(G, device=device)[None] < count[:, None]
    return gidx, gvalid, m


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx [Bi, G]`` of ``x [B, H, N, F]`` -> ``[B, H, G, F]``."""
    B, H, _, F = x.shape
    return x.gather(2, idx[:, None, :, None].expand(B, H, idx.shape[1], F))


def _scatter_rows(x: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, rows: torch.Tensor):
    """``x [B, H, N, *F]`` with rows ``idx [Bi, G]`` (where ``valid``) replaced by
    ``rows [B, H, G, *F]``; differentiable in both."""
    B, H, N = x.shape[:3]
    feat = x.shape[3:]
    target = torch.where(valid, idx, torch.full_like(idx, N))  # invalid slots -> a spare row
    target = target.view(target.shape[0], 1, -1, *([1] * len(feat))).expand(B, H, -1, *feat)
    ext = torch.cat([x, x.new_zeros(B, H, 1, *feat)], 2)
    return ext.scatter(2, target, rows.to(x.dtype))[:, :, :N]


def _band_rule(width: int, dil: int):
    """Elementwise pair rule ``|i - j| <= width`` and ``dil | i - j`` on plain ints (inside
    FlexAttention's compiled ``mask_mod`` they are constants, no table reads)."""
    return distance_rule(width, dil)


def longformer(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk,
               window=128, dilation=1, global_tokens=None, block_size=64):
    """Longformer attention: each token sees ``i ± dilation·m`` for ``m = 0..window``
    (causal: only ``i - dilation·m``), global tokens see everything and are seen by all.

    ``q [B,H,N,D]``, ``k [B,H,N,D]``, ``v [B,H,N,Dv]`` -> ``(out [B,H,N,Dv], lse [B,H,N])``.
    ``dilation``: int or a list of H ints (per head).  ``global_tokens``: list of indices,
    or bool ``[B, N]`` (per sequence).  Global keys are attended in a separate pass over the
    gathered global tokens (merged on log-sum-exp), global query rows in a dense pass over
    all keys; no ``N x N`` tensor is built.
    """
    check_int("window", window, 0)
    check_int("block_size", block_size, 1)
    B, H, N, _ = q.shape
    check_same_length(q, k, "longformer")
    dil = _dilations(dilation, H, q.device)
    glob = _global_index(global_tokens, B, N, q.device)
    dtype = q.dtype  # the engine keeps bf16 matmuls in bf16, its statistics in float32
    kv = None if padding_mask is None else padding_mask[:, None]
    W = window * dil

    if dil.numel() == 1 and glob is None:  # no head or batch dependence: a closed form
        in_window = _band_rule(int(W), int(dil))
    else:
        def in_window(a, b):
            d = a - b
            ok = (d.abs() <= per_head(W, a)) & (d % per_head(dil, a) == 0)
            return ok if glob is None else ok & ~lookup(glob[2], b)

    layout = longformer_layout(N, window, dil, block_size, causal)
    full = None if glob is not None else longformer_full_slots(layout, N, window, dil, block_size, causal)
    # the layout lists every block pair holding an in-window pair
    out, lse = block_sparse_attention(
        q, k, v, layout, block_q=block_size, block_k=block_size, scale=scale, causal=causal,
        exclude_self=shared_qk, k_valid=kv, pair_mask=in_window,
        need_lse=return_lse or glob is not None, full_slots=full, exact_layout=True)
    if glob is not None:
        gidx, gvalid, _ = glob
        G = gidx.shape[1]
        gkv = gvalid if padding_mask is None else gvalid & padding_mask.gather(1, gidx.expand(B, G))
        # every query over the global keys
        o2, l2 = block_sparse_attention(
            q, _gather_rows(k, gidx), _gather_rows(v, gidx), None, block_q=block_size,
            block_k=min(block_size, G), scale=scale, causal=causal, exclude_self=shared_qk,
            k_pos=gidx[:, None], k_valid=gkv[:, None])
        out, lse = merge_parts((out, lse), (o2, l2))
        # global queries over every key
        og, lg = block_sparse_attention(
            _gather_rows(q, gidx), k, v, None, block_q=min(block_size, G), block_k=block_size,
            scale=scale, causal=causal, exclude_self=shared_qk, q_pos=gidx[:, None], k_valid=kv)
        out = _scatter_rows(out, gidx, gvalid, og)
        lse = _scatter_rows(lse, gidx, gvalid, lg)
    return out.to(dtype), lse


def longformer_flops(B, H, Nq, Nk, D, Dv, causal=False, window=128, dilation=1,
                     global_tokens=None, block_size=64, **_):
    """Engine matmul FLOPs of :func:`longformer`: band slots + the two global passes."""
    dil = _dilations(dilation, H, "cpu")
    layout = longformer_layout(Nq, window, dil, block_size, causal)
    f = engine_flops(B, H, Nq, block_size, layout.shape[-1] * block_size, D, Dv)
    glob = None if global_tokens is None else _global_index(
        global_tokens.cpu() if isinstance(global_tokens, torch.Tensor) else global_tokens, B, Nq, "cpu")
    if glob is not None:
        G = glob[0].shape[1]
        bg = min(block_size, G)
        f += engine_flops(B, H, Nq, block_size, n_blocks(G, bg) * bg, D, Dv)
        f += engine_flops(B, H, G, bg, n_blocks(Nk, block_size) * block_size, D, Dv)
    return f


register(
    "longformer", exact=False, causal=True, time="O(N·(w + g)·D)", memory="O(N·D)",
    flops=longformer_flops,
    flops_formula="2·B·H·(N·S·b + 2·N·g)·(D+Dv): S band blocks of b per query block, g global tokens",
    options={"window": 128, "dilation": 1, "global_tokens": None, "block_size": 64},
    family="window",
    description="Longformer: sliding (dilated, per-head) window of ±w tokens plus symmetric global tokens",
)(longformer)


# ================================================================ Swin window2d


def _pair(name: str, value, minimum: int):
    vals = value if isinstance(value, (list, tuple)) else (value, value)
    if len(vals) != 2:
        raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")
    return tuple(check_int(name, x, minimum) for x in vals)


def _axis_region(coord: torch.Tensor, size: int, win: int, shift: int) -> torch.Tensor:
    """Swin's region id along one axis of the shifted, padded grid (0 when not shifted)."""
    if shift == 0:
        return torch.zeros_like(coord)
    return (coord >= size - win).long() + (coord >= size - shift).long()


def window2d_slots(grid, window, shift, device):
    """Window order of a ``grid = (h, w)`` of tokens.

    Returns ``(pos [L], region [N + L], n_windows)``: slot ``s`` (windows of
    ``wh·ww`` consecutive slots, in Swin's ``window_partition`` order of the cyclically
    shifted, padded grid) holds original position ``pos[s]`` (``>= N``: padding), and
    ``region`` gives Swin's shift-region id of every position.
    """
    (h, w), (wh, ww), (sh, sw) = grid, window, shift
    Hp, Wp = n_blocks(h, wh) * wh, n_blocks(w, ww) * ww
    nwy, nwx = Hp // wh, Wp // ww
    wy, wx, iy, ix = torch.meshgrid(*(torch.arange(n, device=device) for n in (nwy, nwx, wh, ww)),
                                    indexing="ij")
    ys, xs = (wy * wh + iy).reshape(-1), (wx * ww + ix).reshape(-1)  # shifted coordinates
    y, x = (ys + sh) % Hp, (xs + sw) % Wp  # torch.roll(x, (-sh, -sw)) puts (y, x) at (ys, xs)
    N = h * w
    real = (y < h) & (x < w)
    slot = torch.arange(ys.numel(), device=device)
    pos = torch.where(real, y * w + x, N + slot)
    reg_slot = _axis_region(ys, Hp, wh, sh) * 3 + _axis_region(xs, Wp, ww, sw)
    region = torch.empty(N + slot.numel(), dtype=torch.long, device=device)
    region[pos] = reg_slot
    return pos, region, nwy * nwx


def _check_window2d(N, grid, window, shift):
    if grid is None:
        raise ValueError("grid: window2d needs grid=(h, w) with h*w = N")
    grid = _pair("grid", grid, 1)
    window = _pair("window", window, 1)
    shift = _pair("shift", shift, 0)
    if grid[0] * grid[1] != N:
        raise ValueError(f"grid: expected h*w = N = {N}, got grid={grid} (product {grid[0] * grid[1]})")
    for s, wsz in zip(shift, window):
        if s >= wsz:
            raise ValueError(f"shift: expected 0 <= shift < window {window}, got {shift}")
    return grid, window, shift


def window2d(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk,
             grid=None, window=7, shift=0):
    """Swin (shifted) window attention over a ``grid = (h, w)`` of tokens in row-major order.

    ``q [B,H,h*w,D]``, ``k [B,H,h*w,D]``, ``v [B,H,h*w,Dv]`` -> ``(out, lse)``.  ``window``
    = (wh, ww) (int: square), ``shift`` = cyclic shift (int or pair, ``< window``); tokens
    of different shift regions never attend to each other, grid padding is masked.
    """
    N = check_same_length(q, k, "window2d")
    grid, window, shift = _check_window2d(N, grid, window, shift)
    pos, region, nwin = window2d_slots(grid, window, shift, q.device)
    layout = torch.arange(nwin, device=q.device).view(1, 1, nwin, 1)
    same_region = None
    if shift != (0, 0):
        table = region[None]

        @elementwise
        def same_region(a, b):
            return lookup(table, a) == lookup(table, b)

    return permuted_block_attention(
        q, k, v, pos, layout, window[0] * window[1], scale=scale, causal=False,
        exclude_self=shared_qk, padding_mask=padding_mask, pair_mask=same_region,
        need_lse=return_lse)


def window2d_flops(B, H, Nq, Nk, D, Dv, causal=False, grid=None, window=7, shift=0, **_):
    """Engine matmul FLOPs of :func:`window2d`: every window block against itself."""
    grid, window, _ = _check_window2d(Nq, grid, window, shift)
    nwin = n_blocks(grid[0], window[0]) * n_blocks(grid[1], window[1])
    T = window[0] * window[1]
    return engine_flops(B, H, nwin * T, T, T, D, Dv)


register(
    "window2d", exact=False, causal=False, time="O(N·wh·ww·D)", memory="O(N·D)",
    flops=window2d_flops, flops_formula="2·B·H·n_windows·(wh·ww)²·(D+Dv)",
    options={"grid": None, "window": 7, "shift": 0}, family="vision",
    causal_error="Swin window attention is bidirectional over an image grid; there is no token order to be causal in.",
    description="Swin: attention inside (cyclically shifted) non-overlapping 2-D windows",
)(window2d)
