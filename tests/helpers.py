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


def nystrom_native_and_twin(module, flag: str, cut: int):
    """Output and input gradients of ``effattn.attention(..., "nystrom")`` (B=2, H=2,
    N=256, D=64, 32 landmarks, batch 1 padded from ``cut``; a loss of ones) with
    ``module.<flag>`` True, then False: ``[[out, dq, dk, dv] (native), [...] (twin)]``."""
    import effattn
    import pytest

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 256, 64, generator=g) for _ in range(3))
    pm = torch.ones(2, 256, dtype=torch.bool)
    pm[1, cut:] = False
    res = []
    for use in (True, False):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module, flag, use)
            out = effattn.attention(*xs, "nystrom", padding_mask=pm, n_landmarks=32)
            out.backward(torch.ones_like(out))
        res.append([out.detach()] + [x.grad for x in xs])
    return res
