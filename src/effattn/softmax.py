"""Softmax pieces shared by every softmax-based method, all in float32 or wider.

Conventions: masked scores are ``-inf``; a row with no allowed key has ``lse = -inf``
and output zero, and its gradients are zero (never NaN).
"""

from __future__ import annotations

import itertools

import torch

LOG2_E = 1.4426950408889634  # 1 / ln 2
LN_2 = 0.6931471805599453


def _exp_in_place(x: torch.Tensor, shift) -> torch.Tensor:
    # the subtraction first: x - shift is exact near the row maximum (x log2 e - shift log2 e
    # in one pass, tried, rounds x log2 e: a maximum of -1e5, a shared-QK self pair, then
    # weighs 1.003 instead of 1)
    if shift is not None:
        x = x.sub_(shift)
    if x.dtype == torch.float32:
        return x.mul_(LOG2_E).exp2_()
    return x.exp_()


class _ShiftedExp(torch.autograd.Function):
    """``exp(x - shift)`` in place on ``x``, with the backward ``grad * result`` in one
    pass (autograd through the ``exp2`` form takes three full-size passes: ``exp2``'s
    ``ln 2`` scaling of its result, the product with the gradient and the ``log2 e``
    scaling; with performer's norm-term negation they were 18 % of its training step at
    N = 16,384)."""

    @staticmethod
    def forward(ctx, x, shift):
        y = _exp_in_place(x, shift)
        ctx.mark_dirty(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y, None


def exp_(x: torch.Tensor, shift=None) -> torch.Tensor:
    """``exp(x - shift)`` in place: ``x [...]`` (floating) is overwritten and returned;
    ``shift`` is a tensor broadcastable to ``x`` (or a number), or None.

    Float32 runs as ``exp2((x - shift) * log2 e)``: torch 2.13's float32 ``exp`` kernel is
    3.5x slower than its ``exp2`` on this CPU (AVX-512; 0.62 vs 0.18 ms a million elements
    on 2 threads), and softmax tiles spend most of their non-matmul time here.  Relative
    error <= 6e-7 for arguments in [-10, 0] (``exp``: 6e-8) and <= 8e-6 down to -90, where
    values are below 1e-39.  Other dtypes use ``exp``.  ``-inf`` gives 0, NaN stays NaN.
    Differentiable in ``x`` with the backward ``grad * result`` in one pass (a ``shift``
    that requires grad is differentiated through the composed operations instead)."""
    if (torch.is_grad_enabled() and x.requires_grad
            and not (isinstance(shift, torch.Tensor) and shift.requires_grad)):
        return _ShiftedExp.apply(x, shift)
    return _exp_in_place(x, shift)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype softmax statistics accumulate in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def safe_lse(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with ``-inf`` rows replaced by 0, so ``exp(scores - safe_lse)`` is 0 there."""
    return torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)


def softmax_lse(scores: torch.Tensor):
    """Row softmax of masked ``scores [..., L]`` and its log-sum-exp ``[...]``.

    Fully masked rows give probabilities 0 and ``lse = -inf``.
    """
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - safe_lse(lse)[..., None])
    return probs, lse


def softmax_weights_(scores: torch.Tensor, base2: bool = False):
    """Unnormalized in-place softmax: ``scores [..., L]`` is overwritten with
    ``exp(scores - m)`` (``m`` the row maximum) and returned with ``lse [...]`` and
    ``inv [..., 1]``, the reciprocal row sums: the probabilities are ``weights * inv``, so
    ``(weights @ v) * inv`` is the attention output — normalizing the ``[..., Dv]`` output
    instead of the ``[..., L]`` scores saves a pass over the scores (division is the
    slowest elementwise pass here: 1M scores 251 us, a product 70).  Fully masked rows
    give zero weights, ``lse = -inf`` and ``inv = 1``.

    ``base2=True``: the scores are in base-2 units (``log2 e`` times the scores: the
    caller scaled its queries by it) and the weights are ``exp2(scores - m)`` — one pass
    fewer than scaling the scores here; ``lse`` is still the natural log-sum-exp.  Not
    differentiable in that form.
    """
    # few passes and ops: this runs once per tile group, where dispatch costs show
    m = scores.amax(-1, keepdim=True).nan_to_num_(neginf=0.0)  # fully masked rows: 0
    weights = scores.sub_(m).exp2_() if base2 else exp_(scores, m)
    total = weights.sum(-1, keepdim=True)  # >= 1 unless the row is fully masked (0)
    # log 0 = -inf on fully masked rows
    lse = torch.log2(total).add_(m).mul_(LN_2) if base2 else torch.log(total).add_(m)
    return weights, lse.squeeze(-1), total.clamp_min_(1.0).reciprocal_()


def softmax_lse_(scores: torch.Tensor):
    """In-place :func:`softmax_lse`: ``scores [..., L]`` is overwritten with the
    ``exp(scores - lse)`` — i.e. the probabilities — and ``lse [...]`` is returned with it.
    Fully masked rows give zeros and ``-inf``.
    """
    weights, lse, inv = softmax_weights_(scores)
    return weights.mul_(inv), lse


def output_delta(dout: torch.Tensor, out: torch.Tensor, dlse=None) -> torch.Tensor:
    """FlashAttention's backward row term ``D_i = rowsum(dO_i * O_i) - dlse_i``:
    ``dout, out [..., N, Dv]``, ``dlse [..., N]`` or None -> ``[..., N]`` in the statistics
    dtype.  A row-wise dot product (einsum: no ``[..., N, Dv]`` temporary, which on this
    CPU costs more in page faults than the products).  Where the leading dimensions do not
    flatten into one (some rows of a larger tensor, e.g. one part of a union), the einsum
    would first copy both inputs, so it runs per leading index on their row blocks."""
    cdt = stat_dtype(out.dtype)
    d, o = dout.to(cdt), out.to(cdt)
    if d.dim() <= 2 or (_rows_flatten(d) and _rows_flatten(o)):
        delta = torch.einsum("...d,...d->...", d, o)
    else:
        delta = torch.empty(d.shape[:-1], dtype=cdt, device=d.device)
        for i in itertools.product(*(range(n) for n in d.shape[:-2])):
            delta[i] = torch.einsum("nd,nd->n", d[i], o[i])
    return delta if dlse is None else delta - dlse.to(cdt)


def _rows_flatten(x: torch.Tensor) -> bool:
    """Whether ``x [..., n, d]``'s rows flatten into one ``[-1, d]`` view."""
    try:
        x.view(-1, x.shape[-1])
        return True
    except RuntimeError:
        return False


def online_init(shape_rows, dv: int, dtype, device):
    """Empty online-softmax state for ``shape_rows`` query rows: ``(acc, m, l)``."""
    acc = torch.zeros(*shape_rows, dv, dtype=dtype, device=device)
    m = torch.full(shape_rows, float("-inf"), dtype=dtype, device=device)
    l = torch.zeros(shape_rows, dtype=dtype, device=device)
    return acc, m, l


def online_update(acc, m, l, scores, v, base2: bool = False):
    """One FlashAttention step: fold ``scores [..., r, L]`` (overwritten) over values ``v
    [..., L, Dv]`` into the running ``(acc [..., r, Dv], m [..., r], l [..., r])``; returns
    the new state.  Not differentiable (in place).  ``base2``: scores (and ``m``) in base-2
    units, as in :func:`softmax_weights_`.
    """
    m_new = torch.maximum(m, scores.amax(-1))
    m_safe = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
    if base2:
        p = scores.sub_(m_safe[..., None]).exp2_()
        alpha = torch.exp2(m - m_safe)
    else:
        p = exp_(scores, m_safe[..., None])
        alpha = torch.exp(m - m_safe)
    l = l * alpha + p.sum(-1)
    acc = acc * alpha[..., None] + torch.matmul(p.to(v.dtype), v).to(acc.dtype)
    return acc, m_new, l


def online_finish(acc, m, l, base2: bool = False):
    """Normalize the online state: ``(out [..., r, Dv], lse [..., r])``; empty rows -> 0, -inf.
    ``base2``: the state of base-2 scores (``lse`` is still the natural log-sum-exp)."""
    empty = l == 0
    out = acc / torch.where(empty, torch.ones_like(l), l)[..., None]
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    total = (m_safe + torch.log2(l)) * LN_2 if base2 else m_safe + torch.log(l)
    lse = torch.where(empty, torch.full_like(l, float("-inf")), total)
    return out, lse


def merge_partials(outs: torch.Tensor, lses: torch.Tensor, dim: int = 0):
    """Merge attention computed over disjoint (or repeated, as in LSH rounds) key sets.

    ``outs [..., R, ..., N, Dv]`` / ``lses [..., R, ..., N]`` stacked along ``dim``; each
    part is weighted by ``exp(lse_r - logsumexp_r lse_r)``.  Returns ``(out, lse)`` with
    ``dim`` removed.  Rows empty in every part (all ``lse = -inf``) give 0 and ``-inf``
    with zero (not NaN) gradients: they are kept out of the ``logsumexp``, whose gradient
    is NaN there.  Differentiable.
    """
    d = dim if dim >= 0 else lses.dim() + dim
    empty = torch.isneginf(lses).all(d, keepdim=True)
    any_empty = bool(empty.any())
    if any_empty:
        lses = lses.masked_fill(empty, 0.0)
    total = torch.logsumexp(lses, dim=d, keepdim=True)
    w = torch.exp(lses - safe_lse(total))
    if any_empty:
        w = w.masked_fill(empty, 0.0)
        total = total.masked_fill(empty, float("-inf"))
    out = (outs * w.unsqueeze(-1).to(outs.dtype)).sum(d)
    return out, total.squeeze(d)


def merge_pair_(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Two-part :func:`merge_partials` in place, for no-grad streaming: ``out_a [..., Dv]``
    and ``lse_a [...]`` become the merge of parts a and b (``out_b``, ``lse_b`` alike) and
    are returned.  One ``lerp`` pass over the outputs with weight
    ``exp(lse_b) / (exp(lse_a) + exp(lse_b)) = sigmoid(lse_b - lse_a)`` instead of stacking
    both parts; rows empty in both stay 0 and ``-inf``.  Not differentiable."""
    w = torch.sigmoid(lse_b - lse_a).nan_to_num_(nan=0.0)  # nan only where both are -inf
    out_a.lerp_(out_b, w[..., None].to(out_a.dtype))
    torch.logaddexp(lse_a, lse_b, out=lse_a)
    return out_a, lse_a
