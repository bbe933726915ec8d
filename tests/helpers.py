"""Small utilities shared by the test modules (references live in the library, not here)."""

from __future__ import annotations

import torch


def rand_qkv(B=2, H=3, Nq=17, Nk=None, D=8, Dv=None, dtype=torch.float64, grad=False, seed=0):
    """Random ``q [B,H,Nq,D]``, ``k [B,H,Nk,D]``, ``v [B,H,Nk,Dv]``."""
    g = torch.Generator().manual_seed(seed)
    Nk = Nq if Nk is None else Nk
    Dv = D if Dv is None else Dv
    q = torch.randn(B, H, Nq, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, Nk, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, Nk, Dv, generator=g, dtype=dtype)
    if grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


def random_padding(B, N, p_real=0.7, seed=0, empty_row=None):
    """Bool ``[B, N]`` padding mask (True = real); ``empty_row`` gets no real token."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(B, N, generator=g) < p_real
    m[:, 0] |= empty_row is None
    if empty_row is not None:
        m[empty_row] = False
    return m


def finite_lse(lse):
    """``lse`` with ``-inf`` (empty rows) replaced by 0, for use in a loss."""
    return lse.masked_fill(torch.isinf(lse), 0.0)


def record_served(monkeypatch, module, names):
    """Wrap each ``module.<name>`` (functions that return None where they do not serve)
    so that every call appends ``(name, served)`` to the returned list, in call order."""
    got = []

    def counted(name, real):
        def call(*a, **kw):
            res = real(*a, **kw)
            got.append((name, res is not None))
            return res
        return call

    for name in names:
        monkeypatch.setattr(module, name, counted(name, getattr(module, name)))
    return got


def native_and_twin(module, flag: str, method: str, q, k, v, padding_mask, **opts):
    """Output and input gradients of ``effattn.attention(q, k, v, method, ...)`` (a loss
    of ones) with ``module.<flag>`` True, then False: ``[[out, dq, dk, dv] (native), [...]
    (twin)]``."""
    import effattn
    import pytest

    res = []
    for use in (True, False):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module, flag, use)
            out = effattn.attention(*xs, method, padding_mask=padding_mask, **opts)
            out.backward(torch.ones_like(out))
        res.append([out.detach()] + [x.grad for x in xs])
    return res


def nystrom_native_and_twin(module, flag: str, cut: int):
    """:func:`native_and_twin` of ``"nystrom"`` with 32 landmarks, B=2, H=2, N=256, D=64,
    batch 1 padded from ``cut``."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 256, 64, generator=g) for _ in range(3))
    pm = torch.ones(2, 256, dtype=torch.bool)
    pm[1, cut:] = False
    return native_and_twin(module, flag, "nystrom", q, k, v, pm, n_landmarks=32)


def native_vector_width() -> int:
    """The float32 lanes of the loaded native kernels' vectors (16 with AVX-512, else 8):
    the multiple their widths must be."""
    from effattn import native

    return native._library().effattn_lsh_vector_width()


def assert_near_twin(ours, twin, exact, rel_floor: float) -> None:
    """A native kernel's results ``ours`` (float32 tensors) against its torch twin's
    ``twin``, both held to the float64 ``exact``: each finite, and no further from it than
    4x the twin's own error plus ``rel_floor · max(1, max|exact|)`` (the rounding a kernel
    may add on top of the twin's, e.g. of exponents as large as the scores)."""
    for a, b, x in zip(ours, twin, exact):
        assert torch.isfinite(a).all()
        err, twin_err = (a.double() - x).abs().max().item(), (b.double() - x).abs().max().item()
        floor = rel_floor * max(1.0, x.abs().max().item())
        assert err <= 4 * twin_err + floor, (err, twin_err, floor)


def assert_keyless_row_zero(out, grads, inputs, need) -> None:
    """The last batch row, which has no real key, outputs zeros and gives its keys and
    values zero gradients: ``out [B, ...]``, ``grads`` of the ``inputs = (q, k, v)`` that
    ``need`` marks."""
    assert not out[-1].any()
    for g, x in zip(grads, [x for x, n in zip(inputs, need) if n]):
        if x is not inputs[0]:
            assert not g[-1].any()
