"""Reformer LSH attention (Kitaev et al. 2020), as Trax 1.3.4's ``LSHSelfAttention`` does it.

The steps, each a small public function (the seed lab's worked examples exercise them):

1. :func:`hash_vectors` — angular LSH: ``bucket = argmax(concat[xR, -xR])`` for each of
   ``n_hashes`` random rotations ``R [D, n_hashes, n_buckets // 2]``; round ``r``'s
   buckets are offset by ``r * n_buckets`` so rounds never share a bucket.  Padding
   tokens go to an extra bucket of their own (Trax's ``mask`` branch), so the content of
   padded tokens never moves real tokens in the sort.
2. :func:`sort_buckets` — the ``n_hashes * N`` (round, token) entries are sorted by the
   key ``buckets_and_t = N * bucket + (t % N)`` (by bucket, then position) and the inverse
   permutation ``undo_sort`` is kept.
3. :func:`chunk_layout` / :func:`sorted_chunk_attention` — the sorted sequence is cut into
   chunks of ``chunk_len``; each chunk attends to itself plus ``n_chunks_before`` previous
   and ``n_chunks_after`` next chunks, *cyclically over the whole concatenated sorted
   sequence* (Trax's ``look_adjacent``: the first chunk of round ``r`` sees the last chunk
   of round ``r - 1``, the first chunk of round 0 the last chunk of the last round).  A
   group of query chunks gathers its key window once; chunk ``j``'s keys are window rows
   ``j*c .. (j+S)*c`` — an overlapping strided view, no per-chunk copy — and causal,
   padding and shared-QK self-exclusion are masked by the original positions of the
   sorted rows (the self pair sits on the own chunk's diagonal, and elsewhere only in a
   chunk of another round, the only ones checked).  When there are fewer chunks than
   window slots, the group runs through the block-sparse engine instead: a chunk that
   would fill several slots is listed once (the other slots are ``-1``): a chunk's keys
   are never counted twice.  (Trax repeats it; with one chunk per round both give the
   same output, ours also the exact log-sum-exp.)  A *token* can still appear twice in
   a window through two different rounds' chunks — as in Trax.
4. The rounds are undone (``undo_sort``) and merged with weights
   ``exp(lse_r - logsumexp_r lse_r)`` (:func:`effattn.softmax.merge_partials`); the
   merged lse ``logsumexp_r lse_r`` (Trax's) is what ``return_lse=True`` returns.  It
   counts a key once per round and per window chunk holding it: with one chunk covering
   the sequence and ``n_chunks_before = 0`` (or ``n_hashes = 1``) it is the exact lse plus
   ``log(n_hashes)``, and ``log 2`` more when the previous round's chunk repeats every key.

Memory is ``O(N·D)`` forward and backward: the sorted sequence is processed in groups
of chunks (:data:`GROUP_GATHER_BYTES` of sorted copies each); a group's rows go to a
round-sized buffer in sorted order, and each finished round is gathered back into token
order and folded into the per-token result with the log-sum-exp merge; the backward
recomputes each group's copies and tiles from ``q, k, v`` and the merged ``out, lse``
(the merged statistics make each group's share of the gradient exact); the hash is
computed in slices of positions.  A group's gathers, scores and outputs and the round
buffer live in scratch buffers each thread keeps between calls on the CPU (one group's
worth plus one round's results;
:func:`~effattn.mechanisms._scratch.release_workspaces` frees them): one batched matmul
covers every (batch, head).

Separate keys (``k`` given): queries and keys are hashed with the same rotations and
sorted separately; sorted query chunk ``c`` is paired with sorted key chunk ``c`` (and
its neighbours).  This lines buckets up when queries and keys distribute over buckets
alike — the shared-QK setting Reformer is designed for; with very different
distributions a query may be paired with keys of other buckets.  ``Nq != Nk`` is not
supported (``ValueError``).

Causality: with ``causal=True`` no query attends a later key, and the gradient of
output ``i`` to every later position is exactly zero.  But later tokens take part in the
sort, so they can move chunk boundaries: output ``i`` can change when later tokens change
their *buckets* (inherent to Reformer).  If every bucket assignment is kept, changing
later tokens never changes output ``i``.

Randomness: exactly one of ``rotations`` (a tensor) and ``seed`` (an int) defines the
hash; with neither, the rotations come from ``seed = DEFAULT_SEED`` (0), so results are
deterministic.  A seed draws shared rotations ``[D, n_hashes, n_buckets // 2]`` (float32
standard normal from a CPU ``torch.Generator``); per-head hashing takes an explicit
``rotations`` tensor ``[H, D, n_hashes, n_buckets // 2]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from effattn import native
from effattn.api import register
from effattn.mechanisms._layout import check_int, check_same_length, flat_rows, take_rows
from effattn.mechanisms._scratch import Workspace, kept_workspace
from effattn.masks import SELF_PENALTY, apply_masks, self_pairs
from effattn.result_pool import pooled_empty, pooled_zeros
from effattn.mechanisms.blocksparse import (
    BACKEND_CALLS, RecomputedAttention, block_sparse_backward, block_sparse_forward,
    tile_gradients)
from effattn.softmax import (
    LN_2, LOG2_E, merge_pair_, merge_partials, output_delta, safe_lse, softmax_weights_,
    stat_dtype)

#: seed of the rotations when neither ``seed`` nor ``rotations`` is given
DEFAULT_SEED = 0
#: hashing rounds when neither ``n_hashes`` nor ``rotations`` says
DEFAULT_N_HASHES = 2
#: rotated-vector elements computed at once by :func:`hash_vectors` (memory bound: 4 MB
#: slices stay in cache across its passes; N = 16,384 with 128 buckets per round hashed in
#: 0.75x the time of 16 MB slices, no change at 1,024 buckets or N = 2,048)
HASH_SLICE_ELEMENTS = 1 << 20
#: largest ``n_buckets // 2`` hashed with the projections laid out tokens-last (see
#: :func:`hash_vectors`), with torch's passes ...
TOKENS_LAST_MAX_HALF = 64
#: ... and with the native argmax (:mod:`effattn.native`: one pass along the last dim;
#: whole hash at B=1, H=4, 4 rounds: N = 2,048 1.3 ms tokens-last vs 1.5, N = 4,096 equal,
#: N = 8,192 9.9 ms vs 13.0)
NATIVE_TOKENS_LAST_MAX_HALF = 32
#: bytes of sorted copies (query rows, key window, outputs) one group of chunks gathers: small
#: enough to stay in cache and be recycled by the allocator (a fresh N-sized copy per call
#: is page-faulted in every time: measured as half of the forward time at N = 16,384)
GROUP_GATHER_BYTES = 1 << 24

LSH_OPTIONS = {
    "n_hashes": None,
    "n_buckets": None,
    "chunk_len": 64,
    "n_chunks_before": 1,
    "n_chunks_after": 0,
    "rotations": None,
    "seed": None,
}


# ---------------------------------------------------------------- options


def default_n_buckets(n: int, chunk_len: int) -> int:
    """Buckets per round when not given: ``ceil(n / chunk_len)`` rounded up to even, >= 2
    (about one chunk of tokens per bucket)."""
    nb = max(2, -(-n // chunk_len))
    return nb + (nb % 2)


def make_rotations(d: int, n_hashes: int, n_buckets: int, seed: int) -> torch.Tensor:
    """Random rotations ``[d, n_hashes, n_buckets // 2]`` (float32, CPU), standard normal
    from a ``torch.Generator`` seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, n_hashes, n_buckets // 2, generator=g, dtype=torch.float32)


def resolve_options(D: int, H: int, N: int, *, n_hashes, n_buckets, chunk_len, n_chunks_before,
                    n_chunks_after, rotations, seed, device=None):
    """Validate the lsh options; returns ``(rotations, n_hashes, n_buckets)``.

    ``rotations`` comes back as a tensor ``[D, n_hashes, n_buckets // 2]`` or
    ``[H, D, n_hashes, n_buckets // 2]`` on ``device`` (drawn from the seed: float32;
    :func:`hash_vectors` computes in the input's hashing dtype).  Bad values raise ``ValueError``
    naming the option.
    """
    check_int("chunk_len", chunk_len, 1)
    check_int("n_chunks_before", n_chunks_before, 0)
    check_int("n_chunks_after", n_chunks_after, 0)
    if n_hashes is not None:
        check_int("n_hashes", n_hashes, 1)
    if n_buckets is not None:
        check_int("n_buckets", n_buckets, 2)
        if n_buckets % 2:
            raise ValueError(f"n_buckets: expected an even int >= 2, got {n_buckets}")
    if rotations is not None and seed is not None:
        raise ValueError("rotations/seed: give one source of randomness, not both "
                         "(rotations=tensor or seed=int)")
    if rotations is None:
        if seed is None:
            seed = DEFAULT_SEED
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        n_hashes = DEFAULT_N_HASHES if n_hashes is None else n_hashes
        n_buckets = default_n_buckets(N, chunk_len) if n_buckets is None else n_buckets
        rotations = make_rotations(D, n_hashes, n_buckets, seed)
    else:
        if not isinstance(rotations, torch.Tensor) or not rotations.is_floating_point():
            raise ValueError(f"rotations: expected a floating tensor, got {type(rotations).__name__}")
        want = "[D, n_hashes, n_buckets // 2] or [H, D, n_hashes, n_buckets // 2]"
        if rotations.dim() not in (3, 4) or rotations.shape[-3] != D or (
                rotations.dim() == 4 and rotations.shape[0] != H):
            raise ValueError(f"rotations: expected {want} with D={D}, H={H}, "
                             f"got shape {tuple(rotations.shape)}")
        r_hashes, r_half = rotations.shape[-2], rotations.shape[-1]
        if r_hashes < 1 or r_half < 1:
            raise ValueError(f"rotations: expected {want} with n_hashes, n_buckets // 2 >= 1, "
                             f"got shape {tuple(rotations.shape)}")
        if n_hashes is not None and n_hashes != r_hashes:
            raise ValueError(f"n_hashes: {n_hashes} disagrees with rotations of shape "
                             f"{tuple(rotations.shape)} ({r_hashes} hashes)")
        if n_buckets is not None and n_buckets != 2 * r_half:
            raise ValueError(f"n_buckets: {n_buckets} disagrees with rotations of shape "
                             f"{tuple(rotations.shape)} ({2 * r_half} buckets)")
        n_hashes, n_buckets = r_hashes, 2 * r_half
    if device is not None:
        rotations = rotations.to(device)
    return rotations, n_hashes, n_buckets


# ---------------------------------------------------------------- hashing and sorting


def hash_vectors(x: torch.Tensor, rotations: torch.Tensor, n_buckets: int,
                 valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Angular LSH buckets of ``x`` for every round, with per-round offsets.

    Args:
        x: ``[..., N, D]`` (per-head rotations: ``[..., H, N, D]``); hashed in float32
            (float64 for float64 input).
        rotations: ``[D, n_hashes, n_buckets // 2]`` or per head ``[H, D, n_hashes, n_buckets // 2]``.
        n_buckets: even number of buckets per round.
        valid: optional bool ``[..., N]`` (broadcastable), False = padding token: it goes to
            an extra bucket ``n_buckets`` and rounds are then offset by ``n_buckets + 1``.

    Returns:
        long ``[..., n_hashes * N]``: entry ``r * N + t`` is token ``t``'s bucket in round
        ``r``, ``argmax(concat[x_t R_r, -x_t R_r]) + r * n_buckets`` (first maximum wins,
        as ``argmax`` of the concatenation does).
    """
    if n_buckets % 2 or rotations.shape[-1] != n_buckets // 2:
        raise ValueError(f"n_buckets: expected an even number equal to 2 * rotations.shape[-1] "
                         f"= {2 * rotations.shape[-1]}, got {n_buckets}")
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    rot = rotations.to(device=x.device, dtype=cdt)
    per_round = n_buckets if valid is None else n_buckets + 1
    buckets = None
    if FUSED_HASH and cdt == torch.float32 and x.device.type == "cpu":
        buckets = native.lsh_hash(x.detach().to(cdt).contiguous(), rot.contiguous(), per_round)
    if buckets is None:
        buckets = _sliced_buckets(x, rot, per_round, cdt)
    if valid is not None:
        R = rot.shape[-2]
        offsets = torch.arange(R, device=x.device).view(R, 1) * per_round
        buckets = torch.where(valid[..., None, :], buckets, n_buckets + offsets)
    return buckets.flatten(-2)


#: hash float32 CPU tokens with the fused native kernel (projections and argmax in one
#: pass, :func:`effattn.native.lsh_hash`) where it serves: B=1, H=4, D=64, 4 rounds, the
#: whole hash took 17.9 instead of 25.8 ms at N = 16,384 and 255 instead of 331 ms at 65,536
FUSED_HASH = True


def _sliced_buckets(x: torch.Tensor, rot: torch.Tensor, per_round: int, cdt) -> torch.Tensor:
    """:func:`hash_vectors`' buckets ``[..., R, N]`` (round offsets added, padding not
    applied) through torch's matmul in slices of :data:`HASH_SLICE_ELEMENTS`, each slice's
    argmax by the native kernel (:func:`effattn.native.hash_buckets`) where it serves."""
    R, half = rot.shape[-2], rot.shape[-1]
    N = x.shape[-2]
    step = max(1, HASH_SLICE_ELEMENTS // max(1, math.prod(x.shape[:-2]) * R * half))
    # small ``half``: projections laid out [.., R, half, n], so the reductions over a round's
    # ``half`` entries run across contiguous rows of n tokens (vectorized) instead of along
    # a short last dim (N = 2,048, half = 16: 1.3 ms instead of 2.2 for the whole hash);
    # larger ``half``: [.., n, R, half] (equal at half = 32 and 64; 0.92x the time at 128;
    # 0.84x at 512, N = 65,536: 833 vs 989 ms).  With the native argmax (one pass along
    # the last dim, effattn.native) the last-dim layout serves from half = 64: the whole
    # hash at 4 rounds, B=1, H=4 took 26 instead of 50 ms at N = 16,384 and 331 instead of
    # 655 ms at 65,536
    native_argmax = x.device.type == "cpu" and native.available()
    tokens_last = half <= (NATIVE_TOKENS_LAST_MAX_HALF if native_argmax else TOKENS_LAST_MAX_HALF)
    lead = torch.broadcast_shapes(x.shape[:-2], rot.shape[:-3])
    BH = math.prod(lead)
    rot_m = rot.reshape(*rot.shape[:-3], rot.shape[-3], R * half)
    if tokens_last:  # [BH, R*half, D]: one bmm writes the slice's projections in place
        rot_m = rot_m.transpose(-1, -2).expand(*lead, R * half, rot.shape[-3]).reshape(BH, R * half, -1)
    x = x.detach().expand(*lead, N, x.shape[-1])  # buckets are not differentiable
    offsets = torch.arange(R, device=x.device).view(R, 1) * per_round
    # the native kernel writes each slice's buckets, round offsets added, straight into
    # their columns (no per-slice parts, transposes, concatenation or offset pass: 333-345
    # -> 323 ms for the whole hash at N = 65,536)
    direct = None
    if native_argmax and not tokens_last:
        direct = torch.empty(BH, R, N, dtype=torch.long, device=x.device)
    parts = []
    bufs = None  # one set of buffers (projections and the reductions' scratch) for every full
    # slice: a fresh multi-MB tensor per slice is not always handed back to the OS by glibc
    # when torch runs 2+ threads (measured: 7.9 GB resident after hashing N = 262,144
    # tokens with 2 threads, 75 MB with 1), and page faults cost ~1.5 us per 4 KB here
    for n0 in range(0, N, step):
        xs = x[..., n0:n0 + step, :].to(cdt)
        n = xs.shape[-2]
        full = n == step
        if full and bufs is None:
            shape = (*lead, R, half, n) if tokens_last else (*lead, n, R, half)
            wdt = torch.uint8 if half < 256 else torch.int32  # as concat_argmax weighs hits
            kinds = (cdt, torch.bool, wdt) if tokens_last else (cdt,) if native_argmax else (cdt, cdt)
            bufs = [torch.empty(shape, dtype=t, device=x.device) for t in kinds]
        if tokens_last:
            rv = torch.bmm(rot_m, xs.reshape(BH, n, -1).transpose(1, 2),
                           out=bufs[0].view(BH, R * half, n) if full else None)
            parts.append(concat_argmax(rv.view(*lead, R, half, n), dim=-2,
                                       scratch=bufs[1:] if full else None))  # [..., R, n]
        else:
            rv = torch.matmul(xs, rot_m, out=bufs[0].view(*lead, n, R * half) if full else None)
            if direct is not None:
                cols, rows = direct[:, :, n0:n0 + n], rv.view(BH, n, R, half)
                if not native.hash_buckets(rows, cols, per_round):
                    cols.copy_(concat_argmax(rows).transpose(-1, -2) + offsets)
                continue
            parts.append(concat_argmax(rv.view(*lead, n, R, half),
                                       scratch=bufs[1] if full and len(bufs) > 1 else None
                                       ).transpose(-1, -2))
    if direct is not None:
        return direct.view(*lead, R, N)  # offsets already added
    return torch.cat(parts, -1) + offsets


def concat_argmax(x: torch.Tensor, dim: int = -1, scratch=None) -> torch.Tensor:
    """``argmax(concat[x, -x], dim)`` without building the concatenation: ``x`` with ``h``
    entries along ``dim`` -> long, ``dim`` removed, values in ``[0, 2h)``; the first
    maximum wins as ``argmax`` does (an entry of the positive half beats an equal one of the
    negative half wherever they sit).  Rows holding NaN give some index in range.

    No index-returning reduction (torch's ``max``/``argmax`` with indices ran 20x slower than
    ``amax`` on this CPU, along the last dim or another): the winning value is ``max(x)``
    unless ``-min(x)`` is larger (then the negative half wins), and its first position is
    ``h - amax(hit * [h, h-1, .., 1])``, ``hit`` 1 where ``x`` equals it.
    Along the last dim ``hit = 1 - sign|x - value|`` in float arithmetic (comparisons
    writing bools cost 7x a subtraction there: 1M entries, 0.35 vs 0.05 ms); ``scratch``:
    optional tensor like ``x`` for it.  Along another dim (rows of contiguous columns) one
    ``==`` pass and uint8 (``h < 256``; else int32) weights, faster in that layout;
    ``scratch``: optional ``(bool, uint8 or int32)`` tensors shaped like ``x``.  Along the
    last dim of a contiguous float32/float64 CPU tensor the native kernel
    (:func:`effattn.native.concat_argmax`, same result) runs instead where it is built:
    one pass instead of eight (a 4 MB slice of 512-wide rows: 126 vs ~700 us)."""
    h = x.shape[dim]
    last = dim in (-1, x.dim() - 1)
    if last:  # one pass of the native kernel where it is built (effattn.native)
        got = native.concat_argmax(x)
        if got is not None:
            return got
    pos = x.amax(dim, keepdim=True)
    mn = x.amin(dim, keepdim=True)
    neg = pos < -mn
    value = torch.where(neg, mn, pos)
    shape = [1] * x.dim()
    shape[dim] = h
    if last:
        w = torch.arange(h, 0, -1, dtype=x.dtype, device=x.device).view(shape)
        hits = torch.sub(x, value, out=scratch).abs_().sign_()  # 0 exactly where x == value
        hits = torch.addcmul(w, hits, w, value=-1, out=hits)  # w there, 0 elsewhere
        top = hits.amax(dim).nan_to_num_(nan=0.0).long()
    else:
        # uint8 weights multiply the bool hits bytes as they are (an int16 product first
        # converts the bools: 5x the time)
        wdt = torch.uint8 if h < 256 else torch.int32
        w = torch.arange(h, 0, -1, dtype=wdt, device=x.device).view(shape)
        eq, wt = (None, None) if scratch is None else scratch
        hits = torch.eq(x, value, out=eq)
        hits = torch.mul(hits.view(torch.uint8) if wdt == torch.uint8 else hits, w, out=wt)
        top = hits.amax(dim).long()
    # NaN rows match nowhere (top = 0, first = h): kept in range, as argmax stays in range
    return (h - top).clamp_(max=h - 1) + h * neg.squeeze(dim)


def bucket_sort_keys(buckets: torch.Tensor, seqlen: int) -> torch.Tensor:
    """Trax's sort key ``buckets_and_t = seqlen * bucket + (t % seqlen)`` for
    ``buckets [..., n_hashes * seqlen]`` (long, same shape): by bucket, then position."""
    ticker = torch.arange(buckets.shape[-1], device=buckets.device)
    return seqlen * buckets.long() + ticker % seqlen


def sort_buckets(buckets: torch.Tensor, seqlen: int):
    """Sort the ``n_hashes * seqlen`` entries by (bucket, position).

    Args:
        buckets: ``[..., n_hashes * seqlen]`` from :func:`hash_vectors` (offsets included).

    Returns:
        ``(sticker, undo_sort)``, long ``[..., n_hashes * seqlen]`` each: ``sticker[s]`` is
        the entry (``r * seqlen + t``) at sorted slot ``s`` (so ``sticker % seqlen`` is
        its original position) and ``undo_sort`` the inverse permutation
        (``x_sorted.gather(undo_sort) == x``).
    """
    sticker = sorted_entries(buckets, seqlen)
    ticker = torch.arange(sticker.shape[-1], device=sticker.device).expand_as(sticker)
    undo_sort = torch.empty_like(sticker).scatter_(-1, sticker, ticker)
    return sticker, undo_sort


def sorted_entries(buckets: torch.Tensor, seqlen: int) -> torch.Tensor:
    """:func:`sort_buckets`' ``sticker`` alone: long ``[..., n_hashes * seqlen]``, the entry
    at each sorted slot of every row (``buckets [..., n_hashes * seqlen]``)."""
    keys = bucket_sort_keys(buckets, seqlen)
    lead, L = keys.shape[:-1], keys.shape[-1]
    rows = math.prod(lead)
    # one 1-D sort of every row's keys, each row offset past the previous one's: torch sorts
    # a 1-D integer tensor with a radix sort (N = 2,048, 4 heads x 4 rounds: 0.4 ms
    # instead of 1.5 for the row-wise sort)
    span = int(keys.max()) + 1 if keys.numel() else 1
    row = torch.arange(rows, device=keys.device).view(rows, 1)
    flat_keys = (keys.reshape(rows, L) + row * span).view(-1)
    if rows * span <= torch.iinfo(torch.int32).max:  # int32 radix sort: half the passes
        flat_keys = flat_keys.int()  # (N = 16,384, 4 heads x 4 rounds: 1.8 vs 3.2 ms)
    _, flat = torch.sort(flat_keys, stable=True)
    return (flat.view(rows, L) - row * L).view(*lead, L)


# ---------------------------------------------------------------- chunked attention


def chunk_layout(n_chunks: int, n_chunks_before: int, n_chunks_after: int,
                 first: int = 0, count: Optional[int] = None, device=None):
    """Cyclic chunk windows (Trax's ``look_adjacent``) for query chunks
    ``first .. first + count - 1`` of a sorted sequence of ``n_chunks`` chunks.

    Returns ``(global_ids, kv_blocks)``: ``global_ids`` long ``[W]``, the chunk ids of the
    key window ``first - n_chunks_before .. first + count - 1 + n_chunks_after`` (mod
    ``n_chunks``); ``kv_blocks`` long ``[count, S]`` (``S = 1 + before + after``), for each
    query chunk its own chunk then ``before`` previous then ``after`` next chunks as
    indices into that window, ``-1`` where the slot repeats a chunk already listed.
    """
    count = n_chunks if count is None else count
    W = count + n_chunks_before + n_chunks_after
    global_ids = (first - n_chunks_before + torch.arange(W, device=device)) % n_chunks
    offs = [0] + [-o for o in range(1, n_chunks_before + 1)] + list(range(1, n_chunks_after + 1))
    offs_t = torch.tensor(offs, device=device)
    j = torch.arange(count, device=device)[:, None]
    local = j + n_chunks_before + offs_t  # [count, S]
    gid = (first + j + offs_t) % n_chunks
    dup = (gid[:, :, None] == gid[:, None, :]).tril(-1).any(-1)  # repeats an earlier slot
    return global_ids, torch.where(dup, torch.full_like(local, -1), local)


@dataclasses.dataclass
class _Sorted:
    """The sorted geometry of one LSH call (everything but the differentiable tensors)."""

    q_pos: torch.Tensor  # [B|1, H|1, R * seqlen] original position of each sorted query slot
    k_pos: torch.Tensor  # same for keys (the same tensor for shared-QK)
    seqlen: int
    chunk_len: int
    n_rounds: int
    n_chunks_before: int
    n_chunks_after: int
    scale: float
    causal: bool
    exclude_self: bool
    k_valid: Optional[torch.Tensor]  # [B|1, 1|H, seqlen] bool or None
    group: int  # chunks per gathered group
    rows: Optional["_WindowRows"] = dataclasses.field(default=None, init=False)

    @property
    def n_slots(self) -> int:
        """Chunks in one query chunk's window (``1 + before + after``)."""
        return 1 + self.n_chunks_before + self.n_chunks_after

    @property
    def n_chunks(self) -> int:
        return self.n_rounds * self.seqlen // self.chunk_len

    @property
    def banded(self) -> bool:
        """Whether groups run as bands of the gathered key window (every window chunk
        distinct); else (fewer chunks than window slots) through the engine's layout, which
        lists a repeated chunk once."""
        return self.n_chunks >= self.n_slots

    def cross_round(self, first: int, count: int):
        """``(j, t)`` pairs where band slot ``t`` of query chunk ``first + j`` holds a chunk
        of another round: the only chunks besides its own that can hold a query's own token
        (shared-QK), as a token appears once per round."""
        cpr = self.seqlen // self.chunk_len
        r, c0 = divmod(first, cpr)
        for t in range(self.n_slots):
            o = t - self.n_chunks_before
            if o == 0:
                continue
            js = range(0, min(count, -o - c0)) if o < 0 else range(max(0, cpr - o - c0), count)
            for j in js:
                if ((first + j + o) % self.n_chunks) // cpr != r:
                    yield j, t

    def groups(self, round: Optional[int] = None):
        """``(round, first chunk, chunk count)`` of every group (of round ``round`` only,
        when given); a group never spans two rounds, so each token appears at most once in
        it."""
        cpr = self.seqlen // self.chunk_len
        for r in range(self.n_rounds) if round is None else (round,):
            for c in range(0, cpr, self.group):
                yield r, r * cpr + c, min(self.group, cpr - c)

    def layout(self, first: int, count: int, device):
        """Rows of chunks ``first .. first + count - 1``: ``(q_pos [.., count*c], k_pos
        [.., W*c], k_valid [.., W*c] | None, kv_blocks [1, 1, count, S])`` — the query
        rows' and key window's original positions, and the window slots (local)."""
        C = self.chunk_len
        n_chunks = self.n_rounds * self.seqlen // C
        gids, kv_blocks = chunk_layout(n_chunks, self.n_chunks_before, self.n_chunks_after,
                                       first=first, count=count, device=device)
        krow = (gids[:, None] * C + torch.arange(C, device=device)).reshape(-1)
        q_pos = self.q_pos[..., first * C:(first + count) * C]
        k_pos = self.k_pos[..., krow]
        kv = None if self.k_valid is None else torch.gather(
            self.k_valid.expand(*k_pos.shape[:2], self.seqlen), 2, k_pos)
        return q_pos, k_pos, kv, kv_blocks[None, None]

    def window(self, first: int, count: int, B: int, H: int, ws: Workspace) -> "_Group":
        """The banded layout of chunks ``first .. first + count - 1`` for every (batch,
        head) at once (:class:`_Group`), built from slices of per-call tables
        (:class:`_WindowRows`, cyclic wrap included) into workspace buffers."""
        if self.rows is None:
            self.rows = _WindowRows.build(self, B, H)
        t, C, S = self.rows, self.chunk_len, self.n_slots
        BH, W = B * H, count + S - 1
        a, b = first * C, (first + count) * C
        wb = b + (S - 1) * C  # the key window: extended rows a .. wb

        def virtual(name, src, junk):
            # [BH, W*C]: each (batch, head)'s count*C query rows, then (S-1)*C junk rows
            buf = ws.get(name, (BH, W * C), src)
            buf[:, :count * C].copy_(src[..., a:b].reshape(BH, count * C))
            buf[:, count * C:].fill_(junk)
            return buf.view(-1)

        def padded(name, src, pad):
            # [BH*W*C + (S-1)*C]: the key windows end to end, then (S-1)*C pad rows
            buf = ws.get(name, (BH * W * C + (S - 1) * C,), src)
            buf[:BH * W * C].view(BH, W * C).copy_(src[..., a:wb].reshape(BH, W * C))
            buf[BH * W * C:].fill_(pad)
            return buf

        masks = self.causal or self.exclude_self or t.k_valid is not None
        return _Group(
            U=BH * W, count=count,
            q_idx=virtual("q_idx", t.q_rows, 0),
            rows=virtual("rows", t.q_rows, BH * self.seqlen),
            k_rows=t.k_rows[..., a:wb].reshape(-1),
            q_pos=virtual("q_pos", self.q_pos.expand(B, H, -1), -1).view(BH * W, C, 1) if masks else None,
            k_pos=padded("k_pos", t.k_pos.expand(B, H, -1), -2) if masks else None,
            k_valid=None if t.k_valid is None else padded("k_valid", t.k_valid.expand(B, H, -1), False))

    def engine_args(self, q_pos, k_pos, kv):
        return dict(block_q=self.chunk_len, block_k=self.chunk_len, scale=self.scale,
                    causal=self.causal, exclude_self=self.exclude_self, q_pos=q_pos,
                    k_pos=k_pos, k_valid=kv)


@dataclasses.dataclass
class _WindowRows:
    """Per-call index tables of the banded groups (:meth:`_Sorted.window` slices them).

    ``q_rows [B, H, L]``: flat row (``(b*H + h) * seqlen + position``) of each sorted query
    slot; ``k_pos``, ``k_rows``, ``k_valid`` ``[.., before*C + L + after*C]``: the sorted
    keys' positions, flat rows and validity, extended cyclically by ``before`` chunks in
    front (the sequence's last) and ``after`` behind (its first), so that every group's key
    window — Trax's cyclic ``look_adjacent`` — is one contiguous slice."""

    q_rows: torch.Tensor
    k_pos: torch.Tensor
    k_rows: torch.Tensor
    k_valid: Optional[torch.Tensor]

    @classmethod
    def build(cls, g: _Sorted, B: int, H: int) -> "_WindowRows":
        C, L = g.chunk_len, g.q_pos.shape[-1]
        before, after = g.n_chunks_before * C, g.n_chunks_after * C

        def ext(x):
            return torch.cat([x[..., L - before:], x, x[..., :after]], -1)

        base = (torch.arange(B * H, device=g.q_pos.device) * g.seqlen).view(B, H, 1)
        q_rows = g.q_pos + base
        k_pos = ext(g.k_pos)
        k_rows = ext(q_rows) if g.k_pos is g.q_pos else k_pos + base
        kv = None if g.k_valid is None else torch.gather(
            g.k_valid.expand(*k_pos.shape[:2], g.seqlen), 2, k_pos)
        return cls(q_rows, k_pos, k_rows, kv)


@dataclasses.dataclass
class _Group:
    """One group of sorted chunks laid out for single batched matmuls over every (batch,
    head): each (b, h)'s ``count`` query chunks are followed by ``S - 1`` junk chunks, so
    that with ``W = count + S - 1`` its query chunk ``j`` is virtual chunk ``u = bh*W + j``
    and that chunk's keys are rows ``u*C .. (u+S)*C`` of the key windows laid end to end —
    one overlapping strided view for all heads (:func:`_band`).  Junk chunks read real
    query rows and the next head's (or pad) keys; their results go to a spare row."""

    U: int  # virtual chunks (B*H*W)
    count: int  # real query chunks per (batch, head)
    q_idx: torch.Tensor  # [U*C] flat source row of each virtual query row (junk: row 0)
    rows: torch.Tensor  # [U*C] flat result row of each virtual query row (junk: spare row B*H*n)
    k_rows: torch.Tensor  # [B*H*W*C] flat source rows of the key windows
    q_pos: Optional[torch.Tensor]  # [U, C, 1] original positions (junk: -1), when masking
    k_pos: Optional[torch.Tensor]  # [(U + S - 1) * C] window positions (pad: -2), when masking
    k_valid: Optional[torch.Tensor]  # like k_pos, bool (pad: False), with padding


def _gather_rows(x: torch.Tensor, rows: torch.Tensor, ws: Workspace, name: str,
                 pad: int = 0) -> torch.Tensor:
    """Rows ``rows [L]`` (flat indices) of ``x [B, H, n, F]`` (contiguous) -> ``[L + pad, F]``
    in the workspace buffer ``name``, the ``pad`` trailing rows zero."""
    Fx = x.shape[-1]
    out = ws.get(name, (rows.shape[0] + pad, Fx), x)
    torch.index_select(x.view(-1, Fx), 0, rows, out=out[:rows.shape[0]])
    out[rows.shape[0]:].zero_()
    return out


def _group_queries_keys(g: _Sorted, grp: _Group, q, k, ws: Workspace, factor: float = 1.0):
    """A banded group's query rows ``qv [U*C, D]`` (virtual layout) scaled by ``scale *
    factor`` and key window ``kw [(U + S - 1) * C, D]`` (pad rows zero), from ``q, k [B, H,
    seqlen, D]``.  Shared-QK
    keys are gathered like the queries (deriving them from the gathered window's query rows,
    one gather fewer, measured 0.95x as fast forward at N = 2,048 and 16,384, equal in
    training)."""
    pad = (g.n_slots - 1) * g.chunk_len
    return (_gather_rows(q, grp.q_idx, ws, "q").mul_(g.scale * factor),
            _gather_rows(k, grp.k_rows, ws, "k", pad))


def _band(x: torch.Tensor, U: int, S: int, C: int) -> torch.Tensor:
    """Overlapping view of window rows, no copy: ``x [(U + S - 1) * C, *F]`` (contiguous)
    -> ``[U, S * C, *F]`` whose entry ``u`` is rows ``u * C .. (u + S) * C - 1`` — virtual
    query chunk ``u``'s ``S`` key chunks."""
    row = x.stride(0)
    return x.as_strided((U, S * C, *x.shape[1:]), (C * row, row, *x.stride()[1:]),
                        x.storage_offset())


def _unband(t: torch.Tensor, S: int, C: int, ws: Workspace, name: str) -> torch.Tensor:
    """Adjoint of :func:`_band`: ``t [U, S * C, F]`` summed back onto window rows
    ``[(U + S - 1) * C, F]`` (the workspace buffer ``name``)."""
    U, _, Fx = t.shape
    w = ws.get(name, ((U + S - 1) * C, Fx), t).zero_()
    for s in range(S):  # for a fixed slot the chunks' rows do not overlap: one strided add
        w[s * C:(s + U) * C].view(U, C, Fx).add_(t[:, s * C:(s + 1) * C])
    return w


def _band_scores(g: _Sorted, first: int, grp: _Group, qv, kw, ws: Workspace):
    """Masked scores ``[U, C, S*C]`` (statistics dtype) of the group's virtual query chunks
    (``qv [U*C, D]``, already scaled) against their bands of the key windows ``kw
    [(U + S - 1) * C, D]``, in base-2 units (``qv`` carries ``log2 e``: exp2 then needs no
    scaling pass over the scores; the self-pair penalty is scaled alike)."""
    penalty = SELF_PENALTY * LOG2_E
    C, S = g.chunk_len, g.n_slots
    s = torch.bmm(qv.view(grp.U, C, -1), _band(kw, grp.U, S, C).transpose(1, 2),
                  out=ws.get("scores", (grp.U, C, S * C), qv))
    s = s.to(stat_dtype(s.dtype))
    if grp.q_pos is None:
        return s
    qp, kp = grp.q_pos, _band(grp.k_pos, grp.U, S, C)[:, None, :]  # [U, C, 1], [U, 1, S*C]
    if g.exclude_self and g.k_pos is g.q_pos:
        # one sort for queries and keys: a query meets its own key on the diagonal of its
        # own chunk, and again only in a chunk of another round
        own = s[..., g.n_chunks_before * C:(g.n_chunks_before + 1) * C]
        own.diagonal(dim1=-2, dim2=-1).sub_(penalty)
        sv = s.view(-1, grp.count + S - 1, C, S * C)  # [BH, W, C, S*C]
        qpv = qp.view(sv.shape[0], -1, C, 1)
        kpv = kp.view(sv.shape[0], -1, 1, S * C)
        for j, t in g.cross_round(first, grp.count):
            cols = slice(t * C, (t + 1) * C)
            sv[:, j, :, cols].sub_(self_pairs(qpv[:, j], kpv[:, j, :, cols], s.dtype),
                                   alpha=penalty)
    elif g.exclude_self:
        s.sub_(self_pairs(qp, kp, s.dtype), alpha=penalty)
    if g.causal or grp.k_valid is not None:
        apply_masks(s, qp, kp, causal=g.causal, exclude_self=False, inplace=True,
                    k_valid=None if grp.k_valid is None else _band(grp.k_valid, grp.U, S, C)[:, None, :])
    return s


def _group_forward(g: _Sorted, q, k, v, first: int, count: int, ws: Workspace):
    """One group of sorted chunks forward: ``(rows [L], out [L, Dv], lse [L])`` — flat result
    rows (into a ``[B*H*seqlen + 1, ·]`` view whose last row is the spare row junk goes to)
    and the results (``out`` lives in the workspace until the next group)."""
    B, H, n, _ = q.shape
    if not g.banded:
        q_pos, k_pos, kv, blocks = g.layout(first, count, q.device)
        og, lg = block_sparse_forward(take_rows(q, q_pos), take_rows(k, k_pos),
                                      take_rows(v, k_pos), blocks, **g.engine_args(q_pos, k_pos, kv))
        return flat_rows(q_pos, B, H, n), og.reshape(-1, og.shape[-1]), lg.reshape(-1)
    C, S = g.chunk_len, g.n_slots
    grp = g.window(first, count, B, H, ws)
    pad = (S - 1) * C
    qv, kw = _group_queries_keys(g, grp, q, k, ws, LOG2_E)
    vw = _gather_rows(v, grp.k_rows, ws, "v", pad)
    w, lg, inv = softmax_weights_(_band_scores(g, first, grp, qv, kw, ws), base2=True)
    og = torch.bmm(w.to(vw.dtype), _band(vw, grp.U, S, C),
                   out=ws.get("out", (grp.U, C, vw.shape[-1]), w)).mul_(inv)
    return grp.rows, og.view(grp.U * C, -1), lg.view(-1)


def _group_backward(g: _Sorted, q, k, v, out, lse_s, delta, dout, dlse, first: int, count: int,
                    ws: Workspace):
    """One group's share of the gradients: ``(q_rows, dq rows [L, D], k_rows, dk rows
    [M, D], dv rows [M, Dv])`` (statistics dtype) to add at flat query rows (into a
    ``[B*H*seqlen + 1, ·]`` view, last row spare) and key rows (``[B*H*seqlen, ·]``).
    ``lse_s``: merged lse with empty rows at 0 (:func:`safe_lse`); ``delta``:
    ``rowsum(dout * out) - dlse`` ``[B, H, seqlen]``."""
    B, H, n, _ = q.shape
    if not g.banded:
        q_pos, k_pos, kv, blocks = g.layout(first, count, q.device)
        rows = q_pos.expand(B, H, q_pos.shape[-1])
        dlg = None if dlse is None else torch.gather(dlse, 2, rows)
        gq, gk, gv = block_sparse_backward(
            take_rows(q, q_pos), take_rows(k, k_pos), take_rows(v, k_pos),
            take_rows(out, q_pos), torch.gather(lse_s, 2, rows), take_rows(dout, q_pos), dlg,
            blocks, **g.engine_args(q_pos, k_pos, kv))
        return (flat_rows(q_pos, B, H, n), gq.reshape(-1, gq.shape[-1]), flat_rows(k_pos, B, H, n),
                gk.reshape(-1, gk.shape[-1]), gv.reshape(-1, gv.shape[-1]))
    C, S = g.chunk_len, g.n_slots
    grp = g.window(first, count, B, H, ws)
    pad, U = (S - 1) * C, grp.U
    # the forward's base-2 query rows (the same rounding: P consistent with the lse), and the
    # natural ones for the key gradients
    qs, kw = _group_queries_keys(g, grp, q, k, ws, LOG2_E)
    qv = torch.mul(qs, LN_2, out=ws.get("q_natural", qs.shape, qs))
    vw = _gather_rows(v, grp.k_rows, ws, "v", pad)
    pr = _band_scores(g, first, grp, qs, kw, ws)
    pr = pr.sub_(lse_s.view(-1).index_select(0, grp.q_idx).view(U, C, 1).mul_(LOG2_E)).exp2_()
    pr.view(-1, count + S - 1, C, S * C)[:, count:].zero_()  # junk chunks add nothing
    dot = _gather_rows(dout, grp.q_idx, ws, "dout").to(vw.dtype).view(U, C, -1)
    dq, dkt, dvt = tile_gradients(pr, qv.view(U, C, -1), _band(kw, U, S, C), _band(vw, U, S, C),
                                  dot, delta.view(-1).index_select(0, grp.q_idx).view(U, C, 1),
                                  ws, ("tile_dv", "tile_ds", "tile_dk", "tile_dq"))
    m = kw.shape[0] - pad
    return (grp.rows, dq.mul_(g.scale).view(U * C, -1), grp.k_rows,
            _unband(dkt.to(dq.dtype), S, C, ws, "dk")[:m], _unband(dvt.to(dq.dtype), S, C, ws, "dv")[:m])


#: rows of a round's result gathered back into token order and merged at a time (2 MB of
#: 64-wide float32 rows: the gathered slice stays in cache for the merge)
MERGE_ROWS = 8192


def _round_inverse(g: _Sorted, r: int, B: int, H: int) -> torch.Tensor:
    """Flat rows ``[B*H*seqlen]`` into a ``[B*H*seqlen, ·]`` view of round ``r``'s results in
    sorted order that put them back in token order (the inverse of the round's sort)."""
    n = g.seqlen
    pos = g.q_pos[..., r * n:(r + 1) * n]
    slots = torch.arange(n, device=pos.device).expand_as(pos)
    return flat_rows(torch.empty_like(pos).scatter_(-1, pos, slots), B, H, n)


def _native_rounds(g: _Sorted, q, k, v, out: torch.Tensor, lse: torch.Tensor) -> bool:
    """Every round's sorted chunks forward through the fused native kernel
    (:func:`effattn.native.lsh_chunks`: the scores, masks and base-2 softmax of
    :func:`_group_forward` without gathered copies, each row written to its token's row
    of ``out [B, H, seqlen, Dv]`` and ``lse [B, H, seqlen]``, later rounds merged there);
    False where it does not serve (then nothing is written)."""
    if not (USE_NATIVE_CHUNKS and g.banded):
        return False
    cpr = g.seqlen // g.chunk_len
    for r in range(g.n_rounds):
        if not native.lsh_chunks(
                q, k, v, g.q_pos, g.k_pos, g.k_valid, chunk_len=g.chunk_len,
                before=g.n_chunks_before, after=g.n_chunks_after, qscale=g.scale * LOG2_E,
                exclude_self=g.exclude_self, penalty=SELF_PENALTY * LOG2_E, causal=g.causal,
                first=r * cpr, count=cpr, out=out, lse=lse, merge=r > 0):
            assert r == 0, "the kernel serves every round or none"
            return False
    return True


def _native_backward(g: _Sorted, q, k, v, lse_s, delta, dout, dq, dk, dv) -> bool:
    """Every round's sorted chunks backward through the fused native kernel
    (:func:`effattn.native.lsh_chunks_backward`: :func:`_group_backward`'s recomputed
    scores, masks and tile gradients without gathered copies, added to the tokens' rows of
    the zero ``dq, dk, dv``); False where it does not serve (then nothing is written)."""
    if not (USE_NATIVE_CHUNKS and g.banded):
        return False
    lse2 = (lse_s * LOG2_E).contiguous()
    return native.lsh_chunks_backward(
        q, k, v, g.q_pos, g.k_pos, g.k_valid, lse2, delta.contiguous(), dout, chunk_len=g.chunk_len,
        before=g.n_chunks_before, after=g.n_chunks_after, qscale=g.scale * LOG2_E, scale=g.scale,
        exclude_self=g.exclude_self, penalty=SELF_PENALTY * LOG2_E, causal=g.causal,
        dq=dq, dk=dk, dv=dv)


#: run the sorted chunks' forward and backward through the native kernels where they serve
USE_NATIVE_CHUNKS = True


def _stream_forward(g: _Sorted, q, k, v, keep_rounds: bool = False):
    """Every group of sorted chunks (:func:`_group_forward`), merged per token round by round.

    ``q, k [B, H, seqlen, D]``, ``v [B, H, seqlen, Dv]`` (compute dtype, original order).
    Returns ``(out [B, H, seqlen, Dv], lse [B, H, seqlen], rounds)``: the merged result and
    (``keep_rounds``) each round's ``(out, lse)``.  A round's groups write their rows in
    sorted order (contiguous copies) into round-sized buffers the thread keeps; gathers
    put the round back in token order, merged slice by slice (:data:`MERGE_ROWS`; scattering
    each group's rows into token order instead: ``index_copy_`` ran at a third of
    ``index_select``'s speed here, 16 of 156 ms at N = 16,384)."""
    B, H, n, _ = q.shape
    BH, Dv, C = B * H, v.shape[-1], g.chunk_len
    cdt = stat_dtype(v.dtype)  # results and merges in the statistics dtype (bf16 inputs too)
    ws = kept_workspace("lsh", v.device)
    out = pooled_empty((B, H, n, Dv), cdt, v.device)
    lse = pooled_empty((B, H, n), cdt, v.device)
    rounds = []
    if not keep_rounds and _native_rounds(g, q, k, v, out, lse):
        return out, lse, rounds
    sorted_out = ws.get("round_out", (BH, n, Dv), out)
    sorted_lse = ws.get("round_lse", (BH, n), lse)
    cpr = n // C
    for r in range(g.n_rounds):
        for _, first, count in g.groups(r):
            _, og, lg = _group_forward(g, q, k, v, first, count, ws)
            a, m = (first - r * cpr) * C, count * C  # the group's slots in the round
            sorted_out[:, a:a + m] = og.view(BH, -1, Dv)[:, :m]
            sorted_lse[:, a:a + m] = lg.view(BH, -1)[:, :m]
        back = _round_inverse(g, r, B, H)
        if keep_rounds or r == 0:  # gathered straight into result tensors
            ro, rl = (torch.empty_like(out), torch.empty_like(lse)) if keep_rounds else (out, lse)
            torch.index_select(sorted_out.view(-1, Dv), 0, back, out=ro.view(-1, Dv))
            torch.index_select(sorted_lse.view(-1), 0, back, out=rl.view(-1))
            if keep_rounds:
                rounds.append((ro, rl))
            continue
        # merged in slices of rows gathered into a cache-sized buffer
        out_f, lse_f = out.view(-1, Dv), lse.view(-1)
        for i in range(0, back.shape[0], MERGE_ROWS):
            idx = back[i:i + MERGE_ROWS]
            ro = torch.index_select(sorted_out.view(-1, Dv), 0, idx,
                                    out=ws.get("merge_out", (idx.shape[0], Dv), out))
            rl = torch.index_select(sorted_lse.view(-1), 0, idx,
                                    out=ws.get("merge_lse", idx.shape, lse))
            merge_pair_(out_f[i:i + MERGE_ROWS], lse_f[i:i + MERGE_ROWS], ro, rl)
    if keep_rounds:
        out, lse = merge_partials(torch.stack([o for o, _ in rounds], 2),
                                  torch.stack([l for _, l in rounds], 2), dim=2)
    return out, lse, rounds


def _stream_backward(g: _Sorted, q, k, v, out, lse, dout, dlse):
    """Gradients of :func:`_stream_forward`'s merged ``(out, lse)``: through the fused
    native kernel where it serves (:func:`_native_backward`), else each group's share
    (:func:`_group_backward`) with the merged statistics, scattered back to token order.
    Recomputes every sorted copy; nothing of the forward is kept but ``q, k, v, out, lse``."""
    B, H, n, D = q.shape
    Dv = v.shape[-1]
    dout = dout.contiguous()
    cdt = stat_dtype(q.dtype)
    # dq a tensor of its own, not a view: autograd then adds another gradient of q (the
    # shared-QK keys') into it in place instead of into a fresh N x D sum (3-4 ms at 16K)
    dq, dk, dv = (pooled_zeros(t.shape, cdt, t.device) for t in (q, k, v))
    lse_s = safe_lse(lse.to(cdt))
    delta = output_delta(dout, out, dlse)
    if _native_backward(g, q, k, v, lse_s, delta, dout, dq, dk, dv):
        return dq, dk, dv
    dq_f = torch.zeros(B * H * n + 1, D, dtype=cdt, device=q.device)  # + the spare row
    dq, dk_f, dv_f = dq_f[:-1].view(B, H, n, D), dk.view(-1, D), dv.view(-1, Dv)
    ws = kept_workspace("lsh", q.device)
    for _, first, count in g.groups():
        qrows, gq, krows, gk, gv = _group_backward(g, q, k, v, out, lse_s, delta, dout, dlse,
                                                   first, count, ws)
        dq_f.index_add_(0, qrows, gq.to(cdt))
        dk_f.index_add_(0, krows, gk.to(cdt))
        dv_f.index_add_(0, krows, gv.to(cdt))
    return dq, dk, dv


def sorted_chunk_attention(q, k, v, q_buckets, k_buckets=None, *, seqlen: int, chunk_len: int,
                           n_chunks_before: int, n_chunks_after: int, scale: float,
                           causal: bool = False, exclude_self: bool = False,
                           k_valid: Optional[torch.Tensor] = None, keep_rounds: bool = False):
    """LSH chunked attention over the sorted rounds, merged over rounds.

    The sorted sequence is processed in groups of chunks sized by
    :data:`GROUP_GATHER_BYTES` (each group gathers its query rows and key window, attends
    each chunk to its band of the window (:func:`_group_forward`); each round's rows are
    folded into the per-token result with the log-sum-exp merge, :func:`_stream_forward`),
    and the backward recomputes group by group: memory is ``O(N·D)`` plus one group,
    forward and backward.

    Args:
        q: ``[B, H, seqlen, D]``; k: ``[B, H, seqlen, D]``; v: ``[B, H, seqlen, Dv]``
            (``seqlen`` tokens in their original order; computed in their dtype).
        q_buckets: long ``[B|1, H|1, n_hashes * seqlen]`` (:func:`hash_vectors`).
        k_buckets: the keys' buckets, or ``None`` when keys are sorted like the queries
            (shared-QK).
        seqlen, chunk_len: ``n_hashes * seqlen`` must be a multiple of ``chunk_len``.
        n_chunks_before / n_chunks_after: the cyclic window (:func:`chunk_layout`).
        scale, causal, exclude_self: as in the block-sparse engine; masks use original
            positions.  k_valid: bool ``[B|1, 1|H, seqlen]`` (False = padding key) or None.
        keep_rounds: also return every round's result (costs ``n_hashes`` copies; no
            gradient through them).

    Returns:
        ``(out [B, H, seqlen, Dv], lse [B, H, seqlen], rounds)``: the merged result and,
        with ``keep_rounds``, a list of each round's ``(out [B, H, seqlen, Dv],
        lse [B, H, seqlen])`` in original order (else an empty list).
    """
    L = q_buckets.shape[-1]
    if L % seqlen:
        raise ValueError(f"q_buckets: length {L} is not a multiple of seqlen={seqlen}")
    R = L // seqlen
    if seqlen % chunk_len:
        raise ValueError(f"chunk_len: seqlen={seqlen} must be a multiple of chunk_len={chunk_len}")
    q_pos = sorted_entries(q_buckets, seqlen) % seqlen
    k_pos = q_pos if k_buckets is None else sorted_entries(k_buckets, seqlen) % seqlen
    B, H = q.shape[:2]
    row_bytes = B * H * (q.shape[-1] + v.shape[-1]) * q.element_size()
    per_chunk = chunk_len * row_bytes * (2 + n_chunks_before + n_chunks_after + 1)
    group = max(1, min(seqlen // chunk_len, GROUP_GATHER_BYTES // max(1, per_chunk)))
    geo = _Sorted(q_pos, k_pos, seqlen, chunk_len, R, n_chunks_before, n_chunks_after,
                  float(scale), causal, exclude_self, k_valid, group)
    BACKEND_CALLS["engine"] += 1
    # contiguous once: every group gathers rows from flat views of them
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, lse = RecomputedAttention.apply(q, k, v, lambda q, k, v: _stream_forward(geo, q, k, v)[:2],
                                         functools.partial(_stream_backward, geo))
    rounds = []
    if keep_rounds:
        with torch.no_grad():
            rounds = _stream_forward(geo, q, k, v, keep_rounds=True)[2]
    return out, lse, rounds


# ---------------------------------------------------------------- the method


def lsh_attention(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk,
                  n_hashes=None, n_buckets=None, chunk_len=64, n_chunks_before=1,
                  n_chunks_after=0, rotations=None, seed=None):
    """Reformer LSH attention (see the module docstring for the algorithm and its masks).

    ``q [B,H,N,D]``, ``k [B,H,N,D]`` (for shared-QK: the RMS-normalized queries, built by
    the api; hashing then uses ``q``), ``v [B,H,N,Dv]`` -> ``(out [B,H,N,Dv]``,
    ``lse [B,H,N]`` merged over rounds, or None).  Options: ``n_hashes`` (default 2),
    ``n_buckets`` (even; default ``ceil(N / chunk_len)`` rounded up to even),
    ``chunk_len`` (64), ``n_chunks_before`` (1), ``n_chunks_after`` (0), and one of
    ``rotations`` (tensor ``[D, n_hashes, n_buckets//2]`` or per head
    ``[H, D, n_hashes, n_buckets//2]``) / ``seed`` (int; default 0).
    """
    N = check_same_length(q, k, "lsh")
    B, H, _, D = q.shape
    rot, n_hashes, n_buckets = resolve_options(
        D, H, N, n_hashes=n_hashes, n_buckets=n_buckets, chunk_len=chunk_len,
        n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after, rotations=rotations,
        seed=seed, device=q.device)
    # computed in the statistics dtype: with bf16 matmuls the sorted groups' small products
    # gain less than the casts cost (measured fwd+bwd 0.8x of float32 at N = 16,384)
    cdt = stat_dtype(q.dtype)
    Np = -(-N // chunk_len) * chunk_len
    extra = Np - N
    valid = None
    if padding_mask is not None or extra:
        valid = padding_mask if padding_mask is not None else torch.ones(
            1, N, dtype=torch.bool, device=q.device)
        valid = F.pad(valid, (0, extra), value=False)[:, None, :]  # [B|1, 1, Np]

    def pad(x):
        return F.pad(x.to(cdt), (0, 0, 0, extra)) if extra else x.to(cdt)

    qc, kc, vc = pad(q), pad(k), pad(v)
    q_buckets = hash_vectors(qc, rot, n_buckets, valid)
    k_buckets = None if shared_qk else hash_vectors(kc, rot, n_buckets, valid)
    out, lse, _ = sorted_chunk_attention(
        qc, kc, vc, q_buckets, k_buckets, seqlen=Np, chunk_len=chunk_len,
        n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after, scale=scale,
        causal=causal, exclude_self=shared_qk, k_valid=valid)
    out = out[:, :, :N].to(q.dtype)
    return out, (lse[:, :, :N] if return_lse else None)


def lsh_flops(B, H, Nq, Nk, D, Dv, causal=False, n_hashes=None, n_buckets=None, chunk_len=64,
              n_chunks_before=1, n_chunks_after=0, rotations=None, seed=None, **_):
    """Forward multiply-adds x 2: hashing the queries (``N·D·n_hashes·n_buckets/2``) plus the
    engine's ``QK^T`` and ``PV`` over ``n_hashes·N_pad`` rows x ``S·chunk_len`` keys
    (``S = min(1 + before + after, number of chunks)`` distinct window chunks)."""
    if rotations is not None:
        n_hashes, n_buckets = rotations.shape[-2], 2 * rotations.shape[-1]
    n_hashes = DEFAULT_N_HASHES if n_hashes is None else n_hashes
    n_buckets = default_n_buckets(Nq, chunk_len) if n_buckets is None else n_buckets
    Np = -(-Nq // chunk_len) * chunk_len
    n_chunks = n_hashes * Np // chunk_len
    S = min(1 + n_chunks_before + n_chunks_after, n_chunks)
    hashing = 2.0 * B * H * Nq * D * n_hashes * (n_buckets // 2)
    engine = 2.0 * B * H * (n_hashes * Np) * (S * chunk_len) * (D + Dv)
    return hashing + engine


register(
    "lsh", exact=False, causal=True,
    time="O(h·N·(b/2 + c·(1+nb+na))·D + h·N·log(h·N)); b ≈ N/c by default",
    memory="O(N·(D+Dv) + h·N) (sorted groups of chunks streamed, backward recomputes)",
    flops=lsh_flops,
    flops_formula="2·B·H·(h·N·D·b/2 + h·N_c·S·c·(D+Dv)), h=n_hashes, b=n_buckets, c=chunk_len, "
                  "N_c = N rounded up to c, S = min(1+nb+na, h·N_c/c) (x2 hashing with separate keys)",
    options=dict(LSH_OPTIONS), family="lsh", random=True,
    description="Reformer LSH attention (Trax 1.3.4): angular hash, sort by bucket, "
                "chunked attention over own + adjacent chunks, rounds merged on their lse",
)(lsh_attention)
