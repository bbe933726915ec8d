"""BigBird (Zaheer et al. 2020): block-level window + global + random attention.

The sequence is cut into blocks of ``block_size``; query block ``a`` sees key block ``b``

- window: ``|a - b| <= n_window_blocks // 2``;
- global (ITC): the first and last ``n_global_blocks`` blocks see every block and every
  block sees them;
- random: ``n_random_blocks`` blocks per (head, query block), drawn reproducibly from
  ``seed`` among the blocks not already seen by window/global (all of them when fewer
  remain);

and every pair inside a seen block pair is allowed.  ``causal=True`` keeps the past:
window and random blocks ``b <= a`` (random drawn from strictly earlier blocks), global =
only the first blocks, plus the usual ``j <= i`` inside blocks.

ETC-style extra global tokens: ``global_qkv=(gq, gk, gv)`` (``[B|1, H, g, D]`` /
``[.., g, Dv]``) adds g keys every token sees (with ``causal`` they act as a prefix before
position 0: they are inputs, not sequence tokens; a sequence whose ``padding_mask`` is all
False has none, so its rows stay empty); the output keeps the N real rows.
:class:`BigBirdETC` (``effattn.get("bigbird_etc", extra_global_tokens=g, heads=H, dim=D)``)
learns ``gq, gk, gv`` and also returns the global tokens' own outputs on request.

Engine passes: non-global query blocks through the block layout, global query blocks
densely over all keys (with gradients, the two as one autograd node), extra global keys
densely (merged on log-sum-exp).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from effattn.api import prepare, register, spec
from effattn.mechanisms._layout import (
    check_int, check_same_length, compact_layout, engine_flops, merge_parts, n_blocks,
)
from effattn.mechanisms import _flex
from effattn.mechanisms._union import EnginePart, union_attention
from effattn.mechanisms.blocksparse import block_sparse_attention
from effattn.result_pool import pooled_empty

BIGBIRD_OPTIONS = {"block_size": 64, "n_window_blocks": 3, "n_global_blocks": 1,
                   "n_random_blocks": 3, "seed": 0, "global_qkv": None,
                   "extra_global_tokens": None}


def _check(block_size, n_window_blocks, n_global_blocks, n_random_blocks, seed):
    check_int("block_size", block_size, 1)
    check_int("n_window_blocks", n_window_blocks, 1)
    if n_window_blocks % 2 == 0:
        raise ValueError(f"n_window_blocks: expected an odd int (the own block ± n//2), got {n_window_blocks}")
    check_int("n_global_blocks", n_global_blocks, 0)
    check_int("n_random_blocks", n_random_blocks, 0)
    check_int("seed", seed, 0)


def global_block_mask(nb: int, n_global_blocks: int, causal: bool, device=None) -> torch.Tensor:
    """Bool ``[nb]``: the global blocks (first and last ``n_global_blocks``; causal: first)."""
    b = torch.arange(nb, device=device)
    g = b < n_global_blocks
    return g if causal else g | (b >= nb - n_global_blocks)


def bigbird_block_pattern(nb: int, H: int, *, n_window_blocks: int, n_global_blocks: int,
                          n_random_blocks: int, seed: int, causal: bool, device=None):
    """Block-level pattern ``(pattern [H, nb, nb] bool, random [H, nb, nb] bool)``.

    ``pattern[h, a, b]``: query block ``a`` sees key block ``b`` in head ``h`` (rows of
    global query blocks list only their window/global part: those rows run densely);
    ``random`` marks the drawn random blocks.  Random blocks are drawn on CPU from
    ``torch.Generator().manual_seed(seed)``, per head and query block.
    """
    a = torch.arange(nb)[:, None]
    b = torch.arange(nb)[None, :]
    g = global_block_mask(nb, n_global_blocks, causal)
    base = ((a - b).abs() <= n_window_blocks // 2) | g[None, :]
    if causal:
        base = base & (b <= a)
    cand = ~base & ~g[:, None]
    if causal:
        cand = cand & (b < a)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(H, nb, nb, generator=gen)
    scores = torch.where(cand, scores, torch.full_like(scores, -1.0))
    rand = torch.zeros(H, nb, nb, dtype=torch.bool)
    r = min(n_random_blocks, nb)
    if r:
        top = torch.topk(scores, r, dim=-1)
        rand.scatter_(-1, top.indices, top.values >= 0)
    return (base | rand).to(device), rand.to(device)


def _row_spans(N, block, nb, n_global_blocks, causal):
    """Query row ranges ``(first_global, middle, last_global)`` as ``(start, stop)`` pairs."""
    g = min(n_global_blocks, nb)
    first = (0, min(N, g * block))
    if causal:
        return first, (first[1], N), (N, N)
    last_start = max(first[1], (nb - g) * block)
    return first, (first[1], min(N, last_start)), (min(N, last_start), N)


def _check_global_qkv(global_qkv, B, H, D, Dv):
    if global_qkv is None:
        return None
    if not isinstance(global_qkv, (tuple, list)) or len(global_qkv) != 3 or \
            not all(isinstance(t, torch.Tensor) for t in global_qkv):
        raise ValueError("global_qkv: expected a tuple of 3 tensors (gq, gk, gv)")
    gq, gk, gv = [t if t.dim() == 4 else t[None] if t.dim() == 3 else None for t in global_qkv]
    if gq is None or gk is None or gv is None:
        raise ValueError("global_qkv: expected tensors [B|1, H, g, D] (or [H, g, D])")
    g = gk.shape[2]
    for name, t, last in (("gq", gq, D), ("gk", gk, D), ("gv", gv, Dv)):
        if t.shape[0] not in (1, B) or t.shape[1] != H or t.shape[2] != g or t.shape[3] != last:
            raise ValueError(f"global_qkv: {name} expected [B|1, H={H}, g={g}, {last}], got {tuple(t.shape)}")
    return gq, gk, gv


@functools.lru_cache(maxsize=4)
def _layouts(nb: int, H: int, bs: int, n_window_blocks: int, n_global_blocks: int,
             n_random_blocks: int, seed: int, causal: bool, rows: tuple, device: torch.device):
    """``(layout [1, H, n_row_blocks, S], full_slots like it)`` of query blocks
    ``rows = (first, stop)``; ``rows = None``: every query block, global query blocks listing
    every key block (the whole pattern as one layout, for FlexAttention).  Whole blocks are
    seen; causal: except a key block reaching past the query block's start.  Memoized (the
    same objects come back, so the FlexAttention dispatch finds its block tables by
    identity); callers must not modify them."""
    pattern, _ = bigbird_block_pattern(nb, H, n_window_blocks=n_window_blocks,
                                       n_global_blocks=n_global_blocks,
                                       n_random_blocks=n_random_blocks, seed=seed,
                                       causal=causal, device=device)
    if rows is None:
        rows = (0, nb)
        if not causal:  # causal global rows already list their whole past
            pattern = pattern | global_block_mask(nb, n_global_blocks, causal, device)[:, None]
    layout = compact_layout(pattern[:, rows[0]:rows[1]])[None]
    first_q = (rows[0] + torch.arange(layout.shape[2], device=device))[:, None] * bs
    full = (layout >= 0) & ((layout + 1) * bs - 1 <= first_q) if causal else layout >= 0
    return layout, full


def _one_layout(q, k, v, layouts, kv, run):
    """The whole pattern as one layout call (for FlexAttention: global query blocks list
    every key block, all as full blocks).  ``layouts(rows)`` -> (layout, full); returns
    ``(out, lse)``.  Its own race is off: on the engine this layout's global rows are far
    slower than the row pieces (48 s at N = 65,536, measured), which :func:`bigbird` races
    it against instead."""
    layout, full = layouts(None)
    return block_sparse_attention(q, k, v, layout, k_valid=kv, full_slots=full, race=False, **run)


def _row_pieces(q, k, v, layouts, spans, kv, run):
    """Global query rows densely over every key (causal: the first blocks over the first
    blocks), the others through the block layout (``spans`` = first/middle/last row
    ranges; ``layouts(rows)`` -> (layout, full) of query blocks ``rows``); returns ``(out,
    lse)``.  With gradients the pieces are one autograd node
    (:func:`~effattn.mechanisms._union.union_attention`: one set of gradient buffers, no
    gathered or concatenated copies); without, each piece runs alone (FlexAttention where
    it serves) and the rows are concatenated."""
    N = q.shape[2]
    bs = run["block_q"]
    first, mid, last = spans
    causal = run["causal"]
    opts = {key: val for key, val in run.items() if key != "need_lse"}
    parts = []
    for rows in (first, mid, last):
        if rows[1] <= rows[0]:
            continue
        q_pos = torch.arange(*rows, device=q.device)[None, None]
        if rows is mid:
            layout, full = layouts((mid[0] // bs, n_blocks(mid[1], bs)))
            parts.append(EnginePart(layout, dict(opts, q_pos=q_pos, k_valid=kv, full_slots=full),
                                    q_rows=rows))
        else:  # global rows: dense over every key (causal: over the first blocks)
            kend = first[1] if causal else N
            parts.append(EnginePart(None, dict(opts, q_pos=q_pos,
                                               k_valid=None if kv is None else kv[..., :kend]),
                                    q_rows=rows, k_stop=kend))
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return union_attention(q, k, v, parts)
    # each piece writes its rows of one output (no per-piece outputs concatenated: at
    # N = 65,536 two more 64 MB buffers and a copy)
    out = pooled_empty((*q.shape[:3], v.shape[-1]), q.dtype, q.device)
    lses = [part.attend(q, k, v, run["need_lse"], out=out[:, :, part.q_rows[0]:part.q_rows[1]])[1]
            for part in parts]
    lse = None if any(l is None for l in lses) else torch.cat(lses, 2)
    return out, lse


def bigbird(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk, block_size=64,
            n_window_blocks=3, n_global_blocks=1, n_random_blocks=3, seed=0, global_qkv=None,
            extra_global_tokens=None):
    """BigBird attention (ITC, or ETC with ``global_qkv``); see the module docstring.

    ``q [B,H,N,D]``, ``k [B,H,N,D]``, ``v [B,H,N,Dv]`` -> ``(out [B,H,N,Dv], lse [B,H,N])``.
    ``extra_global_tokens=g`` (ETC) needs the g tokens' q/k/v: pass them as ``global_qkv``
    or let ``effattn.get("bigbird", extra_global_tokens=g)`` learn them.
    """
    _check(block_size, n_window_blocks, n_global_blocks, n_random_blocks, seed)
    B, H, N, D = q.shape
    check_same_length(q, k, "bigbird")
    extra = _check_global_qkv(global_qkv, B, H, D, v.shape[-1])
    if extra_global_tokens is not None:
        check_int("extra_global_tokens", extra_global_tokens, 1)
        if extra is None:
            raise ValueError(
                f"extra_global_tokens: {extra_global_tokens} ETC global tokens need their q/k/v: "
                "pass global_qkv=(gq, gk, gv), or use effattn.get('bigbird', extra_global_tokens=g), "
                "a module that learns them")
        if extra[1].shape[2] != extra_global_tokens:
            raise ValueError(f"extra_global_tokens: {extra_global_tokens}, but global_qkv holds "
                             f"{extra[1].shape[2]} tokens")
    dtype = q.dtype  # the engine keeps bf16 matmuls in bf16, its statistics in float32
    kv = None if padding_mask is None else padding_mask[:, None]
    bs = block_size
    nb = n_blocks(N, bs)
    layouts = functools.partial(_layouts, nb, H, bs, n_window_blocks, n_global_blocks,
                                n_random_blocks, seed, causal, device=q.device)
    first, mid, last = _row_spans(N, bs, nb, n_global_blocks, causal)
    run = dict(scale=scale, causal=causal, exclude_self=shared_qk, block_q=bs, block_k=bs,
               need_lse=return_lse or extra is not None)
    # one layout listing every block for the global rows only where FlexAttention may take
    # it (its padded block table is bounded); elsewhere the global rows run densely
    pieces = functools.partial(_row_pieces, q, k, v, layouts, (first, mid, last), kv, run)
    if (_flex.would_dispatch(q, k, v, run["need_lse"], B * H * N * nb * bs)
            and H * nb * nb <= _flex.MAX_TABLE):
        # "auto" on CPU: the one layout on FlexAttention raced once against the row pieces on
        # the engine alone (no FlexAttention compile or race nested in their timing).  On the
        # 2-core Xeon the pieces took 85 vs 104-108 ms at N = 16,384 and 382-393 vs 449-452
        # ms at 65,536 once their no-lse tiles ran the fused softmax (an earlier one-call
        # race, before that, picked them at 65K where they then ran slower)
        key = _flex.cpu_race_key(q.device, "bigbird", tuple(q.shape), tuple(k.shape), q.dtype,
                                 block_size, n_window_blocks, n_global_blocks, n_random_blocks,
                                 seed, causal, shared_qk, padding_mask is None)

        def own():
            with _flex.flex_mode("off"):
                return pieces()

        if _flex.raced(key) is False:
            out, lse = own()
        else:
            one = functools.partial(_one_layout, q, k, v, layouts, kv, run)
            out, lse = one()  # compiles on a new shape
            if key is not None and _flex.raced(key) is None:
                res, mine = _flex.race(key, one, own)
                out, lse = res if res is not None else mine
    else:
        out, lse = pieces()
    if extra is not None:
        _, gk, gv = (t.to(dtype).expand(B, -1, -1, -1) for t in extra)
        # a sequence with no real token has no global summary either: its rows stay empty
        ev = None if padding_mask is None else padding_mask.any(1)[:, None, None].expand(B, 1, gk.shape[2])
        eo, el = block_sparse_attention(q, gk, gv, None, block_q=bs, block_k=max(1, min(bs, gk.shape[2])),
                                        scale=scale, k_valid=ev)
        out, lse = merge_parts((out, lse), (eo, el))
    return out.to(dtype), lse


def bigbird_flops(B, H, Nq, Nk, D, Dv, causal=False, block_size=64, n_window_blocks=3,
                  n_global_blocks=1, n_random_blocks=3, seed=0, global_qkv=None, **_):
    """Engine matmul FLOPs of :func:`bigbird`: layout slots for the middle rows, dense
    passes for the global rows and the extra global keys."""
    bs = block_size
    nb = n_blocks(Nq, bs)
    pattern, _ = bigbird_block_pattern(nb, H, n_window_blocks=n_window_blocks,
                                       n_global_blocks=n_global_blocks,
                                       n_random_blocks=n_random_blocks, seed=seed, causal=causal)
    first, mid, last = _row_spans(Nq, bs, nb, n_global_blocks, causal)
    f = 0.0
    n_glob = (first[1] - first[0]) + (last[1] - last[0])
    if n_glob:
        kend = first[1] if causal else Nk
        f += engine_flops(B, H, n_glob, bs, n_blocks(kend, bs) * bs, D, Dv)
    if mid[1] > mid[0]:
        layout = compact_layout(pattern[:, mid[0] // bs:n_blocks(mid[1], bs)])
        f += engine_flops(B, H, mid[1] - mid[0], bs, layout.shape[-1] * bs, D, Dv)
    if global_qkv is not None:
        g = global_qkv[1].shape[-2]
        bg = max(1, min(bs, g))
        f += engine_flops(B, H, Nq, bs, n_blocks(g, bg) * bg, D, Dv)
    return f


_BIGBIRD_FORMULA = "2·B·H·(N·(w + g_b + r)·b + 2·g_b·b·N + N·g_extra)·(D+Dv)"

register(
    "bigbird", exact=False, causal=True, time="O(N·(w + g + r)·b·D)", memory="O(N·D)",
    flops=bigbird_flops, flops_formula=_BIGBIRD_FORMULA, options=dict(BIGBIRD_OPTIONS),
    family="bigbird", random=True, learned_variant=("extra_global_tokens", "bigbird_etc"),
    description="BigBird: block window + global (ITC; ETC via global_qkv or learned extra_global_tokens) + seeded random blocks",
)(bigbird)


class BigBirdETC(nn.Module):
    """BigBird-ETC with ``extra_global_tokens`` learned global tokens per head.

    Parameters ``gq, gk [H, g, D]`` and ``gv [H, g, Dv]``.  ``forward(q, k, v, *, causal,
    padding_mask, scale, return_lse)`` takes ``[B, H, N, D]`` tensors like
    :func:`effattn.attention` and returns ``out [B, H, N, Dv]`` (and ``lse``);
    :meth:`global_outputs` gives the global tokens' own outputs ``[B, H, g, Dv]``.
    """

    def __init__(self, extra_global_tokens: int = 2, heads: Optional[int] = None,
                 dim: Optional[int] = None, dim_v: Optional[int] = None, block_size: int = 64,
                 n_window_blocks: int = 3, n_global_blocks: int = 1, n_random_blocks: int = 3,
                 seed: int = 0):
        super().__init__()
        self.g = check_int("extra_global_tokens", extra_global_tokens, 1)
        for name, val in (("heads", heads), ("dim", dim), ("dim_v", dim_v)):
            if val is not None:
                check_int(name, val, 1)
        _check(block_size, n_window_blocks, n_global_blocks, n_random_blocks, seed)
        self.gq = nn.parameter.UninitializedParameter()
        self.gk = nn.parameter.UninitializedParameter()
        self.gv = nn.parameter.UninitializedParameter()
        if heads is not None and dim is not None:
            self._materialize(heads, dim, dim if dim_v is None else dim_v)
        self.shape = (heads, dim, dim_v)
        self.options = dict(block_size=block_size, n_window_blocks=n_window_blocks,
                            n_global_blocks=n_global_blocks, n_random_blocks=n_random_blocks, seed=seed)

    def _materialize(self, H: int, D: int, Dv: int) -> None:
        """Create ``gq, gk [H, g, D]``, ``gv [H, g, Dv]`` (``N(0, 1/D)``) if not yet there."""
        if not isinstance(self.gq, nn.parameter.UninitializedParameter):
            return
        with torch.no_grad():
            for name, last in (("gq", D), ("gk", D), ("gv", Dv)):
                p = getattr(self, name)
                p.materialize((H, self.g, last))
                p.normal_(0.0, last ** -0.5)

    def _qkv(self, q, v):
        """The global q/k/v for inputs ``q [B,H,N,D]``, ``v [..,Dv]`` (created on first use when
        ``heads``/``dim`` were not given; shape mismatches raise ``ValueError``)."""
        H, D, Dv = q.shape[1], q.shape[3], v.shape[3]
        want = tuple(x for x in self.shape)
        for name, got, exp in (("heads", H, want[0]), ("dim", D, want[1]), ("dim_v", Dv, want[2])):
            if exp is not None and got != exp:
                raise ValueError(f"{name}: module built for {exp}, input has {got}")
        self._materialize(H, D, Dv)
        if self.gq.shape != (H, self.g, D) or self.gv.shape != (H, self.g, Dv):
            raise ValueError(f"q/v: global tokens are {tuple(self.gq.shape)} / {tuple(self.gv.shape)}, "
                             f"input has H={H}, D={D}, Dv={Dv}")
        return tuple(t.to(q.dtype) for t in (self.gq, self.gk, self.gv))

    def forward(self, q, k, v, *, causal=False, padding_mask=None, scale=None, return_lse=False):
        s = spec("bigbird_etc")
        k, scale, shared = prepare(s, q, k, v, causal=causal, padding_mask=padding_mask,
                                   scale=scale, return_lse=return_lse)
        out, lse = bigbird(q, k, v, causal=causal, padding_mask=padding_mask, scale=scale,
                           return_lse=return_lse, shared_qk=shared, global_qkv=self._qkv(q, v),
                           **self.options)
        return (out, lse) if return_lse else out

    def global_outputs(self, k, v, *, padding_mask=None, scale=None):
        """Outputs of the global tokens ``[B, H, g, Dv]``: each global query over the N real
        keys ``k [B, H, N, D]`` / ``v [B, H, N, Dv]`` (padding masked) and the global keys."""
        B = k.shape[0]
        gq, gk, gv = (t[None].expand(B, -1, -1, -1) for t in self._qkv(k, v))
        scale = gq.shape[-1] ** -0.5 if scale is None else scale
        valid = None
        if padding_mask is not None:
            valid = torch.cat([padding_mask, padding_mask.new_ones(B, gk.shape[2])], 1)[:, None]
        out, _ = block_sparse_attention(gq, torch.cat([k, gk], 2), torch.cat([v, gv], 2), None,
                                        block_q=gq.shape[2], block_k=self.options["block_size"],
                                        scale=scale, k_valid=valid)
        return out


register(
    "bigbird_etc", exact=False, causal=True, time="O(N·(w + g + r)·b·D)", memory="O(N·D)",
    flops=bigbird_flops, flops_formula=_BIGBIRD_FORMULA,
    options={"extra_global_tokens": 2, "heads": None, "dim": None, "dim_v": None,  # None: from input
             **{k_: v_ for k_, v_ in BIGBIRD_OPTIONS.items() if k_ not in ("global_qkv", "extra_global_tokens")}},
    family="bigbird", random=True, module=BigBirdETC,
    description="BigBird-ETC: BigBird plus learned extra global tokens (an nn.Module via effattn.get)",
)(bigbird)
