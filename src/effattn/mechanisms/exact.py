"""Exact attention: ``naive`` (materialized reference), ``full`` (torch SDPA) and
``blockwise`` (the FlashAttention algorithm, through the block-sparse engine's dense layout).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from effattn.api import register
from effattn.masks import SELF_PENALTY, apply_masks, dense_bool_mask
from effattn.mechanisms.blocksparse import block_sparse_attention
from effattn.softmax import softmax_lse, stat_dtype


def dense_flops(B, H, Nq, Nk, D, Dv, causal=False, **_):
    """Multiply-add x 2 of ``QK^T`` and ``PV`` over all (or, causal, the lower-triangle) pairs."""
    pairs = Nq * Nk
    if causal:
        pairs = sum(min(i + 1, Nk) for i in range(Nq)) if Nq < 4096 else Nq * Nk / 2
    return 2.0 * B * H * pairs * (D + Dv)


DENSE_FLOPS = "2·B·H·P·(D+Dv), P = Nq·Nk (causal: ≈ Nq·Nk/2)"


def naive_attention(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk):
    """``softmax(Q K^T * scale + mask) V`` with the full ``[B, H, Nq, Nk]`` score matrix.

    ``q [B,H,Nq,D]``, ``k [B,H,Nk,D]``, ``v [B,H,Nk,Dv]`` -> ``(out [B,H,Nq,Dv], lse [B,H,Nq])``.
    """
    cdt = stat_dtype(q.dtype)
    Nq, Nk = q.shape[2], k.shape[2]
    s = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    qp = torch.arange(Nq, device=q.device)[:, None]
    kp = torch.arange(Nk, device=q.device)[None, :]
    kv = None if padding_mask is None else padding_mask[:, None, None, :]
    s = apply_masks(s, qp, kp, causal=causal, exclude_self=shared_qk, k_valid=kv)
    probs, lse = softmax_lse(s)
    out = torch.matmul(probs, v.to(cdt))
    return out.to(q.dtype), lse


register(
    "naive", exact=True, causal=True, time="O(N²·D)", memory="O(N²)",
    flops=dense_flops, flops_formula=DENSE_FLOPS, options={}, family="exact",
    description="materialized softmax(QKᵀ·scale + mask)·V; the reference every test compares to",
)(naive_attention)


def blockwise_attention(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk,
                        block_q=128, block_k=256):
    """FlashAttention: query/key tiles, online softmax, recomputing backward; returns lse.

    Shapes as :func:`naive_attention`; ``block_q`` x ``block_k`` is the tile size.
    """
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    kv = None if padding_mask is None else padding_mask[:, None, :]
    return block_sparse_attention(
        q, k, v, None, block_q=block_q, block_k=block_k, scale=scale, causal=causal,
        exclude_self=shared_qk, k_valid=kv, group_blocks=1, slot_chunk=1,
    )


register(
    "blockwise", exact=True, causal=True, time="O(N²·D)", memory="O(N·D)",
    flops=dense_flops, flops_formula=DENSE_FLOPS, options={"block_q": 128, "block_k": 256},
    family="exact",
    description="FlashAttention algorithm in PyTorch: tiles, online softmax, recomputing backward",
)(blockwise_attention)


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_valid: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``softmax(q k^T · scale)`` over the valid keys, times ``v``, through SDPA's fused
    kernels (no ``Nq x Nk`` score tensor on CPU or CUDA).

    ``q [B,H,Nq,D]``, ``k [B,H,Nk,D]``, ``v [B,H,Nk,Dv]``, ``key_valid`` bool broadcastable
    to ``[B,H,1,Nk]`` (True = attend) or None -> ``out [B,H,Nq,Dv]``; rows without a valid
    key give zeros (SDPA would return NaN: they see every key, then are zeroed, so their
    gradients stay finite).  The low-rank methods use it for their softmax products."""
    if key_valid is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    has_key = key_valid.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid | ~has_key, scale=scale)
    return out if bool(has_key.all()) else out.masked_fill(~has_key, 0.0)


def _sdpa_mask(q, Nk, causal, padding_mask, shared_qk, dtype):
    """Mask argument for SDPA plus the bool ``[B|1,1,Nq,1]`` of rows that have a key (or None)."""
    Nq = q.shape[2]
    if not shared_qk and padding_mask is None:
        return None, causal, None
    allowed = dense_bool_mask(Nq, Nk, causal=causal, padding_mask=padding_mask, device=q.device)
    has_key = None
    if allowed is not None:
        has_key = allowed.any(-1, keepdim=True)
        # rows with no key would make SDPA return NaN: let them see everything, zero them after
        allowed = allowed | ~has_key
    if not shared_qk:
        return allowed, False, has_key
    eye = torch.eye(Nq, Nk, dtype=torch.bool, device=q.device)
    bias = torch.zeros(Nq, Nk, dtype=dtype, device=q.device).masked_fill(eye, -SELF_PENALTY)
    if allowed is not None:
        bias = bias.masked_fill(~allowed, float("-inf"))
    return bias[None, None] if bias.dim() == 2 else bias, False, has_key


def full_attention(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk):
    """Exact attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Shapes as :func:`naive_attention`.  With ``return_lse=True`` it runs ``blockwise``
    (SDPA does not expose its log-sum-exp).
    """
    if return_lse:
        return blockwise_attention(q, k, v, causal=causal, padding_mask=padding_mask,
                                   scale=scale, return_lse=True, shared_qk=shared_qk)
    # CPU SDPA in float16 is slow and loose, and float16 cannot hold the self penalty
    cdt = torch.float32 if q.dtype == torch.float16 and (q.device.type == "cpu" or shared_qk) else q.dtype
    mask, is_causal, has_key = _sdpa_mask(q, k.shape[2], causal, padding_mask, shared_qk, cdt)
    out = F.scaled_dot_product_attention(q.to(cdt), k.to(cdt), v.to(cdt), attn_mask=mask,
                                         is_causal=is_causal, scale=scale).to(q.dtype)
    if has_key is not None:
        out = out.masked_fill(~has_key, 0.0)
    return out, None


register(
    "full", exact=True, causal=True, time="O(N²·D)", memory="O(N) fused / O(N²) with masks",
    flops=dense_flops, flops_formula=DENSE_FLOPS, options={}, family="exact",
    description="torch scaled_dot_product_attention (fused kernels); lse via blockwise",
)(full_attention)
