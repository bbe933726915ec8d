"""Exact softmax attention where one side is short: Nyströmformer's two long products.

- :func:`queries_over_landmarks`: ``N`` queries over ``L`` landmark keys (``L`` small).
  Query chunks of about :data:`CHUNK_SCORES` scores: each chunk's ``[r, L]`` scores, their
  fused softmax and the product with the values, in reused buffers; the backward
  recomputes each chunk's probabilities (nothing ``N``-sized is kept but ``q``).
- :func:`landmarks_over_keys`: ``L`` landmark queries over ``N`` keys.  The ``[L, N]``
  probabilities — as large as ``k`` when ``L = D`` — are kept for the backward (one fused
  softmax over long rows, no recomputation).

Both are autograd Functions with the backward written out (``dV = P^T dO``, ``dP = dO
V^T``, ``dS = P * (dP - rowsum(dP * P))`` through torch's fused softmax backward, ``dQ = s
dS K``, ``dK = s dS^T Q``) that hand back fresh contiguous gradients.  For float32 on the
CPU (``L``, ``D``, ``Dv`` multiples of the vector width) both directions run on native
kernels (``effattn/native/landmarks.c``) with or without gradients; the torch code here is
their twin (:data:`USE_NATIVE_LANDMARKS` off, other dtypes and devices).  They read each
block of the long side's rows once per pass with everything else in a thread's cache, and
the second keeps per-landmark maxima and sums instead of the ``[L, N]`` probabilities
(its backward recomputes each block's weights).  Measured on the 2-core CPU (B = 1, H = 4,
D = 64, N = 16,384, the two paths alternated in one process), forward+backward / forward
without gradients: ``L = 64``: first product 30.9 -> 18.4 / 8.3 -> 5.8 ms, second 30.9 ->
16.2 / 8.7 -> 5.3 ms; ``L = 256``: 87.5 -> 58.5 / 22.1 -> 18.0, 113.6 -> 62.0 / 24.8 -> 18.4
ms.  Without the kernels, calls that need no gradient go to SDPA (:func:`masked_sdpa`: one
pass, nothing kept); torch 2.13's fused SDPA was slower than these Functions in training
(30 / 151 ms at N = 16,384 / 65,536 for the first product against 21 / 119, 35 / 175 for
the second against 18 / 106).

The long input (``q`` of the first, ``k`` of the second) may come with its sequence split
over several dims, ``[B, H, S, N / S, D]`` — the segment view Nyströmformer's landmark
means read (:func:`effattn.mechanisms.lowrank.segment_means`) — and its gradient comes
back in that shape as a fresh tensor, not a view: autograd then adds the means' gradient
(a zero-copy broadcast over each segment) into it in place instead of copying the
broadcast into a new ``N``-sized tensor first.

Masking: ``key_valid`` bool (True = attend), broadcastable to ``[B, H, 1, Nk]``; a row with
no valid key outputs zeros with zero gradients (never NaN).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from effattn import native
from effattn.result_pool import pooled_empty
from effattn.mechanisms.exact import masked_sdpa

#: whether the two products run on the native kernels where they serve (``landmarks.c``:
#: float32 on the CPU, landmark count and widths multiples of the vector width); False:
#: always the torch code below (their twin)
USE_NATIVE_LANDMARKS = True

#: score elements (all batch/head rows) per query chunk of :func:`queries_over_landmarks`
CHUNK_SCORES = 1 << 20


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x [B, H, *seq, D]`` (contiguous) viewed as ``[B, H, N, D]``."""
    return x.view(x.shape[0], x.shape[1], -1, x.shape[-1])


def _key_bias(key_valid: Optional[torch.Tensor]):
    """``(fill, empty)``: the bool ``[.., 1, Nk]`` of scores to set to ``-inf`` (invalid keys
    of rows that have a valid key) and the bool ``[.., 1, 1]`` of rows without any (their
    probabilities are zeroed after a uniform softmax), each None when not needed."""
    if key_valid is None:
        return None, None
    has = key_valid.any(-1, keepdim=True)  # [.., 1, 1]
    fill = ~key_valid & has
    empty = None if bool(has.all()) else ~has
    return (fill if bool(fill.any()) else None), empty


def _softmax_(s: torch.Tensor, fill, empty) -> torch.Tensor:
    """Masked softmax over the last dim, in place on ``s``."""
    if fill is not None:
        s.masked_fill_(fill, float("-inf"))
    torch.softmax(s, -1, out=s)
    if empty is not None:
        s.masked_fill_(empty, 0.0)
    return s


def _chunk(buf: torch.Tensor, *shape) -> torch.Tensor:
    """A contiguous ``shape`` view of the start of the flat buffer ``buf``: torch 2.13's
    ``_softmax_backward_data.out`` writes a non-contiguous ``out=`` view wrongly (a
    ``[:, :, :n]`` slice of a chunk buffer, on CPU; the tests caught it)."""
    n = 1
    for d in shape:
        n *= d
    return buf[:n].view(shape)


def _softmax_backward_(dp: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``p * (dp - rowsum(dp * p))`` in place on ``dp`` (torch's fused softmax backward)."""
    return torch.ops.aten._softmax_backward_data.out(dp, p, -1, p.dtype, grad_input=dp)


class _QueriesOverLandmarks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_valid, scale):
        ctx.q_shape = q.shape
        q = _rows(q)
        B, H, N, _ = q.shape
        L = k.shape[2]
        ctx.save_for_backward(q, k, v, key_valid)
        ctx.scale = scale
        if USE_NATIVE_LANDMARKS:
            out = native.queries_over_landmarks(q, k, v, key_valid, scale)
            if out is not None:
                return out
        fill, empty = _key_bias(key_valid)
        ks = k * scale
        r = max(1, min(N, CHUNK_SCORES // max(1, B * H * L)))
        out = pooled_empty((B, H, N, v.shape[-1]), q.dtype, q.device)
        s = torch.empty(B * H * r * L, dtype=q.dtype, device=q.device)
        for a in range(0, N, r):
            b = min(N, a + r)
            p = _softmax_(torch.matmul(q[:, :, a:b], ks.transpose(-1, -2), out=_chunk(s, B, H, b - a, L)),
                          fill, empty)
            torch.matmul(p, v, out=out[:, :, a:b])
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, key_valid = ctx.saved_tensors
        q = _rows(q)
        scale = ctx.scale
        B, H, N, D = q.shape
        L, Dv = k.shape[2], v.shape[-1]
        fill, empty = _key_bias(key_valid)
        ks = k * scale
        r = max(1, min(N, CHUNK_SCORES // max(1, B * H * L)))
        dout = dout.contiguous()
        dq_out = pooled_empty(ctx.q_shape, q.dtype, q.device)  # not a view (module doc)
        if USE_NATIVE_LANDMARKS:
            got = native.queries_over_landmarks_backward(q, k, v, key_valid, scale, dout, dq_out)
            if got is not None:
                return (dq_out, *got, None, None)
        dq = _rows(dq_out)
        dks = torch.zeros(B, H, L, D, dtype=q.dtype, device=q.device)
        dv = torch.zeros(B, H, L, Dv, dtype=q.dtype, device=q.device)
        p_buf = torch.empty(B * H * r * L, dtype=q.dtype, device=q.device)
        dp_buf = torch.empty_like(p_buf)
        part_k = torch.empty_like(dks)
        part_v = torch.empty_like(dv)
        for a in range(0, N, r):
            b = min(N, a + r)
            qc, g = q[:, :, a:b], dout[:, :, a:b]
            p = _softmax_(torch.matmul(qc, ks.transpose(-1, -2), out=_chunk(p_buf, B, H, b - a, L)),
                          fill, empty)
            dv += torch.matmul(p.transpose(-1, -2), g, out=part_v)
            ds = _softmax_backward_(torch.matmul(g, v.transpose(-1, -2), out=_chunk(dp_buf, B, H, b - a, L)), p)
            torch.matmul(ds, ks, out=dq[:, :, a:b])
            dks += torch.matmul(ds.transpose(-1, -2), qc, out=part_k)
        return dq_out, dks.mul_(scale), dv, None, None


def _probabilities(q, k, key_valid, scale) -> torch.Tensor:
    """The ``[B, H, L, N]`` softmax weights of :class:`_LandmarksOverKeys` (torch)."""
    fill, empty = _key_bias(key_valid)
    return _softmax_(torch.matmul(q * scale, _rows(k).transpose(-1, -2)), fill, empty)


class _LandmarksOverKeys(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_valid, scale):
        ctx.k_shape = k.shape
        ctx.scale = scale
        if USE_NATIVE_LANDMARKS:
            got = native.landmarks_over_keys(q, _rows(k), v, key_valid, scale)
            if got is not None:  # the per-landmark statistics instead of the [L, N] weights
                ctx.save_for_backward(q, k, v, key_valid, *got)
                return got[0]
        p = _probabilities(q, k, key_valid, scale)
        ctx.save_for_backward(q, k, v, key_valid, p)
        return torch.matmul(p, v)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, key_valid, *kept = ctx.saved_tensors
        scale = ctx.scale
        dout = dout.contiguous()
        if len(kept) == 3:  # the native forward's out, m, z
            dk = pooled_empty(ctx.k_shape, k.dtype, k.device)  # not a view (module doc)
            got = native.landmarks_over_keys_backward(q, _rows(k), v, key_valid, scale, *kept, dout, dk)
            if got is not None:
                return got[0], dk, got[1], None, None
            kept = [_probabilities(q, k, key_valid, scale)]
        p, k = kept[0], _rows(k)
        dv = torch.matmul(p.transpose(-1, -2), dout)
        ds = _softmax_backward_(torch.matmul(dout, v.transpose(-1, -2)), p)
        dq = torch.matmul(ds, k).mul_(scale)
        dk = pooled_empty(ctx.k_shape, k.dtype, k.device)  # not a view (module doc)
        torch.matmul(ds.transpose(-1, -2), q * scale, out=_rows(dk))
        return dq, dk, dv, None, None


def _check(q, k, v, key_valid, split: str):
    """``q``, ``k``, ``v`` are ``[B, H, N, D]``; the long one (``split``: "q" or "k") may
    spread its sequence over several dims (``[B, H, S, N / S, D]``)."""
    long, short = (q, k) if split == "q" else (k, q)
    if long.dim() < 4 or short.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected [B, H, N, D] q, k, v, got shapes {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    nk = math.prod(k.shape[2:-1])
    if nk != v.shape[2] or q.shape[-1] != k.shape[-1] or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if key_valid is not None and key_valid.dtype != torch.bool:
        raise ValueError(f"key_valid: expected a bool tensor, got {key_valid.dtype}")


def _needs_grad(*xs) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def queries_over_landmarks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_valid: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``softmax(q k^T · scale) v`` for many queries over few keys, chunked over queries.

    ``q [B, H, N, D]`` (or ``[B, H, S, N / S, D]``), ``k [B, H, L, D]``, ``v [B, H, L,
    Dv]`` (one dtype), ``key_valid`` bool broadcastable to ``[B, H, 1, L]`` or None ->
    ``[B, H, N, Dv]``.  Memory beyond the
    output: one chunk of about :data:`CHUNK_SCORES` scores (two in the backward)."""
    _check(q, k, v, key_valid, "q")
    if not _needs_grad(q, k, v):
        q = _rows(q.contiguous())
        out = native.queries_over_landmarks(q, k, v, key_valid, scale) if USE_NATIVE_LANDMARKS else None
        return masked_sdpa(q, k, v, key_valid, scale) if out is None else out
    return _QueriesOverLandmarks.apply(q.contiguous(), k.contiguous(), v.contiguous(), key_valid,
                                       float(scale))


def landmarks_over_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_valid: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``softmax(q k^T · scale) v`` for few queries over many keys, the ``[L, N]``
    probabilities kept for the backward.

    ``q [B, H, L, D]``, ``k [B, H, N, D]`` (or ``[B, H, S, N / S, D]``), ``v [B, H, N,
    Dv]`` (one dtype), ``key_valid``
    bool broadcastable to ``[B, H, 1, N]`` or None -> ``[B, H, L, Dv]``.  Memory: the
    ``[B, H, L, N]`` probabilities (and as much again in the backward)."""
    _check(q, k, v, key_valid, "k")
    if not _needs_grad(q, k, v):
        k = _rows(k.contiguous())
        got = native.landmarks_over_keys(q, k, v, key_valid, scale) if USE_NATIVE_LANDMARKS else None
        return masked_sdpa(q, k, v, key_valid, scale) if got is None else got[0]
    return _LandmarksOverKeys.apply(q, k.contiguous(), v, key_valid, float(scale))
