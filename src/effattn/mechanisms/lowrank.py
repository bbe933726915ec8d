"""Low-rank attention: ``linformer`` (learned sequence projections) and ``nystrom``
(Nyströmformer: landmark Nyström approximation of the softmax matrix).

Neither can be causal: both mix positions along the sequence (Linformer's projection of
keys/values, Nyström's segment-mean landmarks) before a query ever looks at them, so
every output would depend on future tokens.  Padded keys are zeroed before any mixing,
so their content never matters, and projected keys / landmarks that contain no real
token are excluded from the softmaxes.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from effattn import native
from effattn.api import prepare, register, spec
from effattn.mechanisms._landmarks import landmarks_over_keys, queries_over_landmarks
from effattn.mechanisms.exact import masked_sdpa
from effattn.result_pool import pooled_empty
from effattn.softmax import softmax_lse, stat_dtype

__all__ = [
    "linformer_attention", "LinformerAttention", "sequence_projection", "nystrom_attention", "NystromAttention",
    "segment_means", "iterative_pinv",
]


def _zero_padded(x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``x [B, H, N, ·]`` with padded tokens' rows set to zero."""
    if padding_mask is None:
        return x
    return x.masked_fill(~padding_mask[:, None, :, None], 0.0)


def _positive_int(name: str, val) -> int:
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"{name}: expected a positive int, got {val!r}")
    return val


# --------------------------------------------------------------------------- Linformer

LINFORMER_CAUSAL_ERROR = (
    "Linformer projects keys and values along the sequence (E·K, F·V), so every projected "
    "key mixes all positions and the future would leak into the past."
)


class _SequenceProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P, x):
        ctx.save_for_backward(P, x)
        return torch.matmul(P.detach(), x.detach())

    @staticmethod
    def backward(ctx, g):
        P, x = ctx.saved_tensors
        dP = dx = None
        if ctx.needs_input_grad[1]:
            dx = pooled_empty((*g.shape[:-2], P.shape[1], g.shape[-1]), g.dtype, g.device)
            torch.matmul(P.detach().t(), g, out=dx)  # [B, H, N, D]
        if ctx.needs_input_grad[0]:
            dP = pooled_empty(P.shape, g.dtype, g.device)
            if x.shape[0] * x.shape[1] == 0:
                dP.zero_()
            for i, (b, h) in enumerate(itertools.product(range(x.shape[0]), range(x.shape[1]))):
                # [k, D] @ [D, N], x's transpose read in place; the first head writes dP
                if i == 0:
                    torch.mm(g[b, h], x[b, h].t(), out=dP)
                else:
                    dP.addmm_(g[b, h], x[b, h].t())
        return dP, dx


def sequence_projection(P: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Linformer's projection along the sequence, ``P [k, N]`` times each head's ``x [B, H,
    N, D]`` -> ``[B, H, k, D]``, differentiable in both.

    ``torch.matmul(P, x)`` does not fold the heads into one ``[k, N] x [N, B·H·D]``
    product when an input requires grad — a parameter ``P`` does even under ``no_grad`` —
    and runs a broadcast batched product instead: 21 vs 8 ms at N = 16,384 (B = 1, H = 4,
    D = 64, k = 256; 46 vs 30 ms forward+backward here).  So the forward multiplies the
    detached tensors and the backward is written out: ``dx = P^T g`` (folded),
    ``dP = sum_bh g_bh x_bh^T`` (one ``addmm`` per head, reading ``x``'s transpose in place;
    an einsum first copies ``x`` into an ``[N, B·H·D]`` layout)."""
    if not (torch.is_grad_enabled() and (P.requires_grad or x.requires_grad)):
        return torch.matmul(P.detach(), x.detach())
    return _SequenceProjection.apply(P, x)


def linformer_attention(q, k, v, *, causal=False, padding_mask=None, scale, return_lse=False,
                        shared_qk=False, E, F=None):
    """Linformer: ``softmax(Q (E K)^T scale) (F V)`` with ``E, F [k, max_len]`` sliced to the
    first ``Nk`` columns.

    ``q [B,H,Nq,D]``, ``k [B,H,Nk,D]``, ``v [B,H,Nk,Dv]``, ``E``/``F`` ``[k, L >= Nk]``
    (``F=None``: ``F = E``) -> ``(out [B,H,Nq,Dv], lse [B,H,Nq] or None)``; ``lse`` is the
    log-sum-exp over the ``k`` projected keys.  Padded keys are zeroed before projection;
    a projected key whose ``E`` row touches no real key is excluded (so identity
    projections reproduce exact attention with padding); a batch row without real keys
    outputs zeros and ``lse = -inf``.
    """
    if causal:
        raise ValueError(f"causal: {LINFORMER_CAUSAL_ERROR}")
    F_ = E if F is None else F
    Nk = k.shape[2]
    for name, P in (("E", E), ("F", F_)):
        if not isinstance(P, torch.Tensor) or P.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor [k, max_len]")
        if P.shape[1] < Nk:
            raise ValueError(f"{name}: sequence length {Nk} exceeds max_len {P.shape[1]}")
    if F_.shape[0] != E.shape[0]:
        raise ValueError(f"F: expected {E.shape[0]} rows like E, got {F_.shape[0]}")
    cdt = stat_dtype(q.dtype)
    e = E[:, :Nk].to(device=q.device, dtype=cdt)
    f = F_[:, :Nk].to(device=q.device, dtype=cdt)
    kp = sequence_projection(e, _zero_padded(k.to(cdt), padding_mask))  # [B, H, k, D]
    vp = sequence_projection(f, _zero_padded(v.to(cdt), padding_mask))
    touches = None
    if padding_mask is not None:
        touches = torch.matmul(padding_mask.to(cdt), e.detach().abs().T) > 0  # [B, k]
        touches = touches[:, None, None, :]
    if not return_lse:  # fused: no [Nq, k] score tensor
        if q.device.type == "cpu" and cdt == torch.float32 and native.available():
            # the queries-over-landmarks kernel (Nystromformer's) with the k projected keys
            # as its landmarks: 16.0 vs 19.5 ms forward, 56 vs 72 ms training at N = 16,384
            # (k = 256, B=1, H=4, D=64), 62 vs 89 / 204 vs 314 ms at 65,536
            return queries_over_landmarks(q.to(cdt), kp, vp, touches, scale).to(q.dtype), None
        return masked_sdpa(q.to(cdt), kp, vp, touches, scale).to(q.dtype), None
    s = torch.matmul(q.to(cdt), kp.transpose(-1, -2)) * scale  # [B, H, Nq, k]
    if touches is not None:
        s = s.masked_fill(~touches, float("-inf"))
    probs, lse = softmax_lse(s)
    return torch.matmul(probs, vp).to(q.dtype), lse


class LinformerAttention(nn.Module):
    """Linformer attention with learned projections ``E`` (and ``F`` unless ``share_kv``)
    of shape ``[k, max_len]``, initialized like ``nn.Linear(max_len, k)``
    (``U(±1/sqrt(max_len))``; ``seed`` makes the init reproducible).

    ``forward(q, k, v, *, causal=False, padding_mask=None, scale=None, return_lse=False)``
    with the shapes of :func:`effattn.attention`; sequences up to ``max_len``.
    """

    def __init__(self, k: int = 256, max_len: int = 4096, share_kv: bool = False,
                 seed: Optional[int] = None):
        super().__init__()
        _positive_int("k", k)
        _positive_int("max_len", max_len)
        if not isinstance(share_kv, bool):
            raise TypeError(f"share_kv: expected bool, got {type(share_kv).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed: expected an int or None, got {type(seed).__name__}")
        self.k, self.max_len, self.share_kv = k, max_len, share_kv
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        bound = 1.0 / math.sqrt(max_len)

        def init():
            return (torch.rand(k, max_len, generator=g) * 2 - 1) * bound

        self.E = nn.Parameter(init())
        self.F = None if share_kv else nn.Parameter(init())

    def forward(self, q, k, v, *, causal=False, padding_mask=None, scale=None, return_lse=False):
        s = spec("linformer")
        k, scale, shared = prepare(s, q, k, v, causal=causal, padding_mask=padding_mask,
                                   scale=scale, return_lse=return_lse)
        if k.shape[2] > self.max_len:
            raise ValueError(f"k: sequence length {k.shape[2]} exceeds max_len={self.max_len}")
        out, lse = linformer_attention(q, k, v, padding_mask=padding_mask, scale=scale,
                                       return_lse=return_lse, shared_qk=shared, E=self.E, F=self.F)
        return (out, lse) if return_lse else out

    def extra_repr(self) -> str:
        return f"k={self.k}, max_len={self.max_len}, share_kv={self.share_kv}"


def _linformer_flops(B, H, Nq, Nk, D, Dv, causal=False, k=256, **_):
    r = min(k, Nk) if k else Nk
    return 2.0 * B * H * (r * Nk * (D + Dv) + Nq * r * (D + Dv))


register(
    "linformer", exact=False, causal=False, time="O(N·k·D)", memory="O(N·k + k·D)",
    flops=_linformer_flops, flops_formula="2·B·H·(k·Nk·(D+Dv) + Nq·k·(D+Dv))",
    options={"k": 256, "max_len": 4096, "share_kv": False, "seed": None}, family="lowrank",
    description="Linformer: learned projections E, F [k, max_len] compress keys/values along the sequence",
    shared_qk=False, lse=True, module=LinformerAttention, causal_error=LINFORMER_CAUSAL_ERROR,
)(linformer_attention)


# --------------------------------------------------------------------------- Nyström

NYSTROM_CAUSAL_ERROR = (
    "Nyströmformer's landmarks are segment means over the sequence, so each landmark "
    "mixes future tokens into every query's output."
)


def segment_means(x: torch.Tensor, n_segments: int, valid: Optional[torch.Tensor],
                  with_source: bool = False):
    """Means of ``x [B, H, N, D]`` over ``n_segments <= N`` contiguous segments (position
    n is in segment ``floor(n * n_segments / N)``, so sizes differ by at most one),
    counting only real tokens (``valid`` bool ``[B, N]`` or None).

    Returns ``(means [B, H, S, D], nonempty bool [B|1, S])``; an all-padding segment's
    mean is zero and ``nonempty`` False there.  One pass over ``x``: a reshaped sum when
    ``S`` divides ``N``, else an ``index_add`` by segment (a one-hot ``[S, N]`` matmul took
    20x as long and copied ``x`` for its layout).

    ``with_source=True`` also returns ``source``: ``x`` (padding zeroed) for the caller's
    other uses of ``x`` — when ``S`` divides ``N``, the very ``[B, H, S, N / S, D]`` tensor
    the sum reads.  A consumer that takes it in that shape and hands back a fresh gradient
    alike (:mod:`effattn.mechanisms._landmarks`) lets autograd add the means' gradient,
    a zero-copy broadcast over each segment, into that gradient in place; through the
    flat ``[B, H, N, D]`` tensor autograd first copies the broadcast into a fresh
    ``N``-sized tensor (page faults included: 3.5 ms a 16 MB gradient here, a sixth of
    Nyströmformer's backward at N = 16,384).
    """
    B, H, N, D = x.shape
    S = n_segments

    def seg_sum(t: torch.Tensor, dim: int) -> torch.Tensor:  # sum over dim's segments
        if N % S == 0:
            return t.unflatten(dim, (S, N // S)).sum(dim + 1)
        seg = torch.arange(N, device=t.device) * S // N
        shape = list(t.shape)
        shape[dim] = S
        return t.new_zeros(shape).index_add_(dim, seg, t)

    if valid is None:
        cnt = seg_sum(torch.ones(1, N, dtype=x.dtype, device=x.device), 1)  # [1, S]
    else:
        x = x.masked_fill(~valid[:, None, :, None], 0.0)
        cnt = seg_sum(valid.to(x.dtype), 1)  # [B, S]
    if N % S == 0:
        source = x.unflatten(2, (S, N // S))
        sums = source.sum(3)
    else:
        source, sums = x, seg_sum(x, 2)
    means = sums / cnt.clamp_min(1.0)[:, None, :, None]
    return (means, cnt > 0, source) if with_source else (means, cnt > 0)


def iterative_pinv(K: torch.Tensor, iters: int) -> torch.Tensor:
    """Nyströmformer's Moore–Penrose iteration for ``K [..., L, L]``:
    ``Z0 = K^T / (max_j sum_i |K_ij| · max_i sum_j |K_ij|)``, then ``iters`` times
    ``Z <- Z (13 I - K Z (15 I - K Z (7 I - K Z))) / 4``.  The normalizer is per matrix
    (the reference code takes one max over the whole batch).  An all-zero ``K`` gives
    ``Z = 0``."""
    a = K.abs()
    norm = a.sum(-2).amax(-1) * a.sum(-1).amax(-1)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    Z = K.transpose(-1, -2) / norm[..., None, None]
    eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
    for _ in range(iters):
        KZ = torch.matmul(K, Z)
        Z = 0.25 * torch.matmul(Z, 13 * eye - torch.matmul(KZ, 15 * eye - torch.matmul(KZ, 7 * eye - KZ)))
    return Z


def _nystrom_core_torch(ql, kl, k3v, k_valid, q_valid, scale: float, iters: int) -> torch.Tensor:
    """:func:`nystrom_core` in torch (autograd differentiates it)."""
    k2, _ = softmax_lse((torch.matmul(ql, kl.transpose(-1, -2)) * scale)
                        .masked_fill(~k_valid[:, None, None, :], float("-inf")))
    q_rows = q_valid[:, None, :, None].to(ql.dtype)  # empty query landmarks contribute nothing
    return torch.matmul(iterative_pinv(k2 * q_rows, iters), k3v * q_rows)


class _NystromCore(torch.autograd.Function):
    """:func:`nystrom_core` on the native kernel (``nystrom_core.c``), whose backward runs
    the forward again and the chain rule through the iterations in one call."""

    @staticmethod
    def forward(ctx, ql, kl, k3v, k_valid, q_valid, scale, iters):
        ctx.save_for_backward(ql, kl, k3v, k_valid, q_valid)
        ctx.scale, ctx.iters = scale, iters
        return native.nystrom_core(ql, kl, k3v, k_valid, q_valid, scale, iters)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dw):
        ql, kl, k3v, k_valid, q_valid = ctx.saved_tensors
        got = native.nystrom_core_backward(ql, kl, k3v, k_valid, q_valid, ctx.scale, ctx.iters,
                                           dw.contiguous())
        return (*got, None, None, None, None)


USE_NATIVE_CORE = True  # False: always the torch twin (tests compare the two)


def nystrom_core(ql: torch.Tensor, kl: torch.Tensor, k3v: torch.Tensor, k_valid: torch.Tensor,
                 q_valid: torch.Tensor, scale: float, iters: int) -> torch.Tensor:
    """The landmarks' part of Nyströmformer: ``pinv(K) (k3v · q_valid)`` with ``K =
    softmax(scale · ql kl^T)`` (columns of empty key landmarks left out, rows of empty query
    landmarks zeroed) and :func:`iterative_pinv`.

    ``ql, kl [B, H, L, D]``, ``k3v [B, H, L, Dv]``, ``k_valid`` / ``q_valid`` bool ``[B|1,
    L]`` (False: an empty segment) -> ``[B, H, L, Dv]``.  Float32 on the CPU (``L``, ``D``,
    ``Dv`` multiples of the vector width) runs on one native call each way
    (``effattn/native/nystrom_core.c``): in torch these ``L x L`` steps are ~30 small
    operations forward and ~100 in the backward, dominated by dispatch (3.2 ms forward +
    backward at ``L = 64``, ``B·H = 4`` on the 2-core CPU).
    """
    ql, kl, k3v = ql.contiguous(), kl.contiguous(), k3v.contiguous()
    if USE_NATIVE_CORE and native.nystrom_core_serves(ql, kl, k3v, k_valid, q_valid):
        if torch.is_grad_enabled() and any(t.requires_grad for t in (ql, kl, k3v)):
            return _NystromCore.apply(ql, kl, k3v, k_valid, q_valid, float(scale), int(iters))
        return native.nystrom_core(ql, kl, k3v, k_valid, q_valid, float(scale), int(iters))
    return _nystrom_core_torch(ql, kl, k3v, k_valid, q_valid, scale, iters)


def _check_conv_weight(w, H: int) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError("conv_weight: expected a floating tensor [H, kernel] or [kernel]")
    if w.dim() == 1:
        w = w[None].expand(H, -1)
    if w.dim() != 2 or w.shape[0] != H:
        raise ValueError(f"conv_weight: expected shape [H={H}, kernel] or [kernel], got {tuple(w.shape)}")
    if w.shape[1] % 2 == 0:
        raise ValueError(f"conv_weight: kernel size must be odd, got {w.shape[1]}")
    return w


def nystrom_attention(q, k, v, *, causal=False, padding_mask=None, scale, return_lse=False,
                      shared_qk=False, n_landmarks=64, pinv_iters=6, conv_weight=None):
    """Nyströmformer: ``softmax(Q K̃^T) pinv(softmax(Q̃ K̃^T)) softmax(Q̃ K^T) V`` with
    segment-mean landmarks ``Q̃, K̃`` (``min(n_landmarks, Nq, Nk)`` of them), scores
    scaled by ``scale``.

    ``q [B,H,Nq,D]``, ``k [B,H,Nk,D]``, ``v [B,H,Nk,Dv]`` -> ``(out [B,H,Nq,Dv], None)``.
    Landmarks average real tokens only (query landmarks use the padding mask when
    ``Nq == Nk``, i.e. self-attention); empty landmarks are excluded.  ``conv_weight``
    (``[H, kernel]`` or ``[kernel]``, odd kernel; None = off) adds the paper's depthwise
    convolution of ``V`` along the sequence as a fixed kernel (:class:`NystromAttention`
    learns it); it needs ``Nq == Nk``.
    """
    if causal:
        raise ValueError(f"causal: {NYSTROM_CAUSAL_ERROR}")
    _positive_int("n_landmarks", n_landmarks)
    if isinstance(pinv_iters, bool) or not isinstance(pinv_iters, int) or pinv_iters < 0:
        raise ValueError(f"pinv_iters: expected a non-negative int, got {pinv_iters!r}")
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    if conv_weight is not None:
        conv_weight = _check_conv_weight(conv_weight, H)
        if Nq != Nk:
            raise ValueError(f"conv_weight: the value convolution needs Nq == Nk, got {Nq} and {Nk}")
    cdt = stat_dtype(q.dtype)
    # the scale enters only the score products (no scaled full-size copies of q and k:
    # fresh N x D tensors cost more in page faults here than the products they feed)
    qs = q.to(cdt)
    ks = _zero_padded(k.to(cdt), padding_mask)
    vs = _zero_padded(v.to(cdt), padding_mask)
    L = min(n_landmarks, Nq, Nk)
    q_valid = padding_mask if (padding_mask is not None and Nq == Nk) else None
    # the long products read the means' sources (keys: zeroed at padding either way;
    # queries: only when unmasked), so each input's two gradients meet in one buffer
    ql, q_ne, q_src = segment_means(qs, L, q_valid, with_source=True)
    qs = q_src if q_valid is None else qs
    kl, k_ne, ks = segment_means(ks, L, padding_mask, with_source=True)
    # softmax(Q̃ K^T) V and softmax(Q K̃^T) W: exact attention with a short side
    # (mechanisms/_landmarks.py), no [Nq, Nk] matrix
    k3v = landmarks_over_keys(ql, ks, vs, None if padding_mask is None else padding_mask[:, None, None, :],
                              scale)  # [B, H, L, Dv]
    w = nystrom_core(ql, kl, k3v, k_ne, q_ne, scale, pinv_iters)  # [B, H, L, Dv]
    out = queries_over_landmarks(qs, kl, w, k_ne[:, None, None, :], scale)
    if conv_weight is not None:
        ks_ = conv_weight.shape[1]
        w = conv_weight.to(device=q.device, dtype=cdt)[:, None, :, None]  # [H, 1, ks, 1]
        out = out + F.conv2d(vs, w, padding=(ks_ // 2, 0), groups=H)
    return out.to(q.dtype), None


class NystromAttention(nn.Module):
    """Nyströmformer with its learned depthwise value convolution (``conv_kernel`` odd,
    one ``[conv_kernel]`` filter per head; ``None`` = no convolution, and then this equals
    ``effattn.get("nystrom", ...)``).

    ``forward(q, k, v, *, causal=False, padding_mask=None, scale=None, return_lse=False)``;
    ``q``/``v`` must have ``num_heads`` heads when the convolution is on.
    """

    def __init__(self, n_landmarks: int = 64, pinv_iters: int = 6,
                 conv_kernel: Optional[int] = None, num_heads: Optional[int] = None):
        super().__init__()
        _positive_int("n_landmarks", n_landmarks)
        if isinstance(pinv_iters, bool) or not isinstance(pinv_iters, int) or pinv_iters < 0:
            raise ValueError(f"pinv_iters: expected a non-negative int, got {pinv_iters!r}")
        self.n_landmarks, self.pinv_iters = n_landmarks, pinv_iters
        self.conv = None
        if conv_kernel is not None:
            _positive_int("conv_kernel", conv_kernel)
            if conv_kernel % 2 == 0:
                raise ValueError(f"conv_kernel: must be odd, got {conv_kernel}")
            _positive_int("num_heads", num_heads)
            bound = 1.0 / math.sqrt(conv_kernel)  # nn.Conv2d's default fan-in bound
            self.conv = nn.Parameter((torch.rand(num_heads, conv_kernel) * 2 - 1) * bound)

    def forward(self, q, k, v, *, causal=False, padding_mask=None, scale=None, return_lse=False):
        s = spec("nystrom")
        k, scale, shared = prepare(s, q, k, v, causal=causal, padding_mask=padding_mask,
                                   scale=scale, return_lse=return_lse)
        out, _ = nystrom_attention(q, k, v, padding_mask=padding_mask, scale=scale,
                                   shared_qk=shared, n_landmarks=self.n_landmarks,
                                   pinv_iters=self.pinv_iters, conv_weight=self.conv)
        return out


def _nystrom_flops(B, H, Nq, Nk, D, Dv, causal=False, n_landmarks=64, pinv_iters=6,
                   conv_weight=None, **_):
    L = min(n_landmarks, Nq, Nk)
    f = (Nq + Nk) * L * D / 2  # landmark pooling (one add per element, as multiply-adds / 2)
    f += Nq * L * D + L * L * D + L * Nk * D  # the three score matrices
    f += pinv_iters * 4 * L ** 3  # four L x L products per iteration
    f += L * Nk * Dv + L * L * Dv + Nq * L * Dv  # K3·V, Z·(.), K1·(.)
    if conv_weight is not None:
        f += Nq * Dv * conv_weight.shape[-1]
    return 2.0 * B * H * f


register(
    "nystrom", exact=False, causal=False, time="O(N·m·D + m³·iters)", memory="O(N·m + m²)",
    flops=_nystrom_flops,
    flops_formula="2·B·H·(m·(Nq+Nk)·D + m²·D + 4·iters·m³ + m·(Nq+Nk)·Dv + m²·Dv), m = landmarks",
    options={"n_landmarks": 64, "pinv_iters": 6, "conv_weight": None}, family="lowrank",
    description="Nyströmformer: segment-mean landmarks and an iterative pseudo-inverse approximate softmax",
    shared_qk=False, lse=False, causal_error=NYSTROM_CAUSAL_ERROR,
)(nystrom_attention)
