"""Efficient attention's native kernels (``effattn.native.efficient`` and its backward):
the same output, statistics and gradients as the torch passes (their twin) for any shape,
padding, temperature and thread split they take, used by the ``efficient`` method, and a
clean decline for what they do not take."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from effattn import native
from effattn.mechanisms import kernel
from tests.helpers import (assert_keyless_row_zero, assert_near_twin, native_and_twin,
                           native_vector_width as _vw, random_padding, record_served)

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")



@pytest.fixture
def calls(monkeypatch):
    """Every native efficient-attention call's name and whether it served, in order."""
    return record_served(monkeypatch, native, ("efficient", "efficient_backward"))


def _inputs(B, H, Nq, Nk, D, Dv, magnitude, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Nq, D, generator=g) * magnitude,
            torch.randn(B, H, Nk, D, generator=g) * magnitude,
            torch.randn(B, H, Nk, Dv, generator=g))


def _run(q, k, v, t, pm, need, use_native, seed):
    """``(out, grads)`` of efficient attention through the torch passes or the kernels."""
    xs = [x.clone().requires_grad_(n) for x, n in zip((q, k, v), need)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel, "USE_NATIVE_EFFICIENT", use_native)
        out = kernel.efficient_softmax_attention(*xs, t, pm)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
        grads = torch.autograd.grad(out, [x for x in xs if x.requires_grad], g)
    return out.detach(), grads


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 2), H=st.integers(1, 3), Nq=st.integers(1, 150), Nk=st.integers(1, 150),
       dmul=st.sampled_from([(1, 1), (4, 4), (2, 1), (1, 3)]), padded=st.booleans(),
       keyless=st.booleans(), magnitude=st.sampled_from([1.0, 30.0]),
       t=st.sampled_from([0.05, 0.35, 1.5]),
       need=st.sampled_from([(True, True, True), (True, False, False), (False, True, False),
                             (False, False, True), (False, True, True)]),
       seed=st.integers(0, 9999))
def test_native_efficient_equals_the_torch_passes(calls, B, H, Nq, Nk, dmul, padded, keyless,
                                                  magnitude, t, need, seed):
    """Output and each wanted gradient within float32 rounding of the torch passes, for
    lengths off every block size, padding (with a batch row that has no real key: zeros,
    zero gradients), large scores (the per-feature maximum shift) and any subset of
    gradients; and the kernels served both passes."""
    calls.clear()  # one fixture for every example
    D, Dv = dmul[0] * _vw(), dmul[1] * _vw()
    q, k, v = _inputs(B, H, Nq, Nk, D, Dv, magnitude, seed)
    pm = random_padding(B, Nk, seed=seed, empty_row=B - 1 if keyless else None) if padded else None
    out, grads = _run(q, k, v, t, pm, need, True, seed)
    assert calls == [("efficient", True), ("efficient_backward", True)]
    ref, ref_grads = _run(q, k, v, t, pm, need, False, seed)
    # both float32 paths are held to the float64 result: the kernels no further from it
    # than a few times the torch passes' own rounding, or than the rounding of exponents
    # as large as the scores (large scores: one key or feature dominates, and the
    # gradients subtract near-equal terms)
    exact, exact_grads = _run(q.double(), k.double(), v.double(), t, pm, need, False, seed)
    span = 1.0 + t * max(q.abs().max().item(), k.abs().max().item())
    assert_near_twin((out, *grads), (ref, *ref_grads), (exact, *exact_grads), 1e-6 * span)
    if padded and keyless:  # keys and values of a row without any real key: zero gradients
        assert_keyless_row_zero(out, grads, (q, k, v), need)


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_native_efficient_splits_heads_over_threads_alike(threads):
    """A single head's rows split into parts (their maxima, sums and products merged
    after) give the result of one pass, whatever the thread count: a feature's maximum
    in any part (here a large key late in the sequence) rescales the others."""
    q, k, v = _inputs(1, 1, 1000, 1000, _vw(), _vw(), 3.0, 7)
    k[0, 0, 900, 0] = 40.0
    pm = torch.ones(1, 1000, dtype=torch.bool)
    pm[0, :300] = False  # a part without real keys
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.efficient(q, k, v, pm, 0.5)
        g = torch.randn(one[0].shape)
        one_grads = native.efficient_backward(q, k, v, pm, 0.5, *one[1:], g)
        torch.set_num_threads(threads)
        many = native.efficient(q, k, v, pm, 0.5)
        many_grads = native.efficient_backward(q, k, v, pm, 0.5, *many[1:], g)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(many + many_grads, one + one_grads):  # sums in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))
    assert torch.equal(one[1][0, 0, 0, 0], torch.tensor(0.5 * 40.0))  # c = t * max


def test_efficient_method_runs_on_the_kernels_and_matches_the_twin(calls):
    """``effattn.attention(..., "efficient")`` with padding goes through the kernels
    (forward and backward) and equals its torch twin."""
    q, k, v = _inputs(2, 2, 97, 97, 2 * _vw(), _vw(), 1.0, 3)
    pm = torch.rand(2, 97, generator=torch.Generator().manual_seed(3)) > 0.2
    res = native_and_twin(kernel, "USE_NATIVE_EFFICIENT", "efficient", q, k, v, pm)
    assert calls == [("efficient", True), ("efficient_backward", True)]
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_native_efficient_declines_what_it_does_not_take():
    """None (the torch passes run) for float64, non-contiguous or gradient-carrying
    tensors, widths off the vector width, an empty side and a bad mask."""
    vw = _vw()
    q, k, v = _inputs(1, 2, 8, 8, vw, vw, 1.0, 0)
    assert native.efficient(q, k, v, None, 1.0) is not None
    assert native.efficient(q.double(), k.double(), v.double(), None, 1.0) is None
    assert native.efficient(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, None, 1.0) is None
    with torch.enable_grad():
        assert native.efficient(q.clone().requires_grad_(True), k, v, None, 1.0) is None
    odd = torch.randn(1, 2, 8, vw + 4)
    assert native.efficient(odd, odd, v, None, 1.0) is None
    assert native.efficient(q[:, :, :0], k, v, None, 1.0) is None
    assert native.efficient(q, k, v, torch.ones(1, 7, dtype=torch.bool), 1.0) is None
    assert native.efficient(q, k, v, torch.ones(1, 8), 1.0) is None
    out, c, z, C = native.efficient(q, k, v, None, 1.0)
    assert native.efficient_backward(q, k, v, None, 1.0, c, z, C, torch.randn(1, 2, 9, vw)) is None
    assert native.efficient_backward(q, k, v, None, 1.0, c.double(), z, C, torch.randn_like(out)) is None
