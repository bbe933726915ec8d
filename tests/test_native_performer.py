"""Performer's native kernel (``effattn.native.performer`` and its backward): the same
output and gradients as the torch stream with :class:`PerformerSoftmaxMap` (its twin) for
any shape, padding, feature count, scale and thread split it takes, used by the
``performer`` method (non-causal, positive features), and a clean decline — to the twin —
for what it does not take."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import effattn
from effattn import native
from effattn.mechanisms import kernel
from tests.helpers import record_served

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")


def _vw() -> int:
    return native._library().effattn_lsh_vector_width()


@pytest.fixture
def calls(monkeypatch):
    """Every native Performer call's name and whether it served, in order."""
    return record_served(monkeypatch, native, ("performer", "performer_backward"))


def _inputs(B, H, Nq, Nk, D, Dv, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Nq, D, generator=g) * magnitude,
            torch.randn(B, H, Nk, D, generator=g) * magnitude,
            torch.randn(B, H, Nk, Dv, generator=g))


def _run(q, k, v, pm, need, use_native, g_seed, **opts):
    """``(out, grads)`` of the ``performer`` method through the kernel or the twin."""
    xs = [x.clone().requires_grad_(n) for x, n in zip((q, k, v), need)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel, "USE_NATIVE_PERFORMER", use_native)
        out = effattn.attention(*xs, "performer", padding_mask=pm, **opts)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(g_seed)).to(out.dtype)
        grads = torch.autograd.grad(out, [x for x in xs if x.requires_grad], g)
    return out.detach(), grads


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 2), H=st.integers(1, 3), Nq=st.integers(1, 150), Nk=st.integers(1, 150),
       dmul=st.sampled_from([(1, 1), (4, 4), (2, 1), (1, 3)]), mmul=st.sampled_from([1, 2, 5]),
       padded=st.booleans(), keyless=st.booleans(), magnitude=st.sampled_from([0.3, 1.0, 3.0]),
       scale=st.sampled_from([None, 0.02, 1.0]),
       need=st.sampled_from([(True, True, True), (True, False, False), (False, True, False),
                             (False, False, True), (False, True, True)]),
       seed=st.integers(0, 9999))
def test_native_performer_equals_its_torch_twin(calls, B, H, Nq, Nk, dmul, mmul, padded, keyless,
                                                magnitude, scale, need, seed):
    """Output and each wanted gradient within float32 rounding of the twin, both held to
    the float64 result, for lengths off every block size, feature counts off the
    specialized 256, padding (a batch row without a real key: zeros, zero key and value
    gradients), logits large enough that one key's features dominate (the running
    maximum) and any subset of gradients; and the kernel served both passes."""
    calls.clear()  # one fixture for every example
    D, Dv, M = dmul[0] * _vw(), dmul[1] * _vw(), mmul * _vw()
    q, k, v = _inputs(B, H, Nq, Nk, D, Dv, magnitude, seed)
    pm = None
    if padded:
        pm = torch.rand(B, Nk, generator=torch.Generator().manual_seed(seed)) > 0.3
        if keyless:
            pm[-1] = False
    opts = dict(n_features=M, seed=seed % 7, scale=scale)
    out, grads = _run(q, k, v, pm, need, True, seed, **opts)
    assert calls == [("performer", True), ("performer_backward", True)]
    ref, ref_grads = _run(q, k, v, pm, need, False, seed, **opts)
    exact, exact_grads = _run(q.double(), k.double(), v.double(), pm, need, False, seed, **opts)
    # large logits: a few features dominate and the gradients subtract near-equal terms,
    # so the floor grows with the logits' spread (as efficient attention's test)
    r2 = scale if scale is not None else D ** -0.5
    span = 1.0 + r2 * magnitude ** 2 * D
    for a, b, x in zip((out, *grads), (ref, *ref_grads), (exact, *exact_grads)):
        assert torch.isfinite(a).all()
        err, twin_err = (a.double() - x).abs().max().item(), (b.double() - x).abs().max().item()
        floor = 2e-6 * span * max(1.0, x.abs().max().item())
        assert err <= 4 * twin_err + floor, (err, twin_err, floor)
    if padded and keyless:
        assert not out[-1].any()
        for a, x in zip(grads, [x for x, n in zip((q, k, v), need) if n]):
            if x is not q:
                assert not a[-1].any()


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_native_performer_splits_heads_over_threads_alike(threads):
    """A single head's rows split into parts (each with its own running maximum, merged
    after) give the result of one pass, whatever the thread count: a key with a large
    logit late in the sequence rescales the earlier parts' sums, and a part without real
    keys adds nothing."""
    vw = _vw()
    q, k, v = _inputs(1, 1, 1000, 1000, vw, vw, 0.5, 7)
    k[0, 0, 900] *= 6.0
    pm = torch.ones(1, 1000, dtype=torch.bool)
    pm[0, :300] = False
    wr = torch.randn(4 * vw, vw, generator=torch.Generator().manual_seed(1)) * 0.5
    g = torch.randn(1, 1, 1000, vw)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.performer(q, k, v, pm, wr, 0.125)
        one_grads = native.performer_backward(q, k, v, pm, wr, 0.125, *one, g)
        torch.set_num_threads(threads)
        many = native.performer(q, k, v, pm, wr, 0.125)
        many_grads = native.performer_backward(q, k, v, pm, wr, 0.125, *many, g)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(many + many_grads, one + one_grads):  # sums in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
    logits = k[0, 0, 300:] @ wr.T - 0.125 * k[0, 0, 300:].pow(2).sum(-1, keepdim=True)
    torch.testing.assert_close(one[3][0, 0], logits.max(), rtol=1e-5, atol=1e-5)  # c


def test_native_performer_gradients_are_the_derivative_of_its_forward():
    """Finite differences of the native forward (float32, so central differences with a
    loose tolerance) against the native backward for a few coordinates of q, k and v,
    the key logits' norm term included."""
    vw = _vw()
    q, k, v = _inputs(1, 1, 9, 11, vw, vw, 0.7, 5)
    wr = torch.randn(2 * vw, vw, generator=torch.Generator().manual_seed(2)) * 0.4
    h = 0.3
    dout = torch.randn(1, 1, 9, vw, generator=torch.Generator().manual_seed(4))
    grads = native.performer_backward(q, k, v, None, wr, h, *native.performer(q, k, v, None, wr, h), dout)
    for i, x in enumerate((q, k, v)):
        for idx in ((0, 0, 0, 0), (0, 0, x.shape[2] - 1, vw - 1), (0, 0, 3, 2)):
            def loss(e):
                xs = [q, k, v]
                xs[i] = x.clone()
                xs[i][idx] += e
                return (native.performer(*xs, None, wr, h)[0].double() * dout.double()).sum().item()
            fd = (loss(1e-2) - loss(-1e-2)) / 2e-2
            assert abs(fd - grads[i][idx].item()) <= 2e-3 * max(1.0, abs(fd)), (i, idx, fd, grads[i][idx])


def test_performer_method_runs_on_the_kernel_and_matches_the_twin(calls):
    """``effattn.attention(..., "performer")`` with padding and its default 256 features
    goes through the kernel (forward and backward) and equals its twin; causal and trig
    Performer, and a projection that requires grad, keep the torch paths."""
    q, k, v = _inputs(2, 2, 97, 97, 64, 64, 1.0, 3)
    pm = torch.rand(2, 97, generator=torch.Generator().manual_seed(3)) > 0.2
    res = []
    for use in (True, False):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(kernel, "USE_NATIVE_PERFORMER", use)
            out = effattn.attention(*xs, "performer", padding_mask=pm)
            out.backward(torch.ones_like(out))
        res.append([out.detach()] + [x.grad for x in xs])
    assert calls == [("performer", True), ("performer_backward", True)]
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    calls.clear()
    effattn.attention(q, k, v, "performer", causal=True)
    effattn.attention(q, k, v, "performer", kernel="trig")
    w = kernel.performer_projection(256, 64, seed=0, redraw=False).float().requires_grad_(True)
    out = effattn.attention(q, k, v, "performer", projection=w)
    out.sum().backward()
    assert calls == [] and w.grad is not None and w.grad.abs().sum() > 0


def test_native_performer_declines_what_it_does_not_take():
    """None (the twin runs) for float64, non-contiguous or gradient-carrying tensors,
    widths or feature counts off the vector width, a projection of the wrong width, an
    empty side and a bad mask; the backward for statistics of the wrong shape."""
    vw = _vw()
    q, k, v = _inputs(1, 2, 8, 8, vw, vw, 1.0, 0)
    wr = torch.randn(2 * vw, vw)
    assert native.performer(q, k, v, None, wr, 0.1) is not None
    assert native.performer(q.double(), k.double(), v.double(), None, wr.double(), 0.1) is None
    assert native.performer(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, None, wr, 0.1) is None
    with torch.enable_grad():
        assert native.performer(q.clone().requires_grad_(True), k, v, None, wr, 0.1) is None
    assert native.performer(q, k, v, None, torch.randn(2 * vw + 4, vw), 0.1) is None
    assert native.performer(q, k, v, None, torch.randn(2 * vw, 2 * vw), 0.1) is None
    odd = torch.randn(1, 2, 8, vw + 4)
    assert native.performer(odd, odd, v, None, torch.randn(vw, vw + 4), 0.1) is None
    assert native.performer(q[:, :, :0], k, v, None, wr, 0.1) is None
    assert native.performer(q, k, v, torch.ones(1, 7, dtype=torch.bool), wr, 0.1) is None
    assert native.performer(q, k, v, torch.ones(1, 8), wr, 0.1) is None
    out, A, z, c = native.performer(q, k, v, None, wr, 0.1)
    g = torch.randn_like(out)
    assert native.performer_backward(q, k, v, None, wr, 0.1, out, A, z, c, g) is not None
    assert native.performer_backward(q, k, v, None, wr, 0.1, out, A, z[..., :-1], c, g) is None
    assert native.performer_backward(q, k, v, None, wr, 0.1, out, A, z, c.double(), g) is None
    assert native.performer_backward(q, k, v, None, wr, 0.1, out, A, z, c, torch.randn(1, 2, 9, vw)) is None
