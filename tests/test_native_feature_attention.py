"""The native feature-map attention kernel (``effattn.native.feature_attention`` and its
backward): the same output and gradients as the torch stream with the kind's
:class:`StreamMap` (its twin: :class:`PerformerSoftmaxMap`, :class:`LinearMap`,
:class:`TaylorMap`) for any shape, padding, feature count, scale and thread split it takes,
used by the non-causal ``performer`` (positive features), ``linear`` and ``taylor`` methods,
and a clean decline — to the twin — for what it does not take."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import effattn
from effattn import native
from effattn.mechanisms import kernel
from tests.helpers import (assert_keyless_row_zero, assert_near_twin, native_and_twin,
                           native_vector_width as _vw, random_padding, record_served)

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")



@pytest.fixture
def calls(monkeypatch):
    """Every native feature-attention call's name and whether it served, in order."""
    return record_served(monkeypatch, native, ("feature_attention", "feature_attention_backward"))


SERVED = [("feature_attention", True), ("feature_attention_backward", True)]
#: the methods on the kernel and their feature kinds
KINDS = {"performer": "favor", "linear": "elu", "taylor": "taylor"}


def _inputs(B, H, Nq, Nk, D, Dv, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Nq, D, generator=g) * magnitude,
            torch.randn(B, H, Nk, D, generator=g) * magnitude,
            torch.randn(B, H, Nk, Dv, generator=g))


def _run(method, q, k, v, pm, need, use_native, g_seed, **opts):
    """``(out, grads)`` of ``method`` through the kernel or the twin."""
    xs = [x.clone().requires_grad_(n) for x, n in zip((q, k, v), need)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel, "USE_NATIVE_FEATURES", use_native)
        out = effattn.attention(*xs, method, padding_mask=pm, **opts)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(g_seed)).to(out.dtype)
        grads = torch.autograd.grad(out, [x for x in xs if x.requires_grad], g)
    return out.detach(), grads


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(sorted(KINDS)), B=st.integers(1, 2), H=st.integers(1, 3), Nq=st.integers(1, 150), Nk=st.integers(1, 150),
       dmul=st.sampled_from([(1, 1), (4, 4), (2, 1), (1, 3)]), mmul=st.sampled_from([1, 2, 5]),
       padded=st.booleans(), keyless=st.booleans(), magnitude=st.sampled_from([0.3, 1.0, 3.0]),
       scale=st.sampled_from([None, 0.02, 1.0]),
       need=st.sampled_from([(True, True, True), (True, False, False), (False, True, False),
                             (False, False, True), (False, True, True)]),
       seed=st.integers(0, 9999))
def test_native_features_equal_their_torch_twin(calls, method, B, H, Nq, Nk, dmul, mmul, padded,
                                                keyless, magnitude, scale, need, seed):
    """Output and each wanted gradient within float32 rounding of the twin, both held to
    the float64 result, for each kind, lengths off every block size, widths and feature
    counts off the specialized ones, padding (a batch row without a real key: zeros, zero
    key and value gradients), Performer logits large enough that one key's features
    dominate (the running maximum) and any subset of gradients; and the kernel served both
    passes."""
    calls.clear()  # one fixture for every example
    D, Dv, M = dmul[0] * _vw(), dmul[1] * _vw(), mmul * _vw()
    q, k, v = _inputs(B, H, Nq, Nk, D, Dv, magnitude, seed)
    pm = random_padding(B, Nk, seed=seed, empty_row=B - 1 if keyless else None) if padded else None
    opts = dict(n_features=M, seed=seed % 7) if method == "performer" else {}
    out, grads = _run(method, q, k, v, pm, need, True, seed, scale=scale, **opts)
    assert calls == SERVED
    ref, ref_grads = _run(method, q, k, v, pm, need, False, seed, scale=scale, **opts)
    exact, exact_grads = _run(method, q.double(), k.double(), v.double(), pm, need, False, seed,
                              scale=scale, **opts)
    # large logits: a few features dominate and the gradients subtract near-equal terms,
    # so the floor grows with the logits' spread (as efficient attention's test)
    r2 = scale if scale is not None else D ** -0.5
    span = 1.0 + (r2 * magnitude ** 2 * D if method == "performer" else magnitude)
    assert_near_twin((out, *grads), (ref, *ref_grads), (exact, *exact_grads), 2e-6 * span)
    if padded and keyless:
        assert_keyless_row_zero(out, grads, (q, k, v), need)


def _kind_args(kind: str, D: int, seed: int):
    """``(wr, h)`` for ``kind``: a projection of 4 vector widths for ``"favor"``."""
    if kind != "favor":
        return None, 0.0
    return torch.randn(4 * _vw(), D, generator=torch.Generator().manual_seed(seed)) * 0.5, 0.125


@pytest.mark.parametrize("kind", sorted(native.FEATURE_KINDS))
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_native_features_split_heads_over_threads_alike(kind, threads):
    """A single head's rows split into parts (each with its own running maximum, merged
    after) give the result of one pass, whatever the thread count: a key with a large
    Performer logit late in the sequence rescales the earlier parts' sums, and a part
    without real keys adds nothing (and its keys, not zeroed here, get zero gradients)."""
    vw = _vw()
    q, k, v = _inputs(1, 1, 1000, 1000, vw, vw, 0.5, 7)
    k[0, 0, 900] *= 6.0
    pm = torch.ones(1, 1000, dtype=torch.bool)
    pm[0, :300] = False
    wr, h = _kind_args(kind, vw, 1)
    g = torch.randn(1, 1, 1000, vw)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.feature_attention(kind, q, k, v, pm, wr, h)
        one_grads = native.feature_attention_backward(kind, q, k, v, pm, wr, h, *one, g)
        torch.set_num_threads(threads)
        many = native.feature_attention(kind, q, k, v, pm, wr, h)
        many_grads = native.feature_attention_backward(kind, q, k, v, pm, wr, h, *many, g)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(many + many_grads, one + one_grads):  # sums in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
    assert not one_grads[1][0, 0, :300].any() and not one_grads[2][0, 0, :300].any()  # padded keys
    if kind == "favor":  # c: the largest logit of a real key
        logits = k[0, 0, 300:] @ wr.T - h * k[0, 0, 300:].pow(2).sum(-1, keepdim=True)
        torch.testing.assert_close(one[3][0, 0], logits.max(), rtol=1e-5, atol=1e-5)
    else:
        assert not one[3].any()


@pytest.mark.parametrize("kind", sorted(native.FEATURE_KINDS))
def test_native_feature_gradients_are_the_derivative_of_its_forward(kind):
    """Finite differences of the native forward (float32, so central differences with a
    loose tolerance) against the native backward for a few coordinates of q, k and v, the
    Performer key logits' norm term and both sides of elu's kink included."""
    vw = _vw()
    q, k, v = _inputs(1, 1, 9, 11, vw, vw, 0.7, 5)
    wr, h = _kind_args(kind, vw, 2)
    h = 0.3 if kind == "favor" else h
    dout = torch.randn(1, 1, 9, vw, generator=torch.Generator().manual_seed(4))
    fwd = native.feature_attention(kind, q, k, v, None, wr, h)
    grads = native.feature_attention_backward(kind, q, k, v, None, wr, h, *fwd, dout)
    for i, x in enumerate((q, k, v)):
        for idx in ((0, 0, 0, 0), (0, 0, x.shape[2] - 1, vw - 1), (0, 0, 3, 2)):
            def loss(e):
                xs = [q, k, v]
                xs[i] = x.clone()
                xs[i][idx] += e
                out = native.feature_attention(kind, *xs, None, wr, h)[0]
                return (out.double() * dout.double()).sum().item()
            fd = (loss(1e-2) - loss(-1e-2)) / 2e-2
            assert abs(fd - grads[i][idx].item()) <= 2e-3 * max(1.0, abs(fd)), (i, idx, fd, grads[i][idx])


@pytest.mark.parametrize("method", sorted(KINDS))
def test_methods_run_on_the_kernel_and_match_the_twin(calls, method):
    """``effattn.attention(..., method)`` with padding (Performer with its default 256
    features) goes through the kernel, forward and backward, and equals its twin; causal
    attention, trig Performer and a projection that requires grad keep the torch paths."""
    q, k, v = _inputs(2, 2, 97, 97, 64, 64, 1.0, 3)
    pm = torch.rand(2, 97, generator=torch.Generator().manual_seed(3)) > 0.2
    res = native_and_twin(kernel, "USE_NATIVE_FEATURES", method, q, k, v, pm)
    assert calls == SERVED
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    calls.clear()
    effattn.attention(q, k, v, method, causal=True)
    if method == "performer":
        effattn.attention(q, k, v, "performer", kernel="trig")
        w = kernel.performer_projection(256, 64, seed=0, redraw=False).float().requires_grad_(True)
        effattn.attention(q, k, v, "performer", projection=w).sum().backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
    assert calls == []


def test_native_elu_features_keep_nan():
    """A NaN in a query reaches its output row as NaN (``elu + 1`` keeps it, as the twin's
    does), the other rows stay finite."""
    vw = _vw()
    q, k, v = _inputs(1, 1, 8, 8, vw, vw, 1.0, 0)
    q[0, 0, 3, 1] = float("nan")
    out = native.feature_attention("elu", q, k, v, None)[0]
    assert out[0, 0, 3].isnan().all() and torch.isfinite(out[0, 0, torch.arange(8) != 3]).all()


def test_native_features_decline_what_they_do_not_take():
    """None (the twin runs) for float64, non-contiguous or gradient-carrying tensors,
    widths or feature counts off the vector width, a projection of the wrong width or
    where the kind takes none, an unknown kind, an empty side and a bad mask; the backward
    for statistics of the wrong shape."""
    vw = _vw()
    q, k, v = _inputs(1, 2, 8, 8, vw, vw, 1.0, 0)
    wr = torch.randn(2 * vw, vw)
    fa = native.feature_attention
    assert fa("favor", q, k, v, None, wr, 0.1) is not None
    assert fa("elu", q, k, v, None) is not None and fa("taylor", q, k, v, None) is not None
    assert fa("favor", q, k, v, None) is None and fa("elu", q, k, v, None, wr, 0.1) is None
    assert fa("softmax", q, k, v, None) is None
    assert fa("favor", q.double(), k.double(), v.double(), None, wr.double(), 0.1) is None
    assert fa("elu", q.transpose(2, 3).contiguous().transpose(2, 3), k, v, None) is None
    with torch.enable_grad():
        assert fa("taylor", q.clone().requires_grad_(True), k, v, None) is None
    assert fa("favor", q, k, v, None, torch.randn(2 * vw + 4, vw), 0.1) is None
    assert fa("favor", q, k, v, None, torch.randn(2 * vw, 2 * vw), 0.1) is None
    odd = torch.randn(1, 2, 8, vw + 4)
    assert fa("elu", odd, odd, v, None) is None
    assert fa("elu", q[:, :, :0], k, v, None) is None
    assert fa("elu", q, k, v, torch.ones(1, 7, dtype=torch.bool)) is None
    assert fa("elu", q, k, v, torch.ones(1, 8)) is None
    out, A, z, c = fa("favor", q, k, v, None, wr, 0.1)
    g = torch.randn_like(out)
    bw = native.feature_attention_backward
    assert bw("favor", q, k, v, None, wr, 0.1, out, A, z, c, g) is not None
    assert bw("favor", q, k, v, None, wr, 0.1, out, A, z[..., :-1], c, g) is None
    assert bw("favor", q, k, v, None, wr, 0.1, out, A, z, c.double(), g) is None
    assert bw("favor", q, k, v, None, wr, 0.1, out, A, z, c, torch.randn(1, 2, 9, vw)) is None
    assert bw("elu", q, k, v, None, None, 0.0, out, A, z, c, g) is None  # M = D, not 2 D
