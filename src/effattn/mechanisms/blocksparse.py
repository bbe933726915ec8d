"""The block-sparse attention engine: the one kernel behind every tiled method.

Queries are cut into blocks of ``block_q`` rows and keys/values into blocks of
``block_k`` rows.  A *layout* says, for every query block, which key blocks it sees:

- ``kv_blocks=None`` (dense): every key block — FlashAttention's tiling (``blockwise``);
- ``kv_blocks`` long ``[B|1, H|1, n_q_blocks, S]``: the key-block indices each query
  block gathers (``-1`` = empty slot).  Sparse Transformer, Longformer, BigBird and
  LSH (after its sort) are layouts.

Inside the tiles, pairs are masked by *original* positions (``q_pos``, ``k_pos``):
causal, key validity (padding), shared-QK self-exclusion and an optional
``pair_mask(q_pos, k_pos)`` rule (:mod:`effattn.masks`).  The softmax is an online
(FlashAttention) softmax in float32 or wider (:mod:`effattn.softmax`).

Where compiled FlexAttention serves a call better (CPU inference, CUDA), the call goes
to it with the same layout and pair rules (:mod:`effattn.mechanisms._flex`: block masks
cached per layout, switchable with ``EFFATTN_FLEX`` / ``_flex.flex_mode``); elsewhere
(CPU training, a requested log-sum-exp on CPU) the engine's own path runs: for float32 on
the CPU the fused native kernels (:func:`effattn.native.block_sparse` and its backward:
square blocks, rules from positions and :func:`effattn.masks.distance_rule`), else — or
where they decline — the torch tiles below.

The forward returns ``(out, lse)``; the backward recomputes score tiles from
``q, k, v, out, lse`` (FlashAttention-2 style) and also takes a gradient on ``lse``
(LSH merges rounds through it).  Neither direction ever holds an ``N x N`` tensor:
peak extra memory is one group of tiles, sized by ``tile_budget`` elements.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from effattn import native
from effattn.masks import SELF_PENALTY, PairMask, apply_masks, rule_key, shared_tile_bias
from effattn.mechanisms import _flex
from effattn.mechanisms._layout import content_digest
from effattn.mechanisms._scratch import Workspace, kept_workspace
from effattn.result_pool import pooled_empty, pooled_zeros
from effattn.softmax import (
    LOG2_E, online_finish, online_init, online_update, output_delta, safe_lse, softmax_weights_,
    stat_dtype)

#: default number of score elements (all batch/head rows included) per processed group
DEFAULT_TILE_BUDGET = 1 << 21

#: engine calls per backend since import, ``{"flexattention": n, "engine": m}`` (the bench
#: reads the difference around a case to report which backend ran)
BACKEND_CALLS = collections.Counter()

#: tile lists kept between calls, per plan structure (:func:`_tile_key`): a window's
#: 19 groups took 2.2 ms to cut and 1.9 ms to mask per pass at N = 16,384 (of a 70 ms
#: forward), every call alike.  At most this many lists ...
TILE_CACHE_SIZE = 16
#: ... holding at most this many bytes together (:func:`_tile_bytes`; a plan whose tiles
#: would hold more is cut afresh on every call, group by group)
TILE_CACHE_BYTES = 1 << 26
_tile_cache: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
#: biases a kept sparse tile holds, in units of its ``[block_q, width]`` (the no-lse and
#: the base-2 path's penalty each need one); more rules on the same tiles are evaluated
#: per call
BIASES_PER_TILE = 2
_tile_lock = threading.Lock()
#: float32 CPU calls run the fused native kernels (:func:`effattn.native.block_sparse`,
#: :func:`effattn.native.block_sparse_backward`) where they serve; False: the torch tiles
USE_NATIVE = True


@dataclasses.dataclass
class _Plan:
    """Everything about one engine call except the differentiable tensors."""

    B: int
    H: int
    Nq: int
    Nk: int
    block_q: int
    block_k: int
    scale: float
    causal: bool
    exclude_self: bool
    kv_blocks: Optional[torch.Tensor]  # [Bl, Hl, nQB, S] or None (dense)
    q_pos: torch.Tensor  # [Bp, Hp, NQ_pad]
    k_pos: torch.Tensor  # [Bp, Hp, NK_pad]
    k_valid: Optional[torch.Tensor]  # [Bv, Hv, NK_pad] bool or None
    pair_mask: Optional[PairMask]
    default_pos: bool  # positions are arange (lets causal dense skip whole tiles)
    group_blocks: int  # query blocks per group
    slot_chunk: int  # key blocks (dense) or slots (sparse) per inner step
    full_slots: Optional[torch.Tensor] = None  # bool, like kv_blocks: every pair allowed
    exact_layout: bool = False  # every pair the rules allow lies in a listed block
    padding: bool = False  # k_valid came from the caller (not only the block padding)

    def unmasked_slots(self) -> Optional[torch.Tensor]:
        """The ``full_slots`` hint with slots touching an invalid (padding) key removed:
        bool, broadcastable to ``kv_blocks``, True where no pair rule needs applying
        (``None``: no hint)."""
        full = self.full_slots
        if full is None or self.k_valid is None:
            return full
        kv = self.k_valid
        ok = kv.reshape(*kv.shape[:-1], self.nkb, self.block_k).all(-1)  # [Bv, Hv, nkb]
        lay = self.kv_blocks
        shape = torch.broadcast_shapes(ok.shape[:2] + (1, 1), lay.shape, full.shape)
        ok = ok[..., None, :].expand(*shape[:2], shape[2], self.nkb)
        return full.expand(shape) & torch.gather(ok, -1, lay.clamp(min=0).expand(shape))

    @property
    def nqb(self) -> int:
        return self.q_pos.shape[-1] // self.block_q

    @property
    def nkb(self) -> int:
        return self.k_pos.shape[-1] // self.block_k


def _pad_rows(x: torch.Tensor, n: int, value=0) -> torch.Tensor:
    """Pad dim -2 (rows) of ``x`` (or the last dim for 3-D position tensors) to ``n``."""
    extra = n - x.shape[-2]
    if extra == 0:
        return x
    return F.pad(x, (0, 0, 0, extra), value=value)


def _rows_contiguous(x: torch.Tensor) -> bool:
    """Whether ``x [B, H, N, F]``'s rows are contiguous and follow each other (stride ``F``,
    then 1): its row ranges then view as ``[B, H, G, block, F]`` tiles."""
    return x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]


def _pad_last(x: torch.Tensor, n: int, value) -> torch.Tensor:
    extra = n - x.shape[-1]
    return x if extra == 0 else F.pad(x, (0, extra), value=value)


def _batch_offsets(idx_shape, src_bh, nkb, device):
    """Flat-row offsets ``[Bo, Ho, 1, 1]`` into a ``[Bs*Hs*nkb, ...]`` view of a source with
    batch/head extents ``src_bh``; broadcast dims of extent 1 in the source map to 0."""
    Bo, Ho = idx_shape
    Bs, Hs = src_bh
    b = torch.arange(Bo, device=device) if Bs > 1 else torch.zeros(Bo, dtype=torch.long, device=device)
    h = torch.arange(Ho, device=device) if Hs > 1 else torch.zeros(Ho, dtype=torch.long, device=device)
    return ((b[:, None] * Hs + h[None, :]) * nkb)[:, :, None, None]


def _gather_blocks(x: torch.Tensor, block: int, idx: torch.Tensor, ws: Optional[Workspace] = None,
                   name: str = "") -> torch.Tensor:
    """Gather key blocks: ``x [Bs, Hs, n*block, *F]``, ``idx [Bi, Hi, G, S]`` (>= 0) ->
    ``[Bo, Ho, G, S*block, *F]`` with ``Bo = max(Bs, Bi)``, ``Ho = max(Hs, Hi)`` (in the
    workspace buffer ``name`` when ``ws`` is given)."""
    Bs, Hs, n = x.shape[0], x.shape[1], x.shape[2] // block
    feat = x.shape[3:]
    Bo, Ho = max(Bs, idx.shape[0]), max(Hs, idx.shape[1])
    G, S = idx.shape[2], idx.shape[3]
    flat_idx = (_batch_offsets((Bo, Ho), (Bs, Hs), n, x.device) + idx).expand(Bo, Ho, G, S)
    # index_select on a 2-D view: several times faster than advanced indexing, and ~20x
    # faster than index_select on the same rows viewed as [n, block, F] (its slow path)
    flat_idx = flat_idx.reshape(-1)
    width = block * math.prod(feat)
    out = None if ws is None else ws.get(name, (flat_idx.shape[0], width), x)
    rows = torch.index_select(x.reshape(Bs * Hs * n, width), 0, flat_idx, out=out)
    return rows.view(Bo, Ho, G, S * block, *feat)


def _scatter_blocks(dst: torch.Tensor, block: int, idx: torch.Tensor, src: torch.Tensor) -> None:
    """Inverse of :func:`_gather_blocks` with summation: ``dst [B, H, n*block, F]`` +=
    ``src [B, H, G, S*block, F]`` at key blocks ``idx [Bi, Hi, G, S]`` (-1 slots ignored)."""
    B, H, n = dst.shape[0], dst.shape[1], dst.shape[2] // block
    F_ = dst.shape[3]
    G, S = idx.shape[2], idx.shape[3]
    flat_idx = (_batch_offsets((B, H), (B, H), n, dst.device) + idx.clamp(min=0)).expand(B, H, G, S)
    src = src.to(dst.dtype).reshape(B, H, G, S, block * F_)
    valid = (idx >= 0).expand(B, H, G, S)
    if not bool(valid.all()):
        src = src * valid[..., None].to(src.dtype)
    dst.view(B * H * n, block * F_).index_add_(0, flat_idx.reshape(-1), src.reshape(-1, block * F_))


class _Tile:
    """One (query group, key chunk) tile: index helpers shared by forward and backward."""

    __slots__ = ("rows", "q_pos", "k_pos", "k_valid", "keys", "sparse_idx", "shape_q", "mask_cols",
                 "band", "biases")

    def __init__(self, rows, q_pos, k_pos, k_valid, keys, sparse_idx, shape_q, mask_cols=None,
                 band=None):
        self.rows = rows  # slice of padded query rows
        self.q_pos = q_pos  # [.., R, 1] (dense) or [.., G, bq, 1] (sparse)
        self.k_pos = k_pos  # [.., 1, L] or [.., G, 1, L]
        self.k_valid = k_valid
        self.keys = keys  # slice of padded key rows (dense) or None
        self.sparse_idx = sparse_idx  # [Bi, Hi, G, S'] or None
        self.shape_q = shape_q  # view of the query rows for matmul
        self.mask_cols = mask_cols  # column ranges [(a, b)] needing the pair rules; None = all
        self.band = band  # sparse: first key block when slot s of group g is block band + g + s
        self.biases = None  # kept tiles (:func:`_tiles`): {rules: shared bias or None}


#: a sparse tile whose slots needing the pair rules form more runs than this is masked whole
MAX_MASK_RUNS = 4


def _mask_runs(free: torch.Tensor, idx: torch.Tensor, bk: int):
    """Column ranges ``[(a, b)]`` of a sparse tile whose slots need the pair rules: slots not
    marked rule-free (``free``, bool like ``idx [.., G, S']``) in some row, or empty
    (``idx < 0``); ``None`` when they form more than :data:`MAX_MASK_RUNS` runs."""
    need = (~free | (idx < 0)).reshape(-1, idx.shape[-1]).any(0).tolist()
    runs, start = [], None
    for j, n in enumerate(need + [False]):
        if n and start is None:
            start = j
        elif not n and start is not None:
            runs.append((start * bk, j * bk))
            start = None
    return runs if len(runs) <= MAX_MASK_RUNS else None


def _arange_start(pos: torch.Tensor, n: int) -> Optional[int]:
    """``a`` when the padded positions ``pos [1, 1, n_pad]`` are ``a, a + 1, .., a + n -
    1`` then ``-1`` (a contiguous run of rows, e.g. BigBird's row pieces), else None."""
    if pos.shape[:2] != (1, 1) or n == 0:
        return None
    row = pos[0, 0]
    a = int(row[0])
    want = torch.arange(a, a + n, device=pos.device)
    if not (torch.equal(row[:n], want) and bool((row[n:] == -1).all())):
        return None
    return a


def _tile_key(p: _Plan) -> Optional[tuple]:
    """What the tiles of plan ``p`` are determined by — layout and full-slot content,
    positions (each a contiguous run), sizes, rule flags — or None when they are not
    kept: other positions (LSH's sorted positions change on every call) or padding given
    by the caller (it changes with every batch)."""
    if p.padding:
        return None
    starts = (0, 0)
    if not p.default_pos:
        starts = (_arange_start(p.q_pos, p.Nq), _arange_start(p.k_pos, p.Nk))
        if None in starts:
            return None
    return (str(p.q_pos.device), p.Nq, p.Nk, starts, p.default_pos, p.block_q, p.block_k,
            p.group_blocks, p.slot_chunk, p.causal, p.exclude_self,
            None if p.kv_blocks is None else content_digest(p.kv_blocks),
            None if p.full_slots is None else content_digest(p.full_slots))


def _tile_bytes(p: _Plan) -> int:
    """Estimate of what the tiles of ``p`` hold: the plan's positions (viewed), gathered
    key positions and validity (9 bytes per listed key row) and up to
    :data:`BIASES_PER_TILE` shared biases per group (float32 ``[block_q, listed key
    rows]`` each); a dense plan's tiles are views and keep no biases."""
    positions = (p.q_pos.numel() + p.k_pos.numel()) * 8  # the plan's, which tiles view
    if p.kv_blocks is None:
        return positions
    keys = p.block_k * p.kv_blocks.shape[-1]
    groups = -(-p.nqb // p.group_blocks)
    return positions + p.nqb * keys * 9 + BIASES_PER_TILE * groups * p.block_q * keys * 4


def _tiles(p: _Plan):
    """The tiles of plan ``p`` grouped by query group: an iterable of ``(rows, [tiles])``,
    kept per :func:`_tile_key` (the latest :data:`TILE_CACHE_SIZE` within
    :data:`TILE_CACHE_BYTES`), each with a cache of its shared mask biases
    (:func:`_tile_scores`)."""
    key = _tile_key(p)
    size = _tile_bytes(p)
    if key is None or size > TILE_CACHE_BYTES:
        return _cut_tiles(p)
    with _tile_lock:
        got = _tile_cache.get(key)
        if got is not None:
            _tile_cache.move_to_end(key)
            return got[0]
    with torch.inference_mode(False):  # kept tensors must serve calls outside it too
        tiles = list(_cut_tiles(p))
    for _, group in tiles:
        for t in group:  # a dense tile's bias is its whole [R, L] score tile: never kept
            t.biases = {} if t.keys is None else None
    with _tile_lock:
        _tile_cache[key] = (tiles, size)
        while (len(_tile_cache) > TILE_CACHE_SIZE
               or sum(v[1] for v in _tile_cache.values()) > TILE_CACHE_BYTES):
            _tile_cache.popitem(last=False)
    return tiles


def clear_tile_cache() -> None:
    """Forget every kept tile list (:func:`_tiles`)."""
    with _tile_lock:
        _tile_cache.clear()


def _cut_tiles(p: _Plan):
    """Yield the tiles of plan ``p`` grouped by query group: ``(rows, [tiles])``.  Sparse
    tiles carry the column ranges that need the pair rules (slots the caller marked
    ``full_slots`` skip them; not with shared-QK self-exclusion, which is everywhere)."""
    bq, bk = p.block_q, p.block_k
    nqb = p.nqb
    free = None
    if p.kv_blocks is not None and not p.exclude_self:
        free = p.unmasked_slots()
        if free is not None:
            free = free.expand(torch.broadcast_shapes(free.shape, p.kv_blocks.shape))
    for g0 in range(0, nqb, p.group_blocks):
        g1 = min(nqb, g0 + p.group_blocks)
        rows = slice(g0 * bq, g1 * bq)
        tiles = []
        if p.kv_blocks is None:
            qp = p.q_pos[..., rows, None]
            last_q = g1 * bq - 1
            for c0 in range(0, p.nkb, p.slot_chunk):
                if p.causal and p.default_pos and c0 * bk > last_q:
                    break
                c1 = min(p.nkb, c0 + p.slot_chunk)
                keys = slice(c0 * bk, c1 * bk)
                kv = None if p.k_valid is None else p.k_valid[..., None, keys]
                tiles.append(_Tile(rows, qp, p.k_pos[..., None, keys], kv, keys, None, None))
        else:
            G = g1 - g0
            qp = p.q_pos[..., rows].reshape(p.q_pos.shape[0], p.q_pos.shape[1], G, bq, 1)
            idx_all = p.kv_blocks[:, :, g0:g1]
            S = idx_all.shape[-1]
            for s0 in range(0, S, p.slot_chunk):
                idx = idx_all[..., s0:s0 + p.slot_chunk]
                band = _band_start(idx, p.nkb)
                reordered = band is not None and band[1] is not idx
                if reordered:  # the same blocks per row, in band order: the rule-free
                    idx = band[1]  # slot marks no longer line up, every slot is masked
                safe = idx.clamp(min=0)
                kp = _gather_blocks(p.k_pos[..., None], bk, safe)[..., 0]  # [Bo,Ho,G,L]
                kv = (idx >= 0).repeat_interleave(bk, dim=-1)  # [Bi,Hi,G,L]
                if p.k_valid is not None:
                    kv = kv & _gather_blocks(p.k_valid[..., None], bk, safe)[..., 0]
                if bool(kv.all()):  # no empty slot, no padding key: nothing to mask for them
                    kv = None
                elif band is not None and kv.shape[:2] == kp.shape[:2]:  # a window clipped at a sequence end: its empty slots
                    # (masked by kv) take the positions the band would give them, so that
                    # the tile stays one shifted pattern and keeps a shared rule bias
                    kp = torch.where(kv, kp, _band_positions(band[0], G, idx.shape[-1], bk, kp.device))
                runs = None if free is None or reordered else _mask_runs(
                    free[:, :, g0:g1, s0:s0 + p.slot_chunk], idx, bk)
                tiles.append(_Tile(rows, qp, kp[..., None, :],
                                   None if kv is None else kv[..., None, :], None, idx, G, runs,
                                   None if band is None else band[0]))
        yield rows, tiles


def _band_start(idx: torch.Tensor, nkb: int):
    """``(b, slots)`` when the sparse tile slots ``idx [1, 1, G, S]`` hold the band ``b + g
    + s`` (every batch and head alike), blocks outside ``0 .. nkb - 1`` empty (a sliding
    window at the sequence ends, where ``b`` may be negative) — in any slot order within a
    row (layouts list an end row's blocks first) — else None.  ``slots`` is the tile's
    layout in band order (``idx`` itself when it already is: the common case away from
    the ends; else a new ``[1, 1, G, S]``, ``-1`` where the window has no block).  Such a
    tile's keys are an overlapping view of the key rows (:func:`_band_keys`), not a
    gathered copy of every slot."""
    if idx.shape[0] != 1 or idx.shape[1] != 1 or idx.numel() == 0:
        return None
    G, S = idx.shape[-2:]
    tile = idx[0, 0]
    b = int(tile[0, 0])
    steps = torch.arange(G, device=idx.device)[:, None] + torch.arange(S, device=idx.device)
    if b >= 0 and bool(torch.equal(tile, steps + b)):
        return b, idx
    if not bool((tile >= 0).any()):
        return None
    first_max = int(tile[0].max())  # the first row's last block, unless clipped at the end
    last_min = int(tile[-1].masked_fill(tile[-1] < 0, nkb).min())  # the last row's first
    have = torch.sort(tile, -1).values
    for b in {first_max - (S - 1), last_min - (G - 1)}:
        want = steps + b
        want = torch.where((want >= 0) & (want < nkb), want, torch.full_like(want, -1))
        if bool(torch.equal(have, torch.sort(want, -1).values)):
            return b, (idx if bool(torch.equal(tile, want)) else want[None, None])
    return None


def _band_positions(start: int, G: int, S: int, block: int, device) -> torch.Tensor:
    """Key positions ``[G, S * block]`` of a band tile starting at key block ``start`` whose
    key positions are the default ``arange``: group ``g``, slot ``s``, column ``c`` ->
    ``(start + g + s) * block + c`` (outside ``0 .. nkb * block - 1`` where the window runs
    past the sequence ends)."""
    rows = torch.arange(start * block, (start + G + S - 1) * block, device=device)
    return rows.as_strided((G, S * block), (block, 1))


def _band_window(block: int, start: int, G: int, S: int, nkb: int):
    """The key blocks ``lo .. hi - 1`` of a band tile's window ``start .. start + G + S - 2``
    that exist (``0 <= block < nkb``), as ``(lo, hi)``; the window is whole when ``lo ==
    start`` and ``hi == start + G + S - 1``."""
    return max(start, 0), min(start + G + S - 1, nkb)


def _band_view(x: torch.Tensor, block: int, start: int, G: int, S: int) -> torch.Tensor:
    """Overlapping view of key rows, no copy: ``x [B, H, n, F]`` (contiguous rows) -> ``[B,
    H, G, S * block, F]`` whose group ``g`` is blocks ``start + g .. start + g + S - 1``."""
    B, H, _, Fx = x.shape
    return x.as_strided((B, H, G, S * block, Fx),
                        (x.stride(0), x.stride(1), block * x.stride(2), x.stride(2), x.stride(3)),
                        x.storage_offset() + start * block * x.stride(2))


def _band_keys(x: torch.Tensor, block: int, start: int, G: int, S: int, nkb: int,
               ws: Optional[Workspace], name: str) -> torch.Tensor:
    """A band tile's keys (or values) ``[B, H, G, S * block, F]`` from ``x [B, H, nkb *
    block, F]``: a view of ``x`` when the window lies inside it, else a view of the window
    copied once into the workspace buffer ``name`` with zero blocks where it runs past the
    sequence ends (those slots are masked)."""
    lo, hi = _band_window(block, start, G, S, nkb)
    if lo == start and hi == start + G + S - 1:
        return _band_view(x, block, start, G, S)
    B, H, _, Fx = x.shape
    shape = (B, H, (G + S - 1) * block, Fx)
    buf = torch.zeros(shape, dtype=x.dtype, device=x.device) if ws is None else ws.get(name, shape, x)
    a, b = (lo - start) * block, (hi - start) * block
    buf[:, :, :a].zero_()
    buf[:, :, b:].zero_()
    buf[:, :, a:b].copy_(x[:, :, lo * block:hi * block])
    return _band_view(buf, block, 0, G, S)


@functools.lru_cache(maxsize=16)
def _band_rows(B: int, H: int, G: int, S: int, nkb: int, device: str) -> torch.Tensor:
    """Block rows ``(b·H + h)·nkb + g + s`` of a ``[B, H, nkb, ..]`` tensor that slot ``s``
    of group ``g`` of a band tile starting at block 0 covers: long ``[B·H·G·S]`` (a
    window starting at block ``start`` adds ``start``)."""
    bh = torch.arange(B * H, device=device).view(-1, 1, 1) * nkb
    g = torch.arange(G, device=device).view(1, -1, 1)
    s = torch.arange(S, device=device).view(1, 1, -1)
    return (bh + g + s).reshape(-1)


def _band_add_(dst: torch.Tensor, block: int, start: int, src: torch.Tensor, nkb: int,
               ws: Optional[Workspace] = None, name: str = "") -> None:
    """Adjoint of :func:`_band_keys`: ``dst [B, H, nkb * block, F]`` += ``src [B, H, G, S *
    block, F]`` summed over the overlaps (one strided add per slot: a slot's blocks never
    overlap); the part of a window past the sequence ends is dropped."""
    B, H, G, L, Fx = src.shape
    S = L // block
    lo, hi = _band_window(block, start, G, S, nkb)
    whole = lo == start and hi == start + G + S - 1
    if (whole and dst.is_contiguous() and src.is_contiguous() and dst.shape[:2] == (B, H)
            and src.dtype == dst.dtype):
        # one index_add_ of every slot's block rows: 0.73x the time of a strided add per slot
        # (14 groups x 9 slots x 64 x 64, 4 heads: 199 vs 272 us)
        rows = _band_rows(B, H, G, S, nkb, str(dst.device)) + start
        dst.view(B * H * nkb, block * Fx).index_add_(0, rows, src.view(B * H * G * S, block * Fx))
        return
    tgt, off = dst, start
    if not whole:
        shape = (B, H, (G + S - 1) * block, Fx)
        tgt = (torch.empty(shape, dtype=dst.dtype, device=dst.device) if ws is None
               else ws.get(name, shape, dst)).zero_()
        off = 0
    for s in range(S):
        rows = slice((off + s) * block, (off + s + G) * block)
        tgt[:, :, rows].view(B, H, G, block, Fx).add_(src[:, :, :, s * block:(s + 1) * block])
    if not whole:
        dst[:, :, lo * block:hi * block] += tgt[:, :, (lo - start) * block:(hi - start) * block]


def tile_matmul(a: torch.Tensor, b: torch.Tensor, ws: Optional[Workspace] = None,
                name: str = "", out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b`` for tile tensors ``[.., r, x] @ [.., x, c]`` (in the workspace buffer
    ``name`` when ``ws`` is given, or into ``out``: the result's shape and dtype, each
    (batch, head) slice contiguous); a 5-D band view ``b`` (its batch dims do not merge)
    runs as one ``bmm`` per (batch, head) into one result instead of ``matmul`` copying it
    (a band tile's keys: one matmul over views, no gather)."""
    band = not (b.dim() != 5 or b.shape[:2] != a.shape[:2] or b.stride(2) * b.shape[2] == b.stride(1))
    if out is not None and not band:
        out[...] = torch.matmul(a, b)  # a strided view: matmul's out= would copy it anyway
        return out
    if ws is not None and out is None:
        shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
        out = ws.get(name, shape, a if a.dtype == torch.result_type(a, b) else b)
    if not band:
        return torch.matmul(a, b) if out is None else torch.matmul(a, b, out=out)
    B, H = a.shape[:2]
    if out is None:
        out = torch.empty(*a.shape[:-1], b.shape[-1], dtype=torch.result_type(a, b), device=a.device)
    for i in range(B):
        for j in range(H):
            torch.bmm(a[i, j], b[i, j], out=out[i, j])
    return out


def _tile_kv(p: _Plan, t: _Tile, k: torch.Tensor, v: torch.Tensor, ws: Optional[Workspace] = None):
    """A tile's keys and values: slices, band views or gathered blocks (in ``ws``)."""
    if t.keys is not None:
        return k[:, :, t.keys], v[:, :, t.keys]
    if t.band is not None:
        G, S = t.sparse_idx.shape[-2:]
        return (_band_keys(k, p.block_k, t.band, G, S, p.nkb, ws, "k"),
                _band_keys(v, p.block_k, t.band, G, S, p.nkb, ws, "v"))
    safe = t.sparse_idx.clamp(min=0)
    return _gather_blocks(k, p.block_k, safe, ws, "k"), _gather_blocks(v, p.block_k, safe, ws, "v")


def _tile_q(p: _Plan, t: _Tile, x: torch.Tensor) -> torch.Tensor:
    """Query-row tensor ``x [B, H, NQ_pad, F]`` cut to the tile's rows, shaped for matmul."""
    xr = x[:, :, t.rows]
    if t.shape_q is None:
        return xr
    return xr.reshape(x.shape[0], x.shape[1], t.shape_q, p.block_q, x.shape[-1])


def _tile_q_scaled(p: _Plan, t: _Tile, x: torch.Tensor, factor: float, ws: Workspace,
                   name: str) -> torch.Tensor:
    """``_tile_q(p, t, x) * factor`` written into the workspace buffer ``name`` (a fresh
    tensor per group paid its page faults on every call)."""
    xr = _tile_q(p, t, x)
    return torch.mul(xr, factor, out=ws.get(name, xr.shape, xr))


def _tile_scores(p: _Plan, t: _Tile, qt_scaled: torch.Tensor, kt: torch.Tensor,
                 ws: Optional[Workspace] = None, base2: bool = False) -> torch.Tensor:
    """Masked scores ``[.., r, L]`` (statistics dtype) of a tile (in ``ws`` when given);
    ``qt_scaled`` already carries the scale — and, with ``base2``, the factor ``log2 e``
    (scores in base-2 units, for ``exp2`` without a scaling pass over the tile: the
    self-pair penalty is scaled alike)."""
    penalty = SELF_PENALTY * LOG2_E if base2 else SELF_PENALTY
    s = tile_matmul(qt_scaled, kt.transpose(-1, -2), ws, "scores")
    s = s.to(stat_dtype(s.dtype))  # bf16 products: softmax statistics in float32
    # in place on column views: the other slots allow every pair (no self-exclusion there)
    cols = [(0, s.shape[-1], p.exclude_self)] if t.mask_cols is None else [
        (a, b, False) for a, b in t.mask_cols]
    for a, b, exclude_self in cols:
        view, kp = s[..., a:b], t.k_pos[..., a:b]
        kv = None if t.k_valid is None else t.k_valid[..., a:b]
        rules = dict(causal=p.causal, exclude_self=exclude_self, pair_mask=p.pair_mask)
        bias = None
        if p.causal or exclude_self or p.pair_mask is not None:
            # the pair rules as a shared bias; invalid keys (padding, empty or clipped slots)
            # then one fill: a clipped end window keeps its bias like the inner ones
            bias = _tile_bias(t, a, b, kp, s.dtype, penalty, rules)
            if bias is None:
                apply_masks(view, t.q_pos, kp, k_valid=kv, inplace=True, penalty=penalty, **rules)
                continue
            view.add_(bias)
        if kv is not None:
            view.masked_fill_(~kv, float("-inf"))
    return s


def _tile_bias(t: _Tile, a: int, b: int, kp, dtype, penalty: float, rules: dict):
    """:func:`shared_tile_bias` of the pair rules on the columns ``a:b`` of tile ``t``
    (positions ``kp``; key validity is the caller's to apply), looked up in the tile's
    kept biases when it has them and the rule is nameable
    (:func:`effattn.masks.rule_key`)."""
    rk = rule_key(rules["pair_mask"])
    key = None if t.biases is None or rk is None else (
        a, b, rk, rules["causal"], rules["exclude_self"], dtype, penalty)
    if key is not None and key in t.biases:
        return t.biases[key]
    with torch.inference_mode(key is None and torch.is_inference_mode_enabled()):
        bias = shared_tile_bias(t.q_pos, kp, dtype=dtype, penalty=penalty, **rules)
    if key is not None and (bias is None or sum(
            x.numel() for x in tuple(t.biases.values()) if x is not None) + bias.numel()
            <= BIASES_PER_TILE * t.q_pos.shape[-2] * t.k_pos.shape[-1]):
        t.biases[key] = bias
    return bias


def _rows_flat(p: _Plan, t: _Tile, x: torch.Tensor) -> torch.Tensor:
    """Undo the sparse ``[B, H, G, bq, F]`` grouping back to ``[B, H, G*bq, F]``."""
    if t.shape_q is None:
        return x
    return x.reshape(x.shape[0], x.shape[1], -1, *x.shape[4:])


def _rows_out(p: _Plan, t: _Tile, out: torch.Tensor, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The rows of ``out [B, H, NQ_pad, Dv]`` that tile ``t``'s product writes, shaped like
    that product (:func:`_tile_q`), when ``like`` (a tile operand) has ``out``'s dtype: a
    band tile's matmul then writes them in place (no product tensor, no copy); else None."""
    if like.dtype != out.dtype:
        return None
    return _tile_q(p, t, out)


def _every_row_has_a_key(p: _Plan, t: _Tile) -> bool:
    """Whether every query row of tile ``t`` provably has an allowed key: no padding or
    empty slot, and no pair rule at all or a slot the rules leave whole (``full_slots``)."""
    if t.k_valid is not None:
        return False
    if not (p.causal or p.exclude_self or p.pair_mask is not None):
        return True
    width = t.k_pos.shape[-1]
    return t.mask_cols is not None and sum(b - a for a, b in t.mask_cols) < width


def _native_rules(p: _Plan, q: torch.Tensor) -> Optional[dict]:
    """The keywords describing plan ``p``'s pattern to the native kernels, or None where they
    cannot take it: switched off (:data:`USE_NATIVE`), not float32 on the CPU, blocks not
    square, or a pair rule other than a :func:`effattn.masks.distance_rule`."""
    if not USE_NATIVE or q.dtype != torch.float32 or q.device.type != "cpu" or p.block_q != p.block_k:
        return None
    distance = None
    if p.pair_mask is not None:
        distance = getattr(p.pair_mask, "distance", None)
        if distance is None:
            return None
    # the self penalty is everywhere: the rule-free hint does not hold with it
    full = None if p.kv_blocks is None or p.exclude_self else p.unmasked_slots()
    return dict(block=p.block_q, q_pos=p.q_pos, k_pos=p.k_pos, k_valid=p.k_valid,
                full_slots=full, causal=p.causal, exclude_self=p.exclude_self,
                penalty=SELF_PENALTY * LOG2_E, distance=distance)


def _forward(p: _Plan, q, k, v, need_lse: bool = True, out: Optional[torch.Tensor] = None):
    """Engine forward on padded, compute-dtype tensors -> ``(out, lse)`` padded (``lse``
    None with ``need_lse=False``: then a group whose one tile holds every row's keys, each
    row with at least one allowed, runs torch's fused softmax in place — one kernel, 0.72x
    the time of the unnormalized weights, their statistics and the output scaling).
    ``out``: the ``[B, H, NQ_pad, Dv]`` statistics-dtype tensor to write (any view whose
    rows are contiguous, e.g. some rows of a larger output), else a new one."""
    B, H = q.shape[:2]
    cdt = stat_dtype(q.dtype)
    if out is None:
        out = pooled_empty((B, H, q.shape[2], v.shape[-1]), cdt, q.device)
    lse = pooled_empty((B, H, q.shape[2]), cdt, q.device) if need_lse else None
    rules = _native_rules(p, q)
    if rules is not None and native.block_sparse(q, k, v, p.kv_blocks, qscale=p.scale * LOG2_E,
                                                 out=out, lse=lse, **rules):
        return out, lse
    ws = kept_workspace("engine", q.device)  # tiles' gathered keys and scores: the same memory
    # every tile and every call
    for rows, tiles in _tiles(p):
        if not tiles:  # causal dense group with no key tile at all
            out[:, :, rows] = 0
            if need_lse:
                lse[:, :, rows] = float("-inf")
            continue
        if not need_lse and len(tiles) == 1 and _every_row_has_a_key(p, tiles[0]):
            t = tiles[0]
            kt, vt = _tile_kv(p, t, k, v, ws)
            s = _tile_scores(p, t, _tile_q_scaled(p, t, q, p.scale, ws, "qs"), kt, ws)
            dst = _rows_out(p, t, out, vt)
            o = tile_matmul(torch.softmax(s, -1, out=s).to(vt.dtype), vt, out=dst)
            if dst is None:
                out[:, :, rows] = _rows_flat(p, t, o.to(cdt))
            continue
        # scores in base-2 units: the queries carry log2 e (one pass over [r, D], not one over
        # the [r, L] scores before exp2)
        qs = _tile_q_scaled(p, tiles[0], q, p.scale * LOG2_E, ws, "qs")
        dst = None
        if len(tiles) == 1:  # the whole key set in one tile: plain softmax, in place
            kt, vt = _tile_kv(p, tiles[0], k, v, ws)
            w, l, inv = softmax_weights_(_tile_scores(p, tiles[0], qs, kt, ws, base2=True), base2=True)
            dst = _rows_out(p, tiles[0], out, vt)
            o = tile_matmul(w.to(vt.dtype), vt, out=dst).to(cdt).mul_(inv)  # normalized: [.., r, Dv]
        else:
            state = online_init(qs.shape[:-1], v.shape[-1], cdt, q.device)
            for t in tiles:
                kt, vt = _tile_kv(p, t, k, v, ws)
                state = online_update(*state, _tile_scores(p, t, qs, kt, ws, base2=True), vt,
                                      base2=True)
            o, l = online_finish(*state, base2=True)
        if dst is None:  # else o is out's rows already
            out[:, :, rows] = _rows_flat(p, tiles[0], o)
        if need_lse:
            lse[:, :, rows] = _rows_flat(p, tiles[0], l[..., None])[..., 0]
    return out, lse


def tile_gradients(pr, qt, kt, vt, dot, dt, ws: Optional[Workspace] = None,
                   names=("dv", "ds", "dk", "dq")):
    """Gradients of one score tile (FlashAttention-2 backward); with ``ws``, ``dv``, the
    score gradient, ``dk`` and ``dq`` live in its buffers ``names`` (valid until those
    names are requested again).

    Args:
        pr: ``[.., r, L]`` probabilities ``exp(S - lse)`` (statistics dtype; overwritten).
        qt: ``[.., r, D]`` scaled queries; kt: ``[.., L, D]``; vt: ``[.., L, Dv]`` (matmul dtype).
        dot: ``[.., r, Dv]`` output gradient (matmul dtype); dt: ``[.., r, 1]``
            ``rowsum(dO * O) - dlse`` (statistics dtype).

    Returns:
        ``(dq [.., r, D]`` statistics dtype, still to be multiplied by the scale,
        ``dk [.., L, D]``, ``dv [.., L, Dv])``.
    """
    mdt, cdt = dot.dtype, pr.dtype
    dv_name, ds_name, dk_name, dq_name = names
    dvt = tile_matmul(pr.to(mdt).transpose(-1, -2), dot, ws, dv_name)
    ds = tile_matmul(dot, vt.transpose(-1, -2), ws, ds_name).to(cdt).sub_(dt).mul_(pr)
    ds_m = ds.to(mdt)
    return (tile_matmul(ds_m, kt, ws, dq_name).to(cdt),
            tile_matmul(ds_m.transpose(-1, -2), qt, ws, dk_name), dvt)


def _backward(p: _Plan, q, k, v, out, lse, dout, dlse, acc=None):
    """Recomputing backward: ``(dq, dk, dv)`` from saved ``q, k, v, out, lse``; with
    ``acc = (dq, dk, dv)`` (statistics dtype, the padded shapes) added into those buffers
    and returned.

    With ``P = exp(S - lse)`` and ``D_i = rowsum(dO * O) - dlse_i``:
    ``dV = P^T dO``, ``dS = P * (dO V^T - D)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``.
    """
    mdt, cdt = q.dtype, stat_dtype(q.dtype)  # matmul dtype (bf16 stays bf16), statistics dtype
    if acc is None:  # every query group's rows are written below: no zero fill for dq
        dq = pooled_empty(q.shape, cdt, q.device)
        dk = pooled_zeros(k.shape, cdt, k.device)
        dv = pooled_zeros(v.shape, cdt, v.device)
    else:
        dq, dk, dv = acc
    delta = output_delta(dout, out, dlse)
    dout = dout.to(mdt)
    lse_s = safe_lse(lse)
    rules = _native_rules(p, q)
    if rules is not None and native.block_sparse_backward(
            q, k, v, p.kv_blocks, qscale=p.scale * LOG2_E, scale=p.scale,
            lse2=(lse_s * LOG2_E).contiguous(), delta=delta.contiguous(), dout=dout, dq=dq, dk=dk,
            dv=dv, add_dq=acc is not None, **rules):
        return dq, dk, dv
    ws = kept_workspace("engine", q.device)  # tiles' gathered keys, scores and gradients
    for rows, tiles in _tiles(p):
        if not tiles:
            if acc is None:
                dq[:, :, rows] = 0
            continue
        t0 = tiles[0]
        qt = _tile_q_scaled(p, t0, q, p.scale, ws, "qt")
        # scores in base-2 units (exp2 with no scaling pass over the tile), from the queries
        # scaled exactly as the forward scaled them (bf16: one rounding, the forward's)
        qs = _tile_q_scaled(p, t0, q, p.scale * LOG2_E, ws, "qs")
        dot = _tile_q(p, t0, dout)
        lt = _tile_q(p, t0, lse_s[..., None]) * LOG2_E
        dt = _tile_q(p, t0, delta[..., None])
        dqt = None
        for t in tiles:
            kt, vt = _tile_kv(p, t, k, v, ws)
            pr = _tile_scores(p, t, qs, kt, ws, base2=True).sub_(lt).exp2_()  # P: [.., r, L]
            part, dkt, dvt = tile_gradients(  # later tiles' dq parts: a buffer of their own
                pr, qt, kt, vt, dot, dt, ws, ("dv", "ds", "dk", "dq" if dqt is None else "dq_part"))
            dqt = part if dqt is None else dqt.add_(part)
            if t.keys is not None:
                dk[:, :, t.keys] += dkt
                dv[:, :, t.keys] += dvt
            elif t.band is not None:
                _band_add_(dk, p.block_k, t.band, dkt, p.nkb, ws, "dk_window")
                _band_add_(dv, p.block_k, t.band, dvt, p.nkb, ws, "dv_window")
            else:
                _scatter_blocks(dk, p.block_k, t.sparse_idx, dkt)
                _scatter_blocks(dv, p.block_k, t.sparse_idx, dvt)
        if acc is None:
            dq[:, :, rows] = _rows_flat(p, t0, dqt.mul_(p.scale))
        else:
            dq[:, :, rows] += _rows_flat(p, t0, dqt.mul_(p.scale))
    return dq, dk, dv


class RecomputedAttention(torch.autograd.Function):
    """Attention whose backward recomputes its probabilities: only ``q, k, v, out, lse``
    are saved.  ``apply(q, k, v, forward, backward)`` with ``forward(q, k, v) -> (out
    [B,H,Nq,Dv], lse [B,H,Nq])`` and ``backward(q, k, v, out, lse, dout, dlse) -> (dq, dk,
    dv)`` (``dlse`` may be ``None``); gradients are returned in the inputs' dtypes."""

    @staticmethod
    def forward(ctx, q, k, v, forward, backward):
        out, lse = forward(q, k, v)
        ctx.backward_fn = backward
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = ctx.backward_fn(q, k, v, out, lse, dout.to(out.dtype), dlse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def _positions(pos: Optional[torch.Tensor], n: int, n_pad: int, device) -> torch.Tensor:
    if pos is None:
        return torch.arange(n_pad, device=device)[None, None]
    if pos.dim() != 3:
        raise ValueError(f"positions: expected [B|1, H|1, N], got shape {tuple(pos.shape)}")
    # padded rows get a position no real row has; they are masked as keys and dropped as queries
    return _pad_last(pos.long(), n_pad, value=-1)


def _make_plan(B, H, Nq, Nk, device, kv_blocks, *, block_q, block_k, scale, causal=False,
               exclude_self=False, q_pos=None, k_pos=None, k_valid=None, pair_mask=None,
               tile_budget=None, group_blocks=None, slot_chunk=None, full_slots=None,
               exact_layout=False) -> _Plan:
    """Validate a call on ``Nq`` queries and ``Nk`` keys of ``B x H`` heads and build its
    :class:`_Plan` (arguments as :func:`block_sparse_attention`)."""
    tile_budget = DEFAULT_TILE_BUDGET if tile_budget is None else tile_budget
    nqb, nkb = math.ceil(Nq / block_q), math.ceil(Nk / block_k)
    NQ, NK = nqb * block_q, nkb * block_k
    default_pos = q_pos is None and k_pos is None
    qp = _positions(q_pos, Nq, NQ, device)
    kp = _positions(k_pos, Nk, NK, device)
    kvalid = None if k_valid is None else _pad_last(k_valid, NK, value=False)
    if kvalid is None and NK > Nk:
        kvalid = (torch.arange(NK, device=device) < Nk)[None, None]
    if kv_blocks is not None:
        if kv_blocks.dim() != 4 or kv_blocks.shape[2] != nqb:
            raise ValueError(
                f"kv_blocks: expected [B|1, H|1, {nqb}, S], got {tuple(kv_blocks.shape)}")
        if kv_blocks.numel() and int(kv_blocks.max()) >= nkb:
            raise ValueError(f"kv_blocks: index {int(kv_blocks.max())} >= number of key blocks {nkb}")
        kv_blocks = kv_blocks.long()
    # group sizing: keep B*H*(rows)*(keys) within the tile budget
    if kv_blocks is None:
        if slot_chunk is None:
            slot_chunk = max(1, min(nkb, tile_budget // max(1, B * H * block_q * block_k)))
        if group_blocks is None:
            group_blocks = max(1, min(nqb, tile_budget // max(1, B * H * block_q * block_k * slot_chunk)))
    else:
        S = kv_blocks.shape[-1]
        if slot_chunk is None:
            slot_chunk = max(1, S)
        if group_blocks is None:
            group_blocks = max(1, min(nqb, tile_budget // max(1, B * H * block_q * block_k * slot_chunk)))
    return _Plan(B, H, Nq, Nk, block_q, block_k, float(scale), causal, exclude_self, kv_blocks,
                 qp, kp, kvalid, pair_mask, default_pos, group_blocks, slot_chunk,
                 None if kv_blocks is None else full_slots, bool(exact_layout), k_valid is not None)


def _prepare(q, k, v, kv_blocks, **kw):
    """Validate a call, build its :class:`_Plan` and pad/cast ``q, k, v`` to block multiples
    in the statistics dtype -> ``(plan, qc, kc, vc)`` (arguments as
    :func:`block_sparse_attention`)."""
    B, H, Nq = q.shape[:3]
    plan = _make_plan(B, H, Nq, k.shape[2], q.device, kv_blocks, **kw)
    NQ, NK = plan.nqb * plan.block_q, plan.nkb * plan.block_k
    # bf16 keeps its matmuls in bf16 (several times faster on CPUs with bf16 units; products
    # accumulate in float32 inside the matmul) while every softmax statistic is float32
    mdt = torch.bfloat16 if q.dtype == torch.bfloat16 else stat_dtype(q.dtype)
    # queries only need contiguous rows (the tiles view them): a row range of a larger
    # tensor (BigBird's row pieces) is not copied (64 MB at N = 65,536, H = 4)
    qc = _pad_rows(q.to(mdt), NQ)
    if not _rows_contiguous(qc):
        qc = qc.contiguous()
    kc = _pad_rows(k.to(mdt), NK).contiguous()
    vc = _pad_rows(v.to(mdt), NK).contiguous()
    return plan, qc, kc, vc


def native_rows_forward(q, k, v, rows: torch.Tensor, kv_blocks, **kw):
    """The engine's forward on permuted rows through the native kernel, without copying them
    into the permuted order: engine row ``s`` is row ``rows[s]`` of ``q [B, H, N, D]``, ``k``,
    ``v [B, H, N, Dv]`` (``-1``: a padding slot, which ``k_valid`` must mask), every row in
    some slot; ``kv_blocks`` and the keywords (:func:`block_sparse_attention`'s: positions,
    validity and rules of the engine rows) as the engine takes them on the permuted tensors.
    Returns ``(out [B, H, N, Dv], lse [B, H, N])`` in the original order, or None where the
    kernel does not serve (the caller then permutes and runs the engine)."""
    B, H, N = q.shape[:3]
    L = rows.shape[0]
    plan = _make_plan(B, H, L, L, q.device, kv_blocks, **kw)
    rules = _native_rules(plan, q)
    if rules is None or plan.nqb * plan.block_q != L:
        return None
    out = pooled_empty((B, H, N, v.shape[-1]), torch.float32, q.device)
    lse = pooled_empty((B, H, N), torch.float32, q.device)
    if not native.block_sparse(q, k, v, plan.kv_blocks, qscale=plan.scale * LOG2_E, out=out,
                               lse=lse, rows=rows, **rules):
        return None
    return out, lse


def native_rows_backward(q, k, v, out, lse, dout, dlse, rows: torch.Tensor, kv_blocks, grads,
                         **kw) -> bool:
    """The gradients of :func:`native_rows_forward`'s attention as a share of a larger one
    (final ``out``, ``lse`` and their gradients ``dout``, ``dlse`` or None, all in the
    original order, as :func:`block_sparse_backward` takes them) added into ``grads = (dq,
    dk, dv)`` (float32, shapes of q, k, v).  Returns False (nothing added) where the kernel
    does not serve."""
    B, H = q.shape[:2]
    L = rows.shape[0]
    plan = _make_plan(B, H, L, L, q.device, kv_blocks, **kw)
    rules = _native_rules(plan, q)
    if rules is None or plan.nqb * plan.block_q != L:
        return False
    lse2 = (safe_lse(lse) * LOG2_E).contiguous()
    return native.block_sparse_backward(
        q, k, v, plan.kv_blocks, qscale=plan.scale * LOG2_E, scale=plan.scale, lse2=lse2,
        delta=output_delta(dout, out, dlse).contiguous(), dout=dout, dq=grads[0], dk=grads[1],
        dv=grads[2], add_dq=True, rows=rows, **rules)


def block_sparse_forward(q, k, v, kv_blocks, **kw):
    """The engine's own forward without autograd (no FlexAttention dispatch):
    ``(out [B, H, Nq, Dv]`` in the statistics dtype, ``lse [B, H, Nq])``.  Arguments as
    :func:`block_sparse_attention`; callers that stream pieces of a larger attention
    (LSH) pair it with :func:`block_sparse_backward`."""
    plan, qc, kc, vc = _prepare(q, k, v, kv_blocks, **kw)
    with torch.no_grad():
        out, lse = _forward(plan, qc, kc, vc)
    return out[:, :, :q.shape[2]], lse[:, :, :q.shape[2]]


def block_sparse_backward(q, k, v, out, lse, dout, dlse, kv_blocks, *, acc=None, **kw):
    """Gradients ``(dq, dk, dv)`` (shapes of ``q, k, v``, statistics dtype) of attention
    restricted to ``kv_blocks`` given the *final* ``out [B, H, Nq, Dv]`` and
    ``lse [B, H, Nq]`` of each query row and their gradients ``dout`` / ``dlse`` (or
    None).  When ``lse`` is the log-sum-exp of a larger key set of which this layout is
    one part (LSH rounds, unions), the result is that part's share of the larger
    attention's gradient: ``P = exp(S - lse)`` and ``D = rowsum(dout * out) - dlse`` are
    the larger attention's.  ``acc = (dq, dk, dv)`` (statistics dtype, shapes of q, k, v;
    views are fine): the gradients are added into them (no full-size buffers of this
    call's own when no padding is needed) and returned.  Other arguments as
    :func:`block_sparse_attention`."""
    plan, qc, kc, vc = _prepare(q, k, v, kv_blocks, **kw)
    NQ = qc.shape[2]
    cdt = stat_dtype(qc.dtype)
    pad = functools.partial(_pad_rows, n=NQ)
    lse_p = _pad_last(lse.to(cdt), NQ, float("-inf"))
    dlse_p = None if dlse is None else _pad_last(dlse.to(cdt), NQ, 0.0)
    # the engine adds straight into acc unless rows need padding (or a block scatter needs
    # acc's key buffers flat)
    direct = (acc is not None and NQ == q.shape[2] and kc.shape[2] == k.shape[2]
              and (kv_blocks is None or (acc[1].is_contiguous() and acc[2].is_contiguous())))
    with torch.no_grad():
        dq, dk, dv = _backward(plan, qc, kc, vc, pad(out.to(cdt)), lse_p, pad(dout.to(cdt)), dlse_p,
                               acc=acc if direct else None)
        if direct:
            return acc
        grads = dq[:, :, :q.shape[2]], dk[:, :, :k.shape[2]], dv[:, :, :v.shape[2]]
        if acc is None:
            return grads
        return tuple(a.add_(g) for a, g in zip(acc, grads))


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_blocks: Optional[torch.Tensor],
    *,
    block_q: int,
    block_k: int,
    scale: float,
    causal: bool = False,
    exclude_self: bool = False,
    q_pos: Optional[torch.Tensor] = None,
    k_pos: Optional[torch.Tensor] = None,
    k_valid: Optional[torch.Tensor] = None,
    pair_mask: Optional[PairMask] = None,
    tile_budget: Optional[int] = None,
    group_blocks: Optional[int] = None,
    slot_chunk: Optional[int] = None,
    need_lse: bool = True,
    full_slots: Optional[torch.Tensor] = None,
    exact_layout: bool = False,
    race: bool = True,
    out: Optional[torch.Tensor] = None,
):
    """Attention restricted to a block layout.

    Args:
        q: ``[B, H, Nq, D]``; k: ``[B, H, Nk, D]``; v: ``[B, H, Nk, Dv]`` (any N: the
            engine pads to block multiples, padded keys are never attended).
        kv_blocks: ``None`` (every query block sees every key block) or long
            ``[B|1, H|1, ceil(Nq/block_q), S]`` key-block indices, ``-1`` = empty slot.
            A block may appear in several slots (it is then counted several times).
        q_pos / k_pos: original positions ``[B|1, H|1, Nq]`` / ``[.., Nk]`` used by every
            mask rule (default ``arange``).
        k_valid: bool ``[B|1, H|1, Nk]``, False = padding key (never attended).
        causal: key position <= query position.  exclude_self: shared-QK self penalty.
        pair_mask: extra rule ``f(q_pos [.., r, 1], k_pos [.., 1, L]) -> bool`` (True =
            allowed); for sparse layouts the position tensors carry a group dim
            ``[.., G, bq, 1]`` / ``[.., G, 1, L]``.
        tile_budget: score elements per processed group (memory/speed knob).
        need_lse: ``False``: no log-sum-exp wanted — the call may go to FlexAttention
            where that has none (CPU inference), and without gradients the engine skips it
            (fused softmax where a tile holds whole rows); ``lse`` is then ``None``.
        full_slots: optional bool, broadcastable to ``kv_blocks``: slots in which the
            caller's rules (causal and ``pair_mask``, on the given positions) allow every
            pair; a hint for the FlexAttention path (padding is checked here).
        exact_layout: the caller's rules (causal, ``pair_mask``, ``k_valid``) allow no
            pair outside the listed blocks, so FlexAttention's ``mask_mod`` needs no
            listing check (a table read per score of partial blocks).
        race: where the dispatch ``"auto"`` on CPU would race FlexAttention against the
            own path (:mod:`effattn.mechanisms._flex`); ``False``: FlexAttention whenever
            usable (a layout built for it whose own-path alternative is another call).
        out: without gradients only, a ``[B, H, Nq, Dv]`` tensor of q's dtype (any view
            whose rows are contiguous, e.g. a row range of a larger output) that receives
            the result, which is then returned as it (the engine writes its rows in place
            where no padding or dtype change is involved; no output buffer of its own).

    Returns:
        ``(out [B, H, Nq, Dv]`` in q's dtype, ``lse [B, H, Nq]`` float32/float64), both
        differentiable (``lse`` too).  Queries with no allowed key give 0 and ``-inf``.
        ``lse`` is ``None`` when ``need_lse=False`` and no gradient is needed (or
        FlexAttention ran).
    """
    plan, qc, kc, vc = _prepare(q, k, v, kv_blocks, block_q=block_q, block_k=block_k, scale=scale,
                                causal=causal, exclude_self=exclude_self, q_pos=q_pos, k_pos=k_pos,
                                k_valid=k_valid, pair_mask=pair_mask, tile_budget=tile_budget,
                                group_blocks=group_blocks, slot_chunk=slot_chunk,
                                full_slots=full_slots, exact_layout=exact_layout)
    Nq = q.shape[2]
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    # the forward's lse is kept for the backward
    lse_wanted = need_lse or grad
    into = None  # the engine's own output rows: out itself where nothing is padded or cast
    if out is not None:
        _check_out(out, q, v, grad)
        if out.dtype == stat_dtype(q.dtype) and qc.shape[2] == Nq and _rows_contiguous(out):
            into = out

    def own():
        return RecomputedAttention.apply(qc, kc, vc, functools.partial(
            _forward, plan, need_lse=lse_wanted, out=into), functools.partial(_backward, plan))

    def result(o, lse):
        o = o[:, :, :Nq]
        if out is not None:
            if not (o.data_ptr() == out.data_ptr() and o.stride() == out.stride()):
                out.copy_(o)  # padded, cast or FlexAttention's: not written in place
            o = out
        return o.to(q.dtype), (None if lse is None else lse[:, :, :Nq])

    res = None
    if _flex.usable(plan, qc, kc, vc, need_lse):
        key = _flex.race_key(plan, qc, kc, vc) if race else None
        if _flex.raced(key) is not False:
            cdt = stat_dtype(q.dtype)  # FlexAttention computes in the statistics dtype
            flex = functools.partial(_flex.forward, plan, qc.to(cdt), kc.to(cdt), vc.to(cdt), need_lse)
            res = flex()  # compiles on a new shape or pattern
            if res is not None and key is not None and _flex.raced(key) is None:
                res, mine = _flex.race(key, flex, own, hold=_flex.block_tables(
                    plan.kv_blocks, plan.nkb, plan.unmasked_slots()))
                if res is None:
                    BACKEND_CALLS["engine"] += 1
                    return result(*mine)
    if res is not None:
        BACKEND_CALLS["flexattention"] += 1
        return result(*res)
    BACKEND_CALLS["engine"] += 1
    return result(*own())


def _check_out(out: torch.Tensor, q: torch.Tensor, v: torch.Tensor, grad: bool) -> None:
    """Raise ``ValueError`` unless ``out`` can receive :func:`block_sparse_attention`'s
    result for ``q [B, H, Nq, D]``, ``v [.., Dv]`` (shape, dtype, device; no gradient)."""
    want = (*q.shape[:3], v.shape[-1])
    if grad:
        raise ValueError("out: only without gradients (the result would not be differentiable)")
    if tuple(out.shape) != want or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(f"out: expected a {q.dtype} tensor of shape {want} on {q.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
