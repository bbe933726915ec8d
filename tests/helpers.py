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
