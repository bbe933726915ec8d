"""Nyströmformer's landmark part on the native kernel (``effattn.native.nystrom_core`` and
its backward): the same output and gradients as the torch twin
(``effattn.mechanisms.lowrank._nystrom_core_torch``, differentiated by autograd through
the softmax, the normalizer's maxima and every pseudo-inverse iteration) for any landmark
count, width, iteration count and empty landmarks, used by the ``nystrom`` method, and a
clean decline for what it does not take."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from effattn import native
from effattn.mechanisms import lowrank
from tests.helpers import nystrom_native_and_twin, record_served, native_vector_width as _vw

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")



def _run(xs, k_valid, q_valid, scale, iters, use_native, seed):
    """``(w, (dql, dkl, dk3v))`` through the kernel or the torch twin."""
    xs = [x.clone().requires_grad_(True) for x in xs]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lowrank, "USE_NATIVE_CORE", use_native)
        w = lowrank.nystrom_core(*xs, k_valid, q_valid, scale, iters)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)).to(w.dtype)  # alike in float32 and 64
    return w.detach(), torch.autograd.grad(w, xs, g)


@settings(deadline=None, max_examples=40)
@given(B=st.integers(1, 2), H=st.integers(1, 3), lmul=st.sampled_from([1, 2, 4]),
       dmul=st.sampled_from([(1, 1), (4, 4), (2, 1)]), iters=st.integers(0, 8),
       kmask=st.sampled_from([None, "batch", "shared", "empty batch"]), qmask=st.booleans(),
       magnitude=st.sampled_from([0.3, 1.0, 3.0]), seed=st.integers(0, 9999))
def test_native_core_equals_its_torch_twin(B, H, lmul, dmul, iters, kmask, qmask, magnitude, seed):
    """Output and gradients within float32 rounding of the torch twin, both held to the
    float64 result: empty key landmarks (left out of the softmax; a batch with none: zeros
    and zero gradients) and empty query landmarks (rows zeroed), 0 to 8 iterations."""
    L, D, Dv = lmul * _vw(), dmul[0] * _vw(), dmul[1] * _vw()
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, H, L, d, generator=g) * m for d, m in ((D, magnitude), (D, magnitude), (Dv, 1.0))]
    k_valid = torch.ones(1, L, dtype=torch.bool)
    if kmask is not None:
        k_valid = torch.rand(B if kmask != "shared" else 1, L, generator=g) > 0.3
        if kmask == "empty batch":
            k_valid[-1] = False
    q_valid = torch.rand(1, L, generator=g) > 0.3 if qmask else torch.ones(1, L, dtype=torch.bool)
    scale = 0.125
    out, grads = _run(xs, k_valid, q_valid, scale, iters, True, seed)
    ref, ref_grads = _run(xs, k_valid, q_valid, scale, iters, False, seed)
    exact, exact_grads = _run([x.double() for x in xs], k_valid, q_valid, scale, iters, False, seed)
    for a, b, x in zip((out, *grads), (ref, *ref_grads), (exact, *exact_grads)):
        assert torch.isfinite(a).all()
        err, twin_err = (a.double() - x).abs().max().item(), (b.double() - x).abs().max().item()
        floor = 1e-5 * max(1.0, x.abs().max().item())
        assert err <= 4 * twin_err + floor, (err, twin_err, floor)
    if kmask == "empty batch" and B > 1:
        assert not out[-1].any() and not any(x[-1].any() for x in grads)


def test_native_core_gradients_pass_gradcheck_of_its_forward():
    """The backward is the derivative of the forward it runs: finite differences of the
    native forward (float32, so a loose tolerance) against its analytic gradients,
    including the normalizer's maxima and three iterations."""
    vw = _vw()
    g = torch.Generator().manual_seed(3)
    ql, kl, k3v = (torch.randn(1, 1, vw, vw, generator=g) * 0.5 for _ in range(3))
    valid = torch.ones(1, vw, dtype=torch.bool)
    dw = torch.randn(1, 1, vw, vw, generator=g)
    grads = native.nystrom_core_backward(ql, kl, k3v, valid, valid, 0.5, 3, dw)

    def f(x, i):
        args = [ql, kl, k3v]
        args[i] = x
        return (native.nystrom_core(*args, valid, valid, 0.5, 3).double() * dw.double()).sum().item()

    for i, x0 in enumerate((ql, kl, k3v)):
        for idx in [(0, 0, 0, 0), (0, 0, vw - 1, 3), (0, 0, 5, vw - 1)]:
            eps = 1e-2
            xp, xm = x0.clone(), x0.clone()
            xp[idx] += eps
            xm[idx] -= eps
            fd = (f(xp, i) - f(xm, i)) / (2 * eps)
            assert abs(fd - grads[i][idx].item()) <= 2e-2 * max(1.0, abs(fd)), (i, idx, fd, grads[i][idx].item())


def test_nystrom_runs_its_core_on_the_kernel(monkeypatch):
    """``effattn.attention(..., "nystrom")`` with padding runs the landmark part on the
    kernel forward and backward, and equals the twin."""
    calls = record_served(monkeypatch, native, ("nystrom_core", "nystrom_core_backward"))
    res = nystrom_native_and_twin(lowrank, "USE_NATIVE_CORE", 180)  # empty landmarks in batch 1
    assert calls == [("nystrom_core", True), ("nystrom_core_backward", True)]
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_native_core_declines_what_it_does_not_take():
    """None (the torch twin runs) for float64 or non-contiguous tensors, a landmark count
    or widths off the vector width, validity rows of another shape or dtype."""
    vw = _vw()
    x = torch.randn(1, 2, vw, vw)
    ok = torch.ones(1, vw, dtype=torch.bool)
    assert native.nystrom_core(x, x, x, ok, ok, 1.0, 2) is not None
    assert native.nystrom_core(x, x, x, None, None, 1.0, 2) is not None
    assert native.nystrom_core(x.double(), x.double(), x.double(), ok, ok, 1.0, 2) is None
    assert native.nystrom_core(x.transpose(2, 3), x, x, ok, ok, 1.0, 2) is None
    y = torch.randn(1, 2, vw - 4, vw)
    assert native.nystrom_core(y, y, y, ok[:, 4:], ok[:, 4:], 1.0, 2) is None
    assert native.nystrom_core(x, x, x, ok.float(), ok, 1.0, 2) is None
    assert native.nystrom_core(x, x, x, ok, torch.ones(3, vw, dtype=torch.bool), 1.0, 2) is None
    assert native.nystrom_core_backward(x, x, x, ok, ok, 1.0, 2, torch.randn(1, 2, vw, 2 * vw)) is None


@pytest.mark.parametrize("iters", [0, 2])
def test_native_core_shares_tied_maxima_like_torch(iters):
    """Two identical key landmarks that dominate every query's softmax make the two largest
    column sums of ``K`` tie exactly: the normalizer's gradient is shared evenly between
    the tied columns, as torch's ``amax`` does (each getting all of it changes the
    gradients)."""
    vw = _vw()
    g = torch.Generator().manual_seed(5)
    ql = torch.randn(1, 2, vw, vw, generator=g)
    kl = torch.randn(1, 2, vw, vw, generator=g) * 0.3
    kl[:, :, 1] = kl[:, :, 0] = ql.mean(2) * 2  # aligned with the queries on average
    k3v = torch.randn(1, 2, vw, vw, generator=g)
    valid = torch.ones(1, vw, dtype=torch.bool)
    out, grads = _run((ql, kl, k3v), valid, valid, 0.25, iters, True, 0)
    ref, ref_grads = _run((ql, kl, k3v), valid, valid, 0.25, iters, False, 0)
    exact, exact_grads = _run((ql.double(), kl.double(), k3v.double()), valid, valid, 0.25, iters, False, 0)
    for a, b, x in zip((out, *grads), (ref, *ref_grads), (exact, *exact_grads)):
        err, twin_err = (a.double() - x).abs().max().item(), (b.double() - x).abs().max().item()
        assert err <= 4 * twin_err + 1e-5 * max(1.0, x.abs().max().item()), (err, twin_err)
