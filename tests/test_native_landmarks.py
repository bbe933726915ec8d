"""Nyströmformer's two long products on the native kernels (``effattn.native``
``queries_over_landmarks`` / ``landmarks_over_keys`` and their backwards): the same output
and gradients as the torch Functions of ``effattn.mechanisms._landmarks`` (their twins)
for any length, mask, segment view and thread split the kernels take, used by the
``nystrom`` method, and a clean decline for what they do not take."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from effattn import native
from effattn.mechanisms import _landmarks
from tests.helpers import nystrom_native_and_twin, record_served, native_vector_width as _vw

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")

NAMES = ("queries_over_landmarks", "queries_over_landmarks_backward", "landmarks_over_keys",
         "landmarks_over_keys_backward")



@pytest.fixture
def calls(monkeypatch):
    """Every native landmarks call's name and whether it served, in order."""
    return record_served(monkeypatch, native, NAMES)


def _run(fn, q, k, v, key_valid, scale, use_native, seed):
    """``(out, (dq, dk, dv))`` of one product through the kernels or the torch twin."""
    xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_landmarks, "USE_NATIVE_LANDMARKS", use_native)
        out = fn(*xs, key_valid, scale)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)  # alike in float32 and 64
        grads = torch.autograd.grad(out, xs, g)
    return out.detach(), grads


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(side=st.sampled_from(["queries", "keys"]), B=st.integers(1, 2), H=st.integers(1, 3),
       N=st.integers(1, 200), lmul=st.sampled_from([1, 4]), dmul=st.sampled_from([(1, 1), (4, 4), (2, 1)]),
       mask=st.sampled_from([None, "batch", "shared"]), keyless=st.booleans(), segments=st.booleans(),
       magnitude=st.sampled_from([1.0, 6.0]), seed=st.integers(0, 9999))
def test_native_landmark_products_equal_their_torch_twins(calls, side, B, H, N, lmul, dmul, mask,
                                                         keyless, segments, magnitude, seed):
    """Output and gradients of each product (queries over landmarks; landmarks over keys)
    within float32 rounding of the torch Functions, held to the float64 result: lengths off
    every block, key masks per batch or shared (a batch with no valid key: zeros, zero
    gradients), the long side as a segment view ``[B, H, S, N / S, D]``; the kernels served
    forward and backward."""
    calls.clear()  # one fixture for every example
    L, (D, Dv) = lmul * _vw(), (dmul[0] * _vw(), dmul[1] * _vw())
    g = torch.Generator().manual_seed(seed)
    long = torch.randn(B, H, N, D, generator=g) * magnitude
    short = torch.randn(B, H, L, D, generator=g) * magnitude
    nk = L if side == "queries" else N
    v = torch.randn(B, H, nk, Dv, generator=g)
    key_valid = None
    if mask is not None:
        key_valid = torch.rand(B if mask == "batch" else 1, 1, 1, nk, generator=g) > 0.3
        if keyless:
            key_valid[-1] = False
    if segments and N % 4 == 0:
        long = long.view(B, H, 4, N // 4, D)
    q, k = (long, short) if side == "queries" else (short, long)
    fn = _landmarks.queries_over_landmarks if side == "queries" else _landmarks.landmarks_over_keys
    scale = 0.2
    out, grads = _run(fn, q, k, v, key_valid, scale, True, seed)
    name = "queries_over_landmarks" if side == "queries" else "landmarks_over_keys"
    assert calls == [(name, True), (name + "_backward", True)]
    assert grads[0 if side == "queries" else 1].shape == long.shape
    ref, ref_grads = _run(fn, q, k, v, key_valid, scale, False, seed)
    exact, exact_grads = _run(fn, q.double(), k.double(), v.double(), key_valid, scale, False, seed)
    # |score| <= scale |q_i| |k_j|: rounding of exponents that large, summed over D terms
    span = 1.0 + scale * q.norm(dim=-1).max().item() * k.norm(dim=-1).max().item()
    for a, b, x in zip((out, *grads), (ref, *ref_grads), (exact, *exact_grads)):
        err, twin_err = (a.double() - x).abs().max().item(), (b.double() - x).abs().max().item()
        floor = 2e-6 * span * max(1.0, x.abs().max().item())
        assert err <= 4 * twin_err + floor, (err, twin_err, floor)
    if key_valid is not None and keyless and (mask == "batch" or B == 1):
        assert not out[-1].any() and not grads[0][-1].any()


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_native_landmark_products_split_rows_over_threads_alike(threads):
    """A single head's long side split into parts (landmarks over keys: online maxima and
    sums merged after; queries over landmarks: key and value gradient sums) gives the
    result of one pass whatever the thread count."""
    vw = _vw()
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 1, vw, vw, generator=g), torch.randn(1, 1, 900, vw, generator=g), \
        torch.randn(1, 1, 900, vw, generator=g)
    k[0, 0, 850] *= 8  # a late key dominating some landmarks
    kv = torch.ones(1, 1, 1, 900, dtype=torch.bool)
    kv[..., :300] = False  # parts without valid keys
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            out, m, z = native.landmarks_over_keys(q, k, v, kv, 0.5)
            dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
            dk = torch.empty_like(k)
            dq, dv = native.landmarks_over_keys_backward(q, k, v, kv, 0.5, out, m, z, dout, dk)
            o2 = native.queries_over_landmarks(k, q, q, None, 0.5)
            dq2 = torch.empty_like(k)
            dk2, dv2 = native.queries_over_landmarks_backward(k, q, q, None, 0.5, torch.ones_like(o2), dq2)
            results.append((out, m, z, dq, dk, dv, o2, dq2, dk2, dv2))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):  # sums in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


def test_nystrom_runs_on_the_kernels_and_matches_the_twin(calls):
    """``effattn.attention(..., "nystrom")`` with padding runs both products on the kernels
    (forward and backward) and equals the torch twins."""
    res = nystrom_native_and_twin(_landmarks, "USE_NATIVE_LANDMARKS", 200)
    assert [c for c in calls if c[1]] == [(n, True) for n in ("landmarks_over_keys", "queries_over_landmarks",
                                                               "queries_over_landmarks_backward",
                                                               "landmarks_over_keys_backward")]
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_native_landmark_products_decline_what_they_do_not_take():
    """None (the torch twins run) for float64, gradient-carrying or non-contiguous
    tensors, a landmark count or widths off the vector width, per-head masks, bad
    gradient buffers."""
    vw = _vw()
    n = 2 * vw + vw // 2  # not a multiple of the vector width
    q, k, v = torch.randn(1, 2, n, vw), torch.randn(1, 2, vw, vw), torch.randn(1, 2, vw, vw)
    assert native.queries_over_landmarks(q, k, v, None, 1.0) is not None
    assert native.queries_over_landmarks(q.double(), k.double(), v.double(), None, 1.0) is None
    with torch.enable_grad():
        assert native.queries_over_landmarks(q.clone().requires_grad_(True), k, v, None, 1.0) is None
    assert native.queries_over_landmarks(q, k[:, :, :vw - 4], v[:, :, :vw - 4], None, 1.0) is None
    assert native.queries_over_landmarks(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, None, 1.0) is None
    per_head = torch.ones(1, 2, 1, vw, dtype=torch.bool)
    assert native.queries_over_landmarks(q, k, v, per_head, 1.0) is None
    assert native.queries_over_landmarks_backward(q, k, v, None, 1.0, torch.randn(1, 2, n, vw),
                                                  torch.empty(3)) is None
    assert native.landmarks_over_keys(k, q, torch.randn(1, 2, n, vw), None, 1.0) is not None
    assert native.landmarks_over_keys(q, k, v, None, 1.0) is None  # n landmarks
