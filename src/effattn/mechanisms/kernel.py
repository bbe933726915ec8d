"""Kernel (linear) attention: ``linear`` (elu+1), ``efficient`` (Shen), ``taylor`` (Li),
``performer`` (FAVOR+).

Every method here but ``efficient`` is one feature map plugged into ONE shared path,
:func:`feature_map_attention`, which computes

    out_i = sum_j w_ij phi(q_i)·phi(k_j) v_j / sum_j w_ij phi(q_i)·phi(k_j)

as ``phi(Q) (phi(K)^T V)`` without any ``N x N`` tensor: ``w_ij`` is 1 for allowed
pairs (real key; causal: ``j <= i``) and 0 otherwise, so padded keys leave both the
numerator and the normalizer.  Causal attention uses *chunked prefix sums*: inside a
chunk of ``chunk`` positions the masked ``chunk x chunk`` block is computed directly;
across chunks a running ``sum phi(k)^T v`` (``M x Dv``) and ``sum phi(k)`` (``M``) are
carried.  Memory is ``O(N·(M + Dv + chunk) + (N/chunk)·M·Dv)``, never ``O(N·M·Dv)``.

``efficient`` (Shen et al.) is the exception: its key map is a softmax of each feature
over positions, normalized per feature rather than per query, so it streams through its
own two-pass path (:func:`efficient_softmax_attention`).  For float32 on the CPU both its
passes run in native kernels (:func:`effattn.native.efficient`, ``efficient.c``: each block
of rows read once per pass, its weights, sums and products in a thread's cache); the
torch passes here are their twin.  B=1, H=4, D=64 on the 2-core Xeon the performance
figures come from, the two paths alternated in one process: N = 16,384 forward 12.7 -> 7.1
ms, forward+backward 40.3 -> 19.6 ms; N = 65,536 forward 72.8 -> 46.8 ms, forward+backward
247 -> 146 ms.

Non-causal ``performer`` (positive features, the default), ``linear`` and ``taylor`` run,
for float32 on the CPU with widths on the vector width (and a Performer projection without
gradient), on one native kernel (:func:`effattn.native.feature_attention`,
``feature_attention.c``: each block of rows' features and products in a thread's cache; the
backward recomputes them); the stream below with the kinds' :class:`StreamMap` objects is
its twin.  B=1, H=4, D=64, the two alternated in one process, N = 16,384 forward /
forward+backward: performer (256 features) 68.5 -> 37.1 / 206 -> 115 ms, linear 18.2 ->
6.9 / 57.7 -> 26.0 ms, taylor 14.8 -> 7.5 / 61.5 -> 27.5 ms.  Their causal forms run, under
the same conditions, on :func:`effattn.native.causal_feature_attention`
(``causal_features.c``: one scan per (batch, head) over blocks of 64 positions, whatever
``chunk`` says — it sizes the torch path's chunks, its twin, and changes only rounding).
Alternated in one process at N = 16,384 (B=1, H=4, D=64), forward / forward+backward: linear
82.5 -> 12.7 / 155.2 -> 43.9 ms, taylor 88.8 -> 13.5 / 177.7 -> 51.5 ms, performer 331.6 ->
69.3 / 662.9 -> 200.9 ms.

Feature maps whose key features need a large per-key factor (Performer's
``exp(w·k - |k|²/2)``, the trig kernel's ``exp(|k|²/2)``) return them in log-scaled
form ``phi(k_j) = exp(s_j) psi(k_j)``; the shared path divides by a per-query constant
``c_i = max_{allowed j} s_j`` (non-causal: the max over real keys; causal: the running
max over keys ``j <= i``), which cancels exactly in the ratio, so nothing overflows
and causal outputs depend on no later position, not even through the stabilizer.

Numerics: everything is computed in float32 (float64 for float64 input) and cast to
the input dtype at the end.  A denominator is replaced only where it is exactly zero
(a query with no real key, or all its kernel values underflowed): that query outputs
zeros; no additive eps biases the other rows.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F

from effattn import native
from effattn.api import register
from effattn.mechanisms._scratch import Workspace
from effattn.softmax import exp_, stat_dtype

__all__ = [
    "feature_map_attention", "streamed_feature_attention", "dense_feature_map_attention", "orthogonal_gaussian",
    "performer_projection", "linear_features", "taylor_features", "efficient_softmax_attention",
    "performer_features", "performer_logits", "reset_feature_generators", "StreamMap",
    "PerformerSoftmaxMap", "LinearMap", "TaylorMap", "elu_plus_one_",
]


# --------------------------------------------------------------------------- shared path

def _key_valid(padding_mask: Optional[torch.Tensor], n_keys: int) -> Optional[torch.Tensor]:
    """``padding_mask [B, Nk]`` as ``[B, 1, Nk]`` (broadcasting over heads), or None."""
    return None if padding_mask is None else padding_mask[:, None, :n_keys]


def zero_padded(x: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``x [B, H, N, ·]`` with the rows of padded tokens set to zero (their content, even
    inf/NaN, then never reaches a result or a gradient)."""
    if padding_mask is None:
        return x
    return x.masked_fill(~padding_mask[:, None, :, None], 0.0)


def _normalize(num: torch.Tensor, den: torch.Tensor, has_key: Optional[torch.Tensor]):
    """``num [..., N, Dv] / den [..., N]``; rows with ``den == 0`` or no key give zeros
    (finite gradients: the division never sees a zero)."""
    empty = den == 0
    if has_key is not None:
        empty = empty | ~has_key
    out = num / torch.where(empty, torch.ones_like(den), den)[..., None]
    # in place: the division's backward needs its inputs, not its result
    return out.masked_fill_(empty[..., None], 0.0)


def _check_chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    return chunk


def _stream_rows(B: int, H: int, M: int, n: int, budget: int = 1 << 19) -> int:
    """Positions per chunk of the non-causal stream: ``B·H·rows·M`` about ``budget``
    elements (2 MB in float32 — cache-sized, and reused by the allocator instead of
    page-faulting a fresh ``N x M`` buffer per call), raised to 2,048 rows where that
    takes at most 4x the budget: each chunk costs ~40 torch calls, and at ``B·H = 4``,
    ``M = 256`` (Performer) 512-row chunks spent more in those than the bigger buffers cost
    (alternated in one process at N = 16,384: training 203 -> 188 ms, forward 64.6 -> 61.4;
    65,536: 843 -> 800 / 273 -> 265)."""
    rows = budget // max(1, B * H * M)
    return max(16, min(n, max(rows, min(2048, 4 * rows))))


def _raise_running_max(c: Optional[torch.Tensor], row_max: torch.Tensor,
                       valid: Optional[torch.Tensor], has_sum: bool):
    """Running maximum ``c [B, H, 1]`` (None before the first chunk) raised by a chunk's
    ``row_max [B, H, r]`` over its real rows (``valid [B, 1, r]``) -> ``(c_new, c_safe,
    rescale)``: ``c_safe`` is ``c_new`` with ``-inf`` (no real key yet) read as 0, and
    ``rescale = exp(c - c_safe)`` multiplies the stored sum (None when there is none yet;
    0 while ``c`` was ``-inf``, when the stored sum is zero)."""
    if valid is not None:
        row_max = row_max.masked_fill(~valid, float("-inf"))
    cm = row_max.amax(-1, keepdim=True)
    c_new = cm if c is None else torch.maximum(c, cm)
    c_safe = torch.where(torch.isneginf(c_new), torch.zeros_like(c_new), c_new)
    rescale = None
    if has_sum:
        rescale = torch.where(torch.isneginf(c), torch.zeros_like(c), torch.exp(c - c_safe))
    return c_new, c_safe, rescale


class StreamMap:
    """A feature map for :func:`streamed_feature_attention` with its own chunk backward:
    the stream then keeps no autograd graph and no features for backward — it recomputes
    each chunk's features there (a cache-sized matmul is cheaper on this CPU than first
    touching the fresh memory that would hold them: about 0.3 ms a MB) and writes the
    input gradients straight into whole-length buffers.

    ``__call__(*x_parts, *params, out=None)``: as the plain callables (a query map returns
    ``phi [B, H, r, M]``; a key map ``(psi, None)`` or ``(None, log_k)``), called without
    gradients; ``out`` is a contiguous ``[B, H, r, M]`` scratch tensor the map may write
    its large result into (the stream reuses it for every chunk) or ignore.
    ``backward(x_parts, params, feat, dfeat, rows, p_grads)``: ``feat`` is the chunk's
    feature tensor as the stream used it (for keys: stabilized, exponentiated and
    with padded rows zero), ``dfeat`` its gradient (may be overwritten); writes each
    part's input gradient into ``rows[i]`` (``[B, H, r, ·]`` views, None = not needed)
    and adds parameter gradients to ``p_grads[j]`` (None = none yet); a parameter that
    does not require grad is skipped."""

    def backward(self, x_parts, params, feat, dfeat, rows, p_grads):
        raise NotImplementedError


def streamed_feature_attention(
    q_inputs: tuple,
    k_inputs: tuple,
    v: torch.Tensor,
    q_map,
    k_map,
    *,
    n_features: int,
    padding_mask: Optional[torch.Tensor] = None,
    params: tuple = (),
) -> torch.Tensor:
    """Non-causal ``phi(Q) (phi(K)^T V)`` normalized, streamed over positions.

    ``q_inputs``: tensors ``[B, H, Nq, ·]`` sliced together along positions and passed to
    ``q_map(*slices, *params) -> phi_q [B, H, r, M]``; ``k_inputs``: tensors ``[B, H, Nk, ·]``
    (or ``[B, H, Nk]``) passed to ``k_map(*slices, *params) -> (psi_k [B, H, r, M], log_k
    [B, H, r] | None)``, the key features being ``exp(log_k) psi_k`` — or ``(None, log_k
    [B, H, r, M])`` for features ``exp(log_k)`` given in log form (stabilized before
    exponentiating, so only one ``r x M`` tensor per chunk is kept for backward);
    ``params``: tensors both maps use whole (e.g. a projection; they get gradients);
    ``n_features`` = M (sizes the chunks); ``v [B, H, Nk, Dv]`` with padded rows finite;
    ``padding_mask`` bool ``[B, Nk]`` (True = real key).
    Returns ``out [B, H, Nq, Dv]`` in ``v.dtype``; a query with no real key (or an all-zero
    kernel row) outputs zeros.

    Keys are consumed a cache-sized chunk of positions at a time into
    ``S = sum_j phi(k_j) [v_j, 1]`` (``[B, H, M, Dv + 1]``): ``log_k`` is folded in
    against a running maximum ``c`` (the stored sum is rescaled by ``exp(c_old - c_new)``
    when it grows — the constant cancels in the ratio, so ``c`` is gradient-free), so no
    ``N x M`` feature tensor ever exists; then each query chunk is one matmul
    ``phi(q) S`` giving numerator and normalizer together.  With gradients and both maps
    :class:`StreamMap` objects, the backward recomputes each chunk's features (keys against
    the final ``c``) and calls the maps' own backward; otherwise each chunk's feature map
    keeps its own small autograd graph (its features, as a plain autograd pass would)
    and the backward writes each chunk's input gradients straight into whole-length
    buffers.  Either way no per-chunk gradient copies are concatenated at the end and no
    ``[N, Dv + 1]`` products are kept (first-order gradients only).
    """
    tensors = (*q_inputs, *k_inputs, v, *params)
    spec = (len(q_inputs), len(k_inputs), q_map, k_map, n_features, padding_mask)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _StreamedFeatures.apply(spec, *tensors)
    return _stream(spec, tensors, keep=False)[0]


def _explicit(spec) -> bool:
    """Whether both maps of ``spec`` have their own backward (:class:`StreamMap`)."""
    return isinstance(spec[2], StreamMap) and isinstance(spec[3], StreamMap)


def _leaves(parts, keep: bool):
    """Detached copies of ``parts`` that start a chunk's own graph (``keep``), else as is."""
    if not keep:
        return list(parts)
    return [t.detach().requires_grad_(t.requires_grad) for t in parts]


def _split(tensors, rows: int):
    """``tensors [B, H, N, ...]`` cut into chunks of ``rows`` positions -> per chunk
    ``(start, views)``."""
    return enumerate(zip(*[t.split(rows, dim=2) for t in tensors]))


def _key_features(psi, log_k, c_safe, valid):
    """One key chunk's features as the stream sums them: ``psi [B, H, r, M]`` times
    ``exp(log_k [B, H, r] - c_safe [B, H, 1])``, or ``exp(log_k [B, H, r, M] - c_safe)``
    (in place on ``log_k``) when ``psi`` is None, or ``psi`` itself when ``log_k`` is
    None; padded rows (``valid [B, 1, r]`` False) zero."""
    if log_k is None:
        return psi if valid is None else psi.masked_fill(~valid[..., None], 0.0)
    if psi is None:  # features in log form: exponentiated in place
        if valid is not None:
            log_k = log_k.masked_fill_(~valid[..., None], float("-inf"))
        return exp_(log_k, c_safe[..., None])
    expo = log_k - c_safe
    if valid is not None:
        expo = expo.masked_fill(~valid, float("-inf"))
    return psi * torch.exp(expo)[..., None]


def _feature_scratch(spec, ws: Workspace, B: int, H: int, M: int, like: torch.Tensor):
    """``scratch(name, r)`` -> the keyword arguments giving a map of ``spec`` its output
    buffer for a chunk of ``r`` positions: ``{"out": [B, H, r, M] from ws}`` for
    :class:`StreamMap` maps, ``{}`` for plain callables."""
    if not _explicit(spec):
        return lambda name, r: {}
    return lambda name, r: {"out": ws.get(name, (B, H, r, M), like)}


def _matmul_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``a [B, H, r, K] @ b`` (``b [K, F]`` or ``[B, H, K, F]``) written into ``out [B, H,
    r, F]``, which may be rows of a larger buffer (one ``bmm`` over its view: no
    temporary); returns ``out``."""
    BH = a.shape[0] * a.shape[1]
    try:
        o3 = out.view(BH, *out.shape[2:])
    except RuntimeError:  # rows whose batch dims do not merge: computed, then copied
        return out.copy_(torch.matmul(a, b))
    b3 = b.expand(BH, *b.shape) if b.dim() == 2 else b.reshape(BH, *b.shape[2:])
    torch.bmm(a.reshape(BH, *a.shape[2:]), b3, out=o3)
    return out


def _stream(spec, tensors, keep: bool):
    """The streamed computation of :func:`streamed_feature_attention` -> ``(out, state)``;
    with ``keep``, ``state`` holds what :class:`_StreamedFeatures` needs for backward
    (``S``, the normalizers and the final key maximum; for maps without their own
    backward, each chunk's graph from its own leaves)."""
    nq, nk, q_map, k_map, n_features, padding_mask = spec
    q_inputs, k_inputs = tensors[:nq], tensors[nq:nq + nk]
    v, params = tensors[nq + nk], tensors[nq + nk + 1:]
    B, H, Nk, Dv = v.shape
    Nq = q_inputs[0].shape[2]
    graphs = keep and not _explicit(spec)
    scratch = _feature_scratch(spec, Workspace(), B, H, n_features, v)
    p_leaves = _leaves(params, graphs)
    grad_ctx = torch.enable_grad() if graphs else contextlib.nullcontext()
    S = c = c_safe = None
    k_chunks = []  # per chunk: (part with its graph, leaves (k inputs, v), rescale)
    R = _stream_rows(B, H, n_features, Nk)
    for i, (*k_parts, v_part) in _split((*k_inputs, v), R):
        s0 = i * R
        leaves = _leaves((*k_parts, v_part), graphs)
        valid = None if padding_mask is None else padding_mask[:, None, s0:s0 + v_part.shape[2]]
        rescale = None
        with grad_ctx:
            psi, log_k = k_map(*leaves[:-1], *p_leaves, **scratch("feat", v_part.shape[2]))
            if log_k is not None:
                row_max = log_k.detach().amax(-1) if psi is None else log_k.detach()  # [B, H, r]
                c, c_safe, rescale = _raise_running_max(c, row_max, valid, S is not None)
            psi = _key_features(psi, log_k, c_safe, valid)
            part = torch.cat([torch.matmul(psi.transpose(-1, -2), leaves[-1]),
                              psi.sum(-2)[..., None]], dim=-1)  # [B, H, M, Dv + 1]
        if graphs:
            k_chunks.append((part, leaves, rescale))
            part = part.detach()
        if S is None:
            S = part
        elif rescale is not None:
            S = S * rescale[..., None] + part
        else:
            S = S + part
    out = v.new_empty(B, H, Nq, Dv)
    if S is None:  # no keys at all
        return out.zero_(), None
    den_all = v.new_empty(B, H, Nq) if keep else None
    q_chunks = []
    Rq = _stream_rows(B, H, n_features, Nq)
    for i, q_parts in _split(q_inputs, Rq):
        s0 = i * Rq
        leaves = _leaves(q_parts, graphs)
        with grad_ctx:
            phi_q = q_map(*leaves, *p_leaves, **scratch("feat", q_parts[0].shape[2]))
        if graphs:
            q_chunks.append((phi_q, leaves))
            phi_q = phi_q.detach()
        nd = torch.matmul(phi_q, S)  # [B, H, r, Dv + 1]
        den = nd[..., Dv]
        # written straight into the output (no temporary copied in): num times 1 / den, 0
        # where den == 0 (a product by per-row reciprocals instead of a division and a
        # masked fill over [r, Dv]: at N = 16,384 those were 5.8 of linear's 16 ms forward;
        # the division stays where a reciprocal overflows: a tiny den, large-norm performer
        # inputs, half precision)
        empty = den == 0
        rows = out[:, :, s0:s0 + Rq]
        inv = den.masked_fill(empty, 1.0).reciprocal_()
        if bool(torch.isfinite(inv).all()):
            torch.mul(nd[..., :Dv], inv.masked_fill_(empty, 0.0)[..., None], out=rows)
        else:
            torch.div(nd[..., :Dv], den.masked_fill(empty, 1.0)[..., None], out=rows)
            rows.masked_fill_(empty[..., None], 0.0)
        if keep:
            den_all[:, :, s0:s0 + Rq] = den
    state = None
    if keep:
        state = dict(S=S, den=den_all, c=c_safe, k_chunks=k_chunks, q_chunks=q_chunks,
                     p_leaves=p_leaves, Rq=Rq, R=R)
    return out, state


def _keep_graph() -> bool:
    """Whether the running backward was asked to keep the graph (``retain_graph``); True
    when this torch cannot tell (then nothing is freed early)."""
    probe = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if probe is None else bool(probe())


def _chunk_grads(output, leaves, p_leaves, grad, bufs, p_grads, s0, retain):
    """Backward of one chunk's own graph: ``output``'s gradient ``grad`` to its
    ``leaves`` (written into whole-length ``bufs`` at rows ``s0:``; None = not needed) and
    the shared ``p_leaves`` (added to ``p_grads``); ``retain`` keeps that graph."""
    want = [x for x in (*leaves, *p_leaves) if x.requires_grad]
    got = iter(torch.autograd.grad(output, want, grad, allow_unused=True, retain_graph=retain)
               if want else ())
    for x, buf in zip(leaves, bufs):
        if x.requires_grad:
            g = next(got)
            if buf is not None:
                rows = buf[:, :, s0:s0 + x.shape[2]]
                rows.copy_(g) if g is not None else rows.zero_()
    for j, x in enumerate(p_leaves):
        if x.requires_grad:
            g = next(got)
            if g is not None:
                p_grads[j] = g if p_grads[j] is None else p_grads[j] + g


def _num_den_grad(g, out_rows, den):
    """Gradient of ``[num, den]`` (``[B, H, r, Dv + 1]``) from ``g = d out [B, H, r, Dv]``
    for ``out = num / den`` (0 where ``den [B, H, r]`` is 0): ``d num = g / den``,
    ``d den = -(g · out) / den``, both 0 where ``den`` is 0."""
    empty = den == 0
    inv = torch.where(empty, torch.zeros_like(den), 1.0 / torch.where(empty, torch.ones_like(den), den))
    g_nd = g.new_empty(*g.shape[:-1], g.shape[-1] + 1)
    torch.mul(g, inv[..., None], out=g_nd[..., :-1])
    torch.mul(torch.linalg.vecdot(g, out_rows), inv, out=g_nd[..., -1]).neg_()
    return g_nd


def _rows(bufs, s0: int, r: int):
    """Rows ``s0:s0+r`` of each whole-length buffer (None stays None)."""
    return [None if b is None else b[:, :, s0:s0 + r] for b in bufs]


def _explicit_backward(spec, tensors, st, out, dout, bufs, p_grads):
    """Backward of the stream for :class:`StreamMap` maps: features recomputed chunk by
    chunk (keys against the final maximum ``c``, so ``S`` needs no rescale chain), input
    gradients written into ``bufs`` (per tensor of ``tensors``; None = not needed)."""
    nq, nk, q_map, k_map, n_features, padding_mask = spec
    q_inputs, k_inputs = tensors[:nq], tensors[nq:nq + nk]
    v, params = tensors[nq + nk], tensors[nq + nk + 1:]
    B, H, Nk, Dv = v.shape
    S, den = st["S"], st["den"]
    want_p = any(p.requires_grad for p in params)
    ws = Workspace()  # each chunk's features and their gradient: the same memory every chunk
    scratch = _feature_scratch(spec, ws, B, H, S.shape[-2], v)
    dS = torch.zeros_like(S)
    for i, q_parts in _split(q_inputs, st["Rq"]):
        s0, r = i * st["Rq"], q_parts[0].shape[2]
        phi = q_map(*q_parts, *params, **scratch("feat", r))
        g_nd = _num_den_grad(dout[:, :, s0:s0 + r], out[:, :, s0:s0 + r], den[:, :, s0:s0 + r])
        dS += torch.matmul(phi.transpose(-1, -2), g_nd)
        rows = _rows(bufs[:nq], s0, r)
        if want_p or any(x is not None for x in rows):
            dphi = torch.matmul(g_nd, S.transpose(-1, -2), **scratch("dfeat", r))
            q_map.backward(q_parts, params, phi, dphi, rows, p_grads)
    dA, dz = dS[..., :Dv], dS[..., Dv:].transpose(-1, -2)  # [B, H, M, Dv], [B, H, 1, M]
    R = st["R"]
    for i, (*k_parts, v_part) in _split((*k_inputs, v), R):
        s0, r = i * R, v_part.shape[2]
        valid = None if padding_mask is None else padding_mask[:, None, s0:s0 + r]
        psi, log_k = k_map(*k_parts, *params, **scratch("feat", r))
        psi = _key_features(psi, log_k, st["c"], valid)
        *rows, dv = _rows(bufs[nq:nq + nk + 1], s0, r)
        if dv is not None:  # part = psi^T [v, 1]: dv = psi dA
            _matmul_into(psi, dA, dv)
        if want_p or any(x is not None for x in rows):  # d psi = v dA^T + dz
            dpsi = torch.matmul(v_part, dA.transpose(-1, -2), **scratch("dfeat", r)).add_(dz)
            if log_k is None and valid is not None:  # padded keys' features are constant 0
                dpsi.masked_fill_(~valid[..., None], 0.0)
            k_map.backward(k_parts, params, psi, dpsi, rows, p_grads)


class _StreamedFeatures(torch.autograd.Function):
    """:func:`streamed_feature_attention` with gradients (see there); inputs
    ``(spec, *q_inputs, *k_inputs, v, *params)``."""

    @staticmethod
    def forward(ctx, spec, *tensors):
        out, state = _stream(spec, tensors, keep=True)
        ctx.spec, ctx.state = spec, state
        ctx.shapes = [(t.shape, t.dtype, t.device, t.requires_grad) for t in tensors]
        ctx.save_for_backward(out, *(tensors if _explicit(spec) else ()))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        out, *tensors = ctx.saved_tensors
        st, (nq, nk) = ctx.state, ctx.spec[:2]
        bufs = [torch.empty(sh, dtype=dt, device=dev) if rg else None
                for sh, dt, dev, rg in ctx.shapes]
        if st is None:  # no keys: the output is constant zeros
            return (None, *[None if b is None else b.zero_() for b in bufs])
        n_par = len(bufs) - nq - nk - 1
        p_grads = [None] * n_par
        dout = dout.to(out.dtype)
        if _explicit(ctx.spec):
            _explicit_backward(ctx.spec, tensors, st, out, dout, bufs, p_grads)
        else:
            _graph_backward(st, nq, nk, out, dout, bufs, p_grads)
            if not _keep_graph():
                ctx.state = None
        for j, g in enumerate(p_grads):
            b = bufs[nq + nk + 1 + j]
            if b is not None:
                b.copy_(g) if g is not None else b.zero_()
        return (None, *bufs)


def _graph_backward(st, nq, nk, out, dout, bufs, p_grads):
    """Backward of the stream through each chunk's kept autograd graph (maps without
    their own backward)."""
    # without retain_graph each chunk's graph is freed as soon as it is done
    retain = _keep_graph()
    S, den = st["S"], st["den"]
    dS = torch.zeros_like(S)
    Rq = st["Rq"]
    # last chunk first, as for the keys: freed in reverse order of allocation, the
    # chunks' memory can go back to the system as it is released
    for i in range(len(st["q_chunks"]) - 1, -1, -1):
        phi_q, leaves = st["q_chunks"][i]
        s0 = i * Rq
        g_nd = _num_den_grad(dout[:, :, s0:s0 + Rq], out[:, :, s0:s0 + Rq], den[:, :, s0:s0 + Rq])
        dS += torch.matmul(phi_q.detach().transpose(-1, -2), g_nd)
        if phi_q.requires_grad:
            _chunk_grads(phi_q, leaves, st["p_leaves"], torch.matmul(g_nd, S.transpose(-1, -2)),
                         bufs[:nq], p_grads, s0, retain)
        if not retain:
            st["q_chunks"][i] = None
    R = st["R"]
    for i in range(len(st["k_chunks"]) - 1, -1, -1):
        part, leaves, rescale = st["k_chunks"][i]
        if part.requires_grad:
            _chunk_grads(part, leaves, st["p_leaves"], dS, bufs[nq:nq + nk + 1], p_grads, i * R,
                         retain)
        if rescale is not None:  # S_i = S_{i-1} * rescale + part_i
            dS = dS * rescale[..., None]
        if not retain:
            st["k_chunks"][i] = None


def feature_map_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    padding_mask: Optional[torch.Tensor] = None,
    k_log: Optional[torch.Tensor] = None,
    chunk: int = 64,
) -> torch.Tensor:
    """THE kernel-attention path for precomputed features: ``phi(Q) (phi(K)^T V)``
    normalized, with masks.

    ``phi_q [B, H, Nq, M]``, ``phi_k [B, H, Nk, M]``, ``v [B, H, Nk, Dv]`` (one dtype);
    ``padding_mask`` bool ``[B, Nk]`` (True = real key); ``k_log [B, H, Nk]`` optional
    per-key log-scale (the key's features are ``exp(k_log) * phi_k``; it may carry
    gradient).  ``causal``: query i sees keys ``j <= i`` (top-left alignment), computed
    by chunked prefix sums with ``chunk`` positions per chunk; non-causal runs the
    streamed path (:func:`streamed_feature_attention`).
    Returns ``out [B, H, Nq, Dv]`` in ``phi_q.dtype``; a query with no allowed key (or
    an all-zero kernel row) outputs zeros.  Padded keys' ``phi_k``/``v`` must be finite
    (callers zero them with :func:`zero_padded`).
    """
    _check_chunk(chunk)
    if causal:
        return _causal(phi_q, phi_k, v, _key_valid(padding_mask, phi_k.shape[2]), k_log, chunk)
    if padding_mask is not None:
        v = zero_padded(v, padding_mask[:, :v.shape[2]])
    k_inputs = (phi_k,) if k_log is None else (phi_k, k_log)
    return streamed_feature_attention(
        (phi_q,), k_inputs, v, _identity, _identity_keys, n_features=phi_k.shape[-1],
        padding_mask=padding_mask)


def _identity(x):
    return x


def _identity_keys(psi, log_k=None):
    return psi, log_k


def _exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``out[t] = sum_{s < t} x[s]`` along ``dim`` (zero first), written into one fresh
    tensor: a padded inclusive cumsum made two (16.3 vs 12.6 ms for 16 MB here)."""
    out = torch.empty_like(x)
    out.narrow(dim, 0, 1).zero_()
    n = x.shape[dim]
    if n > 1:
        out.narrow(dim, 1, n - 1).copy_(torch.cumsum(x.narrow(dim, 0, n - 1), dim=dim))
    return out


def _causal(phi_q, phi_k, v, valid, k_log, C):
    """Chunked causal prefix sums (see :func:`feature_map_attention`)."""
    B, H, Nq, M = phi_q.shape
    Nk, Dv = phi_k.shape[2], v.shape[-1]
    T = -(-max(Nq, Nk) // C)
    L = T * C
    # padded to whole chunks only where they are not (F.pad copies even by nothing)
    pq = phi_q if L == Nq else F.pad(phi_q, (0, 0, 0, L - Nq))
    pk = phi_k if L == Nk else F.pad(phi_k, (0, 0, 0, L - Nk))
    pv = v if L == Nk else F.pad(v, (0, 0, 0, L - Nk))
    if valid is None and L == Nk:
        val = None
    else:
        base = valid if valid is not None else torch.ones(1, 1, Nk, dtype=torch.bool, device=v.device)
        val = F.pad(base, (0, L - Nk), value=False)  # [B|1, 1, L]
    if val is not None:
        pv = pv.masked_fill(~val[..., None], 0.0)
        pk = pk.masked_fill(~val[..., None], 0.0)
    qc = pq.reshape(B, H, T, C, M)
    kc = pk.reshape(B, H, T, C, M)
    vc = pv.reshape(B, H, T, C, Dv)
    tri = torch.ones(C, C, dtype=torch.bool, device=v.device).tril()
    allowed = tri if val is None else tri & val.reshape(val.shape[0], 1, T, 1, C)

    a = torch.matmul(qc, kc.transpose(-1, -2))  # [B, H, T, C, C]
    if k_log is None:
        a = a.masked_fill(~allowed, 0.0)
        wk = None if val is None else val.reshape(val.shape[0], 1, T, C).to(pk.dtype)
        carry_factor = None
    else:
        s = F.pad(k_log, (0, L - Nk))
        sd = s.detach()
        if val is not None:
            sd = sd.masked_fill(~val, float("-inf"))
        c_raw = torch.cummax(sd, dim=-1).values  # [B, H, L]: max over keys j <= i
        c = torch.where(torch.isneginf(c_raw), torch.zeros_like(c_raw), c_raw)
        expo = s.reshape(B, H, T, 1, C) - c.reshape(B, H, T, C, 1)
        a = a * torch.exp(expo.masked_fill(~allowed, float("-inf")))
        # chunk t's summary uses reference r_t = c at its last position
        r_raw = c_raw.reshape(B, H, T, C)[..., -1]
        r = c.reshape(B, H, T, C)[..., -1]
        ek = s.reshape(B, H, T, C) - r[..., None]
        if val is not None:
            ek = ek.masked_fill(~val.reshape(val.shape[0], 1, T, C), float("-inf"))
        wk = torch.exp(ek)
        # a query in chunk t reads the carried state (reference r_{t-1}) times exp(r_{t-1} - c_i)
        prev = F.pad(r_raw, (1, 0), value=float("-inf"))[..., :T]  # [B, H, T]
        diff = prev[..., None] - c.reshape(B, H, T, C)
        carry_factor = torch.exp(diff.masked_fill(torch.isneginf(prev)[..., None], float("-inf")))
        # step[t-1] = exp(r_{t-2} - r_{t-1}) rescales the state entering chunk t-1 to chunk t
        step = torch.exp((prev[..., :-1] - r[..., :-1]).masked_fill(
            torch.isneginf(prev[..., :-1]), float("-inf")))
    num = torch.matmul(a, vc)  # [B, H, T, C, Dv]
    den = a.sum(-1)  # [B, H, T, C]

    kw = kc if wk is None else kc * wk[..., None]
    loc_kv = torch.matmul(kw.transpose(-1, -2), vc)  # [B, H, T, M, Dv]
    loc_z = kw.sum(-2)  # [B, H, T, M]
    if k_log is None:
        st_kv, st_z = _exclusive_cumsum(loc_kv, 2), _exclusive_cumsum(loc_z, 2)
    else:
        # exclusive prefix over chunks, state t in reference prev[t] = r_{t-1}.  The chunks
        # are taken apart once (unbind: one backward node); indexing loc_kv[:, :, t] in the
        # loop gave each step a select whose backward filled and added a whole-size
        # gradient, T^2 traffic (N = 16,384: 6.3 s of Performer's causal training step)
        loc_kvs, loc_zs, steps = loc_kv.unbind(2), loc_z.unbind(2), step.unbind(-1)
        kvs = [torch.zeros_like(loc_kvs[0])]
        zs = [torch.zeros_like(loc_zs[0])]
        for t in range(1, T):
            f = steps[t - 1]  # exp(r_{t-2} - r_{t-1}), 0 when no key before chunk t-1
            kvs.append(kvs[-1] * f[..., None, None] + loc_kvs[t - 1])
            zs.append(zs[-1] * f[..., None] + loc_zs[t - 1])
        st_kv = torch.stack(kvs, dim=2)
        st_z = torch.stack(zs, dim=2)
    c_num = torch.matmul(qc, st_kv)  # [B, H, T, C, Dv]
    c_den = torch.matmul(qc, st_z[..., None])[..., 0]  # [B, H, T, C]
    if carry_factor is not None:
        c_num = c_num * carry_factor[..., None]
        c_den = c_den * carry_factor
    num = (num + c_num).reshape(B, H, L, Dv)[:, :, :Nq]
    den = (den + c_den).reshape(B, H, L)[:, :, :Nq]
    has_key = None
    if val is not None:
        has_key = torch.cumsum(val.to(torch.int32), -1)[..., :Nq] > 0  # [B|1, 1, Nq]
    return _normalize(num, den, has_key)


def dense_feature_map_attention(phi_q, phi_k, v, *, causal, padding_mask=None, k_log=None):
    """Reference for :func:`feature_map_attention` that materializes the ``[B,H,Nq,Nk]``
    kernel matrix ``exp(k_log_j) phi(q_i)·phi(k_j)`` with masks.  Same shapes; for tests
    and small inputs only."""
    a = torch.matmul(phi_q, phi_k.transpose(-1, -2))
    if k_log is not None:
        a = a * torch.exp(k_log)[..., None, :]
    Nq, Nk = a.shape[-2:]
    mask = torch.ones(Nq, Nk, dtype=torch.bool, device=a.device)
    if causal:
        mask = mask.tril()
    mask = mask[None, None]
    if padding_mask is not None:
        mask = mask & padding_mask[:, None, None, :]
    a = a.masked_fill(~mask, 0.0)
    num = torch.matmul(a, v.masked_fill(~mask.any(-2)[..., None], 0.0))
    return _normalize(num, a.sum(-1), mask.any(-1))


# --------------------------------------------------------------------------- feature maps

class _EluPlusOne(torch.autograd.Function):
    """``elu(x) + 1`` as ``exp(min(x, 0)) + max(x, 0)`` (float32 ``exp`` via :func:`exp_`'s
    ``exp2``: 0.46 vs 0.88 ms a million elements for torch's ``elu`` on this CPU), with
    the one-pass backward ``grad · min(y, 1)`` (the derivative is ``exp(x) = y`` for
    ``x <= 0`` and 1 above, where ``y > 1``)."""

    @staticmethod
    def forward(ctx, x):
        y = elu_plus_one_(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * y.clamp_max(1.0)


def elu_plus_one_(x: torch.Tensor, out: Optional[torch.Tensor] = None,
                  scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``elu(x) + 1 = exp(min(x, 0)) + max(x, 0)``, not differentiable: ``x [...]`` ->
    a fresh tensor, or ``out`` (contiguous, like ``x``) with ``scratch`` (like ``x``)
    holding ``max(x, 0)`` — no temporaries then."""
    return exp_(torch.clamp_max(x, 0.0, out=out)).add_(torch.clamp_min(x, 0.0, out=scratch))


def linear_features(x: torch.Tensor) -> torch.Tensor:
    """Katharopoulos et al.: ``elu(x) + 1`` (positive), ``[..., D] -> [..., D]``; NaN
    stays NaN."""
    return _EluPlusOne.apply(x)


class LinearMap(StreamMap):
    """``elu + 1`` (:func:`linear_features`) as a :class:`StreamMap` for queries
    (``is_query``) or keys; its backward is ``dfeat · min(feat, 1)`` (0 on padded keys,
    whose features the stream zeroed).  Given ``out``, the features are written there
    with one scratch buffer of its own, reused by every chunk."""

    def __init__(self, is_query: bool):
        self.is_query = is_query
        self._ws = Workspace()

    def __call__(self, x, out=None):
        if out is None:
            f = linear_features(x)
        else:
            f = elu_plus_one_(x, out, self._ws.get("relu", x.shape, x))
        return f if self.is_query else (f, None)

    def backward(self, x_parts, params, feat, dfeat, rows, p_grads):
        if rows[0] is not None:
            torch.mul(dfeat, feat.clamp_max_(1.0), out=rows[0])


NORMALIZE_EPS = 1e-12  # F.normalize's: x / max(|x|, eps)


class TaylorMap(StreamMap):
    """:func:`taylor_features` ``[1, x/max(|x|, eps)]`` as a :class:`StreamMap` for
    queries (``is_query``) or keys; its backward is ``F.normalize``'s,
    ``dx = (dx̂ - x̂ (x̂·dx̂)) / |x|`` (``dx̂ / eps`` where ``|x| <= eps``)."""

    def __init__(self, is_query: bool):
        self.is_query = is_query

    def __call__(self, x, out=None):
        if out is None:
            f = taylor_features(x)
        else:
            f = out
            f[..., 0] = 1.0
            n = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(NORMALIZE_EPS)
            torch.div(x, n, out=f[..., 1:])
        return f if self.is_query else (f, None)

    def backward(self, x_parts, params, feat, dfeat, rows, p_grads):
        (x,), (dx,) = x_parts, rows
        if dx is None:
            return
        xh, g = feat[..., 1:], dfeat[..., 1:]
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        proj = torch.linalg.vecdot(xh, g)[..., None].masked_fill_(n <= NORMALIZE_EPS, 0.0)
        torch.addcmul(g, xh, proj, value=-1.0, out=dx).div_(n.clamp_min_(NORMALIZE_EPS))


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """Li et al. first-order Taylor: ``[1, x/|x|]``, ``[..., D] -> [..., D + 1]``, so that
    ``phi(q)·phi(k) = 1 + q̂·k̂ >= 0``."""
    xh = F.normalize(x, dim=-1, eps=NORMALIZE_EPS)
    return torch.cat([torch.ones_like(xh[..., :1]), xh], dim=-1)


def _efficient_rows(B: int, H: int, D: int, n: int) -> int:
    """Positions per chunk of the efficient-attention stream (as the shared stream's)."""
    return _stream_rows(B, H, D, n)


def _key_weights(k, valid, s0: int, r: int, t: float, c, buf):
    """``exp(t·k_j - c)`` for the keys ``s0:s0+r`` (0 for padded ones), written into
    ``buf [B, H, >= r, D]`` and returned as ``[B, H, r, D]``; ``c [B, H, 1, D]``."""
    e = torch.mul(k[:, :, s0:s0 + r], t, out=buf[:, :, :r])
    if valid is not None:
        e.masked_fill_(~valid[:, :, s0:s0 + r, None], float("-inf"))
    return exp_(e, c)


def _query_weights(q, s0: int, r: int, t: float, buf):
    """``softmax(t·q_i)`` over features for the queries ``s0:s0+r``, computed in ``buf``
    (``[B, H, >= r, D]``) and returned as ``[B, H, r, D]``."""
    e = torch.mul(q[:, :, s0:s0 + r], t, out=buf[:, :, :r])
    exp_(e, e.amax(-1, keepdim=True))
    return e.div_(e.sum(-1, keepdim=True))


#: whether efficient attention runs on the native kernels where they serve (``efficient.c``:
#: float32 on the CPU); False: always the torch passes below (its twin)
USE_NATIVE_EFFICIENT = True


def _efficient_stream(q, k, v, t: float, padding_mask, keep: bool):
    """Forward of :func:`efficient_softmax_attention` -> ``(out, saved)``; ``saved`` is
    ``(c, z, C)`` for the backward (None unless ``keep``)."""
    if USE_NATIVE_EFFICIENT:
        got = native.efficient(q, k, v, padding_mask, t)
        if got is not None:
            return got[0], (got[1:] if keep else None)
    B, H, Nk, D = k.shape
    Nq, Dv = q.shape[2], v.shape[-1]
    R = _efficient_rows(B, H, D, max(Nq, Nk))
    buf = q.new_empty(B, H, min(R, max(Nq, Nk, 1)), D)
    valid = None if padding_mask is None else padding_mask[:, None, :Nk]  # [B, 1, Nk]
    if valid is None:
        c = k.amax(-2, keepdim=True) if Nk else k.new_zeros(B, H, 1, D)
    else:
        c = k.new_full((B, H, 1, D), float("-inf"))
        for s0 in range(0, Nk, R):
            part = k[:, :, s0:s0 + R].masked_fill(~valid[:, :, s0:s0 + R, None], float("-inf"))
            c = torch.maximum(c, part.amax(-2, keepdim=True))
    c = c.mul_(t).nan_to_num_(neginf=0.0)  # t > 0; no real key: any shift (its weights are 0)
    A = q.new_zeros(B, H, D, Dv)
    z = q.new_zeros(B, H, 1, D)
    for s0 in range(0, Nk, R):
        r = min(R, Nk - s0)
        e = _key_weights(k, valid, s0, r, t, c, buf)
        z += e.sum(-2, keepdim=True)
        A += torch.matmul(e.transpose(-1, -2), v[:, :, s0:s0 + r])
    # rho_k = e / z per feature; a batch row without real keys has z = 0 and A = 0 -> C = 0
    C = A.div_(torch.where(z == 0, torch.ones_like(z), z).transpose(-1, -2))
    out = q.new_empty(B, H, Nq, Dv)
    for s0 in range(0, Nq, R):
        r = min(R, Nq - s0)
        torch.matmul(_query_weights(q, s0, r, t, buf), C, out=out[:, :, s0:s0 + r])
    return out, ((c, z, C) if keep else None)


class _EfficientAttention(torch.autograd.Function):
    """:func:`efficient_softmax_attention` with a streamed backward: both weight maps are
    recomputed chunk by chunk, nothing ``N``-sized is saved beyond the inputs."""

    @staticmethod
    def forward(ctx, q, k, v, t, padding_mask):
        out, (c, z, C) = _efficient_stream(q, k, v, t, padding_mask, keep=True)
        ctx.t, ctx.padding_mask = t, padding_mask
        ctx.save_for_backward(q, k, v, c, z, C)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, c, z, C = ctx.saved_tensors
        t, padding_mask = ctx.t, ctx.padding_mask
        if USE_NATIVE_EFFICIENT:
            got = native.efficient_backward(q, k, v, padding_mask, t, c, z, C, dout.contiguous(),
                                            ctx.needs_input_grad[:3])
            if got is not None:
                return (*got, None, None)
        B, H, Nk, D = k.shape
        Nq = q.shape[2]
        R = _efficient_rows(B, H, D, max(Nq, Nk))
        buf = q.new_empty(B, H, min(R, max(Nq, Nk, 1)), D)
        dq = torch.empty_like(q) if ctx.needs_input_grad[0] else None
        dC = torch.zeros_like(C)
        dout = dout.to(C.dtype)
        for s0 in range(0, Nq, R):
            r = min(R, Nq - s0)
            p = _query_weights(q, s0, r, t, buf)
            g = dout[:, :, s0:s0 + r]
            dC += torch.matmul(p.transpose(-1, -2), g)
            if dq is not None:  # softmax backward: t · p ⊙ (dp - rowsum(dp ⊙ p))
                pdp = torch.matmul(g, C.transpose(-1, -2)).mul_(p)
                rows = dq[:, :, s0:s0 + r]
                torch.addcmul(pdp, p, pdp.sum(-1, keepdim=True), value=-1.0, out=rows).mul_(t)
        if not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            return dq, None, None, None, None
        # C = A / z: dA = dC / z, dz = -rowsum(dC ⊙ C) / z (z = 0 only where e = 0)
        zs = torch.where(z == 0, torch.ones_like(z), z)  # [B, H, 1, D]
        dA = dC / zs.transpose(-1, -2)  # [B, H, D, Dv]
        dz = -(dC * C).sum(-1)[:, :, None] / zs  # [B, H, 1, D]
        dk = torch.empty_like(k) if ctx.needs_input_grad[1] else None
        dv = torch.empty_like(v) if ctx.needs_input_grad[2] else None
        valid = None if padding_mask is None else padding_mask[:, None, :Nk]
        for s0 in range(0, Nk, R):
            r = min(R, Nk - s0)
            e = _key_weights(k, valid, s0, r, t, c, buf)
            if dv is not None:
                torch.matmul(e, dA, out=dv[:, :, s0:s0 + r])
            if dk is not None:  # d(t·k) = e ⊙ (v dA^T + dz)
                de = torch.matmul(v[:, :, s0:s0 + r], dA.transpose(-1, -2)).add_(dz)
                torch.mul(de, e, out=dk[:, :, s0:s0 + r]).mul_(t)
        return dq, dk, dv, None, None


def efficient_softmax_attention(q, k, v, t: float, padding_mask=None):
    """Shen et al.'s ``rho_q(Q) (rho_k(K)^T V)`` streamed over positions: ``rho_q`` is the
    softmax of each ``t·q_i`` over its features, ``rho_k`` the softmax of each feature of
    ``t·k`` over the real key positions.  ``q [B,H,Nq,D]``, ``k [B,H,Nk,D]``,
    ``v [B,H,Nk,Dv]`` (one floating dtype; padded rows finite), ``t > 0``,
    ``padding_mask`` bool ``[B, Nk]`` (True = real key) -> ``out [B,H,Nq,Dv]``; a batch
    row without real keys outputs zeros.

    Two passes over the keys (the per-feature maximum, then cache-sized chunks of
    ``exp(t·k - max)`` into ``sum_j e_j v_j^T`` and ``z = sum_j e_j``) and one over the
    queries (a chunk's softmax times ``C = (sum_j e_j v_j^T) / z``): no ``N``-sized
    temporary.  Since ``sum_d rho_q = 1`` and every ``rho_k`` column sums to 1, the
    kernel needs no further normalizer.  The backward recomputes both maps by chunks."""
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        return _EfficientAttention.apply(q, k, v, t, padding_mask)
    return _efficient_stream(q, k, v, t, padding_mask, keep=False)[0]


def orthogonal_gaussian(m: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """FAVOR+ projection ``W [m, d]`` (float64, CPU): stacked blocks of orthonormal rows
    (QR of a Gaussian ``d x d``), each row scaled by the norm of an independent
    ``N(0, I_d)`` vector (chi-distributed), so rows are marginally Gaussian."""
    blocks = []
    for _ in range(-(-m // d)):
        g = torch.randn(d, d, generator=generator, dtype=torch.float64)
        qm, rm = torch.linalg.qr(g)
        # sign fix: makes Q Haar-distributed (raw LAPACK QR is not, and biases the estimate)
        qm = qm * torch.sign(torch.diagonal(rm))[None, :]
        blocks.append(qm.T)
    w = torch.cat(blocks, 0)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=1)
    return w * norms[:, None]


_FIXED_CACHE: dict = {}
_REDRAW_GENERATORS: dict = {}


def reset_feature_generators() -> None:
    """Restart every ``redraw=True`` feature stream from its seed."""
    _REDRAW_GENERATORS.clear()


def performer_projection(n_features: int, dim: int, *, seed: int, redraw: bool,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The random projection ``W [n_features, dim]`` (float64, CPU) for one call.

    ``generator`` given: drawn from it (it advances).  ``redraw=False``: the same matrix for
    a given ``seed`` every call.  ``redraw=True``: a new matrix per call from a
    process-wide generator per ``seed`` (advancing; :func:`reset_feature_generators`
    restarts it), so a sequence of calls is reproducible from ``seed``.
    """
    if generator is not None:
        return orthogonal_gaussian(n_features, dim, generator)
    if redraw:
        g = _REDRAW_GENERATORS.get(seed)
        if g is None:
            g = _REDRAW_GENERATORS[seed] = torch.Generator().manual_seed(seed)
        return orthogonal_gaussian(n_features, dim, g)
    key = (seed, n_features, dim)
    w = _FIXED_CACHE.get(key)
    if w is None:
        if len(_FIXED_CACHE) > 64:
            _FIXED_CACHE.clear()
        w = _FIXED_CACHE[key] = orthogonal_gaussian(n_features, dim, torch.Generator().manual_seed(seed))
    return w


def performer_logits(x: torch.Tensor, w: torch.Tensor, r: float = 1.0,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Log of the positive FAVOR+ features of ``r·x``: ``w·(r x) - |r x|²/2``;
    ``x [B,H,N,D]``, ``w [M, D]`` -> ``[B,H,N,M]`` (written into ``out``, contiguous
    ``[B,H,N,M]``, when given; not differentiable then).  ``r`` is folded into ``w`` and
    the norm term, so no scaled copy of ``x`` is made (or kept for backward); the result
    is a fresh tensor shifted in place (matmul's backward needs only its inputs)."""
    # adding the negated norm term: its gradient is then a sum of the incoming gradient,
    # not a full-size negation first (SubBackward) and the sum
    u = torch.matmul(x, (w * r).T) if out is None else torch.matmul(x, (w * r).T, out=out)
    return u.add_((-0.5 * r * r) * torch.linalg.vector_norm(x, dim=-1, keepdim=True).square())


def performer_features(x: torch.Tensor, w: torch.Tensor, kind: str, is_query: bool,
                       r: float = 1.0, out: Optional[torch.Tensor] = None):
    """FAVOR+ features of ``r·x`` (``x [B,H,N,D]``; ``r = scale ** 0.5``) for the
    projection ``w [M, D]``.  Returns ``(psi, log_scale)``: the features are
    ``exp(log_scale)[..., None] * psi``; for queries any per-query factor cancels in the
    normalized output, so ``log_scale`` is ``None``.

    - ``"softmax"``: ``exp(w·x - |x|²/2) / sqrt(M)`` (positive), ``psi [B,H,N,M]``,
      stabilized by the (gradient-free) max over features;
    - ``"trig"``: ``exp(|x|²/2) [sin(w·x), cos(w·x)] / sqrt(M)``, ``psi [B,H,N,2M]``.
    The constant ``1/sqrt(M)`` cancels in the normalization and is dropped.  ``out``
    (``"softmax"`` only, no gradient): a contiguous ``[B,H,N,M]`` tensor ``psi`` is
    written into.
    """
    if kind == "softmax":
        u = performer_logits(x, w, r, out=out)
        m = u.detach().amax(-1, keepdim=True)
        psi = exp_(u, m)  # in place: exp2_'s backward needs only its result
        return psi, (None if is_query else m[..., 0])
    proj = torch.matmul(x, (w * r).T)  # [B, H, N, M]
    psi = torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)
    return psi, (None if is_query else (0.5 * r * r) * x.pow(2).sum(-1))


class PerformerSoftmaxMap(StreamMap):
    """FAVOR+ positive features of ``r·x`` (:func:`performer_features`, ``"softmax"``)
    as a :class:`StreamMap`: queries return the features stabilized by their own maximum,
    keys the logits ``u`` (log form) for the stream to stabilize.  Both backwards are
    ``du = dfeat ⊙ feat`` (the features are ``exp(u - const)``) followed by the logits'
    ``dx = du (r W) - r² x rowsum(du)`` and ``dW = r duᵀ x``; inputs ``(x, W [M, D])``."""

    def __init__(self, r: float, is_query: bool):
        self.r, self.is_query = r, is_query

    def __call__(self, x, w, out=None):
        if self.is_query:
            return performer_features(x, w, "softmax", is_query=True, r=self.r, out=out)[0]
        return None, performer_logits(x, w, self.r, out=out)

    def backward(self, x_parts, params, feat, dfeat, rows, p_grads):
        (x,), (w,), (dx,) = x_parts, params, rows
        du = dfeat.mul_(feat)  # [B, H, r, M]
        if dx is not None:
            _matmul_into(du, w * self.r, dx).addcmul_(x, du.sum(-1, keepdim=True),
                                                      value=-self.r * self.r)
        if w.requires_grad:
            dw = torch.matmul(du.transpose(-1, -2), x).sum((0, 1)).mul_(self.r)
            p_grads[0] = dw if p_grads[0] is None else p_grads[0].add_(dw)


#: whether non-causal attention with Performer's positive features, ``elu + 1`` (linear) or
#: Taylor's features runs on the native kernel where it serves (``feature_attention.c``:
#: float32 on the CPU, widths on the vector width, a Performer projection without
#: gradient); False: always the stream above with the kinds' :class:`StreamMap` (its twin)
USE_NATIVE_FEATURES = True


#: the names in :mod:`effattn.native` of the kernels of each direction (causal?): (forward,
#: backward)
_NATIVE_PASSES = {False: ("feature_attention", "feature_attention_backward"),
                  True: ("causal_feature_attention", "causal_feature_attention_backward")}


def _native_pass(causal: bool, which: int):
    """The native kernel function of ``causal`` attention, forward (0) or backward (1)."""
    return getattr(native, _NATIVE_PASSES[causal][which])


class _NativeFeatures(torch.autograd.Function):
    """:func:`effattn.native.feature_attention` (``causal``:
    :func:`effattn.native.causal_feature_attention`) with its backward (the features
    recomputed there; only the output and the kernel's small statistics are kept)."""

    @staticmethod
    def forward(ctx, kind, causal, q, k, v, wr, h, padding_mask):
        out, *stats = _native_pass(causal, 0)(kind, q, k, v, padding_mask, wr, h)
        ctx.kind, ctx.causal, ctx.h, ctx.padding_mask = kind, causal, h, padding_mask
        ctx.n_stats, ctx.has_wr = len(stats), wr is not None
        ctx.save_for_backward(q, k, v, out, *stats, *(() if wr is None else (wr,)))
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, *rest = ctx.saved_tensors
        stats, wr = rest[:ctx.n_stats], rest[ctx.n_stats] if ctx.has_wr else None
        got = _native_pass(ctx.causal, 1)(ctx.kind, q, k, v, ctx.padding_mask, wr, ctx.h, out, *stats,
                                            dout.to(out.dtype).contiguous(), ctx.needs_input_grad[2:5])
        if got is None:  # the forward's tensors served, so only a failed build lands here
            raise RuntimeError("effattn.native: the feature-attention backward declined the forward's tensors")
        return (None, None, *got, None, None, None)


def _native_features(kind: str, q, k, v, padding_mask, w=None, r: float = 1.0,
                     causal: bool = False) -> Optional[torch.Tensor]:
    """Feature-map attention of ``q, k [B, H, N·, D]``, ``v [B, H, Nk, Dv]`` (padded rows
    zero) on the native kernels (``kind`` as :func:`effattn.native.feature_attention`;
    ``"favor"`` with the projection ``w [M, D]`` and ``r = scale ** 0.5``; ``causal``:
    :func:`effattn.native.causal_feature_attention`) -> ``out [B, H, Nq, Dv]``, or None where
    they do not serve (:data:`USE_NATIVE_FEATURES` off, ``w`` requiring grad, tensors they
    do not take)."""
    if not USE_NATIVE_FEATURES or (w is not None and w.requires_grad):
        return None
    wr = None if w is None else (w * r).contiguous()
    if not native.feature_attention_serves(kind, q, k, v, padding_mask, wr):
        return None
    h = 0.5 * r * r if w is not None else 0.0
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _NativeFeatures.apply(kind, causal, q, k, v, wr, h, padding_mask)
    if causal:  # no states kept: nothing will be differentiated
        return native.causal_feature_attention(kind, q, k, v, padding_mask, wr, h, keep_states=False)[0]
    return native.feature_attention(kind, q, k, v, padding_mask, wr, h)[0]


# --------------------------------------------------------------------------- methods

def _flops_path(B, H, Nq, Nk, M, Dv, causal, chunk):
    """Multiply-adds x 2 of the shared path for ``M`` features."""
    if not causal:
        return 2.0 * B * H * (Nk * M * (Dv + 1) + Nq * M * (Dv + 1))
    C = min(chunk, max(Nq, Nk))
    L = -(-max(Nq, Nk) // C) * C
    intra = L * C * (M + Dv + 1)
    states = L * M * (Dv + 1) + L * M * (Dv + 1)
    return 2.0 * B * H * (intra + states)


def _apply_map(phi, q, k, v, M, causal, padding_mask, chunk, maps=None, native_kind=None):
    """One feature map ``phi`` (``[..., D] -> [..., M]``, the same for queries and keys)
    through the shared path: on the native kernels' ``native_kind`` where they serve, else
    causal on whole feature tensors, non-causal streamed (with ``maps = (query map, key
    map)`` when given, e.g. :class:`StreamMap` objects)."""
    if native_kind is not None:
        got = _native_features(native_kind, q, k, v, padding_mask, causal=causal)
        if got is not None:
            return got
    if causal:
        return feature_map_attention(phi(q), phi(k), v, causal=True, padding_mask=padding_mask,
                                     chunk=chunk)
    q_map, k_map = maps or (phi, lambda x: (phi(x), None))
    return streamed_feature_attention((q,), (k,), v, q_map, k_map, n_features=M,
                                      padding_mask=padding_mask)


def _prep(q, k, v, padding_mask):
    cdt = stat_dtype(q.dtype)
    return (q.to(cdt), zero_padded(k.to(cdt), padding_mask), zero_padded(v.to(cdt), padding_mask))


def linear_attention(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk, chunk=64):
    """Katharopoulos et al. linear attention, ``phi = elu + 1``.  ``q [B,H,Nq,D]``,
    ``k [B,H,Nk,D]``, ``v [B,H,Nk,Dv]`` -> ``(out [B,H,Nq,Dv], None)``.  The kernel has no
    temperature: ``scale`` does not change the result."""
    _check_chunk(chunk)
    qc, kc, vc = _prep(q, k, v, padding_mask)
    out = _apply_map(linear_features, qc, kc, vc, q.shape[-1], causal, padding_mask, chunk,
                     maps=(LinearMap(is_query=True), LinearMap(is_query=False)), native_kind="elu")
    return out.to(q.dtype), None


def taylor_attention(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk, chunk=64):
    """Li et al. first-order Taylor attention
    ``o_i = (sum_j v_j + q̂_i^T sum_j k̂_j v_j^T) / (N + q̂_i^T sum_j k̂_j)`` over real (and,
    causal, earlier) keys, with L2-normalized ``q̂, k̂`` (so ``scale`` has no effect).
    Shapes as :func:`linear_attention`."""
    _check_chunk(chunk)
    qc, kc, vc = _prep(q, k, v, padding_mask)
    out = _apply_map(taylor_features, qc, kc, vc, q.shape[-1] + 1, causal, padding_mask, chunk,
                     maps=(TaylorMap(is_query=True), TaylorMap(is_query=False)), native_kind="taylor")
    return out.to(q.dtype), None


def efficient_attention(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk):
    """Shen et al. efficient attention ``rho_q(Q) (rho_k(K)^T V)``; both softmaxes use
    the temperature ``sqrt(scale)`` on their inputs (``scale=1`` is the paper's form).
    Non-causal only.  Shapes as :func:`linear_attention`."""
    qc, kc, vc = _prep(q, k, v, padding_mask)
    out = efficient_softmax_attention(qc, kc, vc, math.sqrt(scale), padding_mask)
    return out.to(q.dtype), None


PERFORMER_KERNELS = ("softmax", "trig")


def _check_performer(n_features, kernel, redraw, seed, generator, projection, D):
    if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
        raise ValueError(f"n_features: expected a positive int, got {n_features!r}")
    if kernel not in PERFORMER_KERNELS:
        raise ValueError(f"kernel: expected one of {PERFORMER_KERNELS}, got {kernel!r}")
    if not isinstance(redraw, bool):
        raise TypeError(f"redraw: expected bool, got {type(redraw).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if projection is not None:
        if not isinstance(projection, torch.Tensor) or not projection.is_floating_point():
            raise TypeError("projection: expected a floating tensor [n_features, D]")
        if projection.dim() != 2 or projection.shape[1] != D:
            raise ValueError(f"projection: expected shape [M, D={D}], got {tuple(projection.shape)}")


def performer_attention(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk,
                        n_features=256, kernel="softmax", redraw=False, seed=0, generator=None,
                        projection=None, chunk=64):
    """Performer FAVOR+: random features whose inner products estimate
    ``exp(q·k·scale)``, hence ``softmax(Q K^T scale) V`` as ``n_features`` grows.

    ``q [B,H,Nq,D]``, ``k [B,H,Nk,D]``, ``v [B,H,Nk,Dv]`` -> ``(out [B,H,Nq,Dv], None)``.
    ``kernel="softmax"``: positive orthogonal random features; ``"trig"``: sin/cos random
    Fourier features (unbiased but not positive: denominators can be near zero).
    Projection: ``projection`` (explicit ``[M, D]``) else drawn per
    :func:`performer_projection` from ``generator`` / ``seed`` / ``redraw``.
    """
    D = q.shape[-1]
    _check_performer(n_features, kernel, redraw, seed, generator, projection, D)
    _check_chunk(chunk)
    qc, kc, vc = _prep(q, k, v, padding_mask)
    if projection is None:
        projection = performer_projection(n_features, D, seed=seed, redraw=redraw, generator=generator)
    w = projection.to(device=qc.device, dtype=qc.dtype)
    r = scale ** 0.5
    if kernel == "softmax" and (got := _native_features("favor", qc, kc, vc, padding_mask, w, r,
                                                        causal=causal)) is not None:
        out = got
    elif causal:
        phi_q, _ = performer_features(qc, w, kernel, is_query=True, r=r)
        phi_k, k_log = performer_features(kc, w, kernel, is_query=False, r=r)
        out = feature_map_attention(phi_q, phi_k, vc, causal=True, padding_mask=padding_mask,
                                    k_log=k_log, chunk=chunk)
    else:
        if kernel == "softmax":
            maps = (PerformerSoftmaxMap(r, is_query=True), PerformerSoftmaxMap(r, is_query=False))
        else:
            maps = (lambda x, w_: performer_features(x, w_, kernel, is_query=True, r=r)[0],
                    lambda x, w_: performer_features(x, w_, kernel, is_query=False, r=r))
        out = streamed_feature_attention(
            (qc,), (kc,), vc, *maps,
            n_features=w.shape[0] * (2 if kernel == "trig" else 1), padding_mask=padding_mask,
            params=(w,))
    return out.to(q.dtype), None


def _linear_flops(B, H, Nq, Nk, D, Dv, causal=False, chunk=64, **_):
    return _flops_path(B, H, Nq, Nk, D, Dv, causal, chunk)


def _taylor_flops(B, H, Nq, Nk, D, Dv, causal=False, chunk=64, **_):
    return _flops_path(B, H, Nq, Nk, D + 1, Dv, causal, chunk)


def _efficient_flops(B, H, Nq, Nk, D, Dv, causal=False, **_):
    return _flops_path(B, H, Nq, Nk, D, Dv, False, 1)


def _performer_flops(B, H, Nq, Nk, D, Dv, causal=False, n_features=256, kernel="softmax",
                     chunk=64, **_):
    M = n_features * (2 if kernel == "trig" else 1)
    return 2.0 * B * H * (Nq + Nk) * n_features * D + _flops_path(B, H, Nq, Nk, M, Dv, causal, chunk)


_PATH_FORMULA = ("2·B·H·(Nq+Nk)·M·(Dv+1); causal: + 2·B·H·N·chunk·(M+Dv+1)")
_COMMON = dict(exact=False, family="kernel", shared_qk=False, lse=False)

register(
    "linear", causal=True, time="O(N·D·Dv); causal + O(N·chunk·D)", memory="O(N·D + (N/chunk)·D·Dv)",
    flops=_linear_flops, flops_formula=_PATH_FORMULA + ", M = D", options={"chunk": 64},
    description="Katharopoulos et al. linear attention, phi(x) = elu(x)+1; causal by chunked prefix sums",
    **_COMMON,
)(linear_attention)

register(
    "taylor", causal=True, time="O(N·D·Dv); causal + O(N·chunk·D)", memory="O(N·D + (N/chunk)·D·Dv)",
    flops=_taylor_flops, flops_formula=_PATH_FORMULA + ", M = D+1", options={"chunk": 64},
    description="Li et al. first-order Taylor attention, kernel 1 + q̂·k̂ with L2-normalized q, k",
    **_COMMON,
)(taylor_attention)

register(
    "efficient", causal=False, time="O(N·D·Dv)", memory="O(N·D + D·Dv)",
    flops=_efficient_flops, flops_formula=_PATH_FORMULA + ", M = D (non-causal)", options={},
    description="Shen et al. efficient attention: softmax_features(Q)·(softmax_positions(K)ᵀ·V)",
    causal_error=("Its key softmax normalizes over all positions, so every key feature "
                  "depends on future keys."),
    **_COMMON,
)(efficient_attention)

register(
    "performer", causal=True, time="O(N·M·(D+Dv))", memory="O(N·M + (N/chunk)·M·Dv)",
    flops=_performer_flops,
    flops_formula="2·B·H·(Nq+Nk)·m·D + " + _PATH_FORMULA + ", M = m (trig: 2m)",
    options={"n_features": 256, "kernel": "softmax", "redraw": False, "seed": 0,
             "generator": None, "projection": None, "chunk": 64},
    description="Performer FAVOR+: positive orthogonal random features (or trig RFF) approximating softmax",
    random=True, **_COMMON,
)(performer_attention)
