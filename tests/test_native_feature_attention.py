"""The native feature-map attention kernels (``effattn.native.feature_attention``,
``causal_feature_attention`` and their backwards): the same output and gradients as their
torch twins (non-causal: the stream with the kind's :class:`StreamMap`, i.e.
:class:`PerformerSoftmaxMap`, :class:`LinearMap`, :class:`TaylorMap`; causal: the chunked
prefix sums of :func:`feature_map_attention`) for any shape, padding, feature count, scale
and thread split they take, used by the ``performer`` (positive features), ``linear`` and
``taylor`` methods, causal ones strictly causal, and a clean decline — to the twin — for
what they do not take."""

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
    return record_served(monkeypatch, native, ("feature_attention", "feature_attention_backward",
                                               "causal_feature_attention",
                                               "causal_feature_attention_backward"))


SERVED = [("feature_attention", True), ("feature_attention_backward", True)]
CAUSAL_SERVED = [("causal_feature_attention", True), ("causal_feature_attention_backward", True)]
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
       causal=st.booleans(), seed=st.integers(0, 9999))
def test_native_features_equal_their_torch_twin(calls, method, B, H, Nq, Nk, dmul, mmul, padded,
                                                keyless, magnitude, scale, need, causal, seed):
    """Output and each wanted gradient within float32 rounding of the twin, both held to
    the float64 result, for each kind, causal or not, lengths off every block size (causal:
    fewer keys than queries and more), widths and feature counts off the specialized ones,
    padding (a batch row without a real key: zeros, zero key and value gradients),
    Performer logits large enough that one key's features dominate (the running maximum)
    and any subset of gradients; and the kernel served both passes."""
    calls.clear()  # one fixture for every example
    D, Dv, M = dmul[0] * _vw(), dmul[1] * _vw(), mmul * _vw()
    q, k, v = _inputs(B, H, Nq, Nk, D, Dv, magnitude, seed)
    pm = random_padding(B, Nk, seed=seed, empty_row=B - 1 if keyless else None) if padded else None
    opts = dict(n_features=M, seed=seed % 7) if method == "performer" else {}
    opts.update(causal=causal, scale=scale)
    out, grads = _run(method, q, k, v, pm, need, True, seed, **opts)
    assert calls == (CAUSAL_SERVED if causal else SERVED)
    ref, ref_grads = _run(method, q, k, v, pm, need, False, seed, **opts)
    exact, exact_grads = _run(method, q.double(), k.double(), v.double(), pm, need, False, seed, **opts)
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


def _assert_finite_differences(forward, inputs, dout, grads, coords):
    """Central differences (float32 forward, so a step of 1e-2 and a loose tolerance) of
    ``<forward(*inputs), dout>`` against ``grads`` at ``coords(n)`` of each input (``n`` its
    length)."""
    for i, x in enumerate(inputs):
        for idx in coords(x.shape[2]):
            def loss(e):
                xs = list(inputs)
                xs[i] = x.clone()
                xs[i][idx] += e
                return (forward(*xs).double() * dout.double()).sum().item()
            fd = (loss(1e-2) - loss(-1e-2)) / 2e-2
            assert abs(fd - grads[i][idx].item()) <= 2e-3 * max(1.0, abs(fd)), (i, idx, fd, grads[i][idx])


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
    _assert_finite_differences(lambda *xs: native.feature_attention(kind, *xs, None, wr, h)[0],
                               (q, k, v), dout, grads, lambda n: ((0, 0, 0, 0), (0, 0, n - 1, vw - 1), (0, 0, 3, 2)))


@pytest.mark.parametrize("method", sorted(KINDS))
@pytest.mark.parametrize("causal", [False, True])
def test_methods_run_on_the_kernel_and_match_the_twin(calls, method, causal):
    """``effattn.attention(..., method)`` with padding (Performer with its default 256
    features), causal or not, goes through the kernel, forward and backward, and equals
    its twin; trig Performer and a projection that requires grad keep the torch paths."""
    q, k, v = _inputs(2, 2, 197, 197, 64, 64, 1.0, 3)
    pm = torch.rand(2, 197, generator=torch.Generator().manual_seed(3)) > 0.2
    res = native_and_twin(kernel, "USE_NATIVE_FEATURES", method, q, k, v, pm, causal=causal)
    assert calls == (CAUSAL_SERVED if causal else SERVED)
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    calls.clear()
    if method == "performer":
        effattn.attention(q, k, v, "performer", kernel="trig", causal=causal)
        w = kernel.performer_projection(256, 64, seed=0, redraw=False).float().requires_grad_(True)
        effattn.attention(q, k, v, "performer", projection=w, causal=causal).sum().backward()
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


# ------------------------------------------------------------------------------- causal

def _causal_run(kind, q, k, v, pm, wr, h, dout=None):
    """The causal kernel's ``(out, den, c)`` and, given ``dout``, its ``(dq, dk, dv)``."""
    fwd = native.causal_feature_attention(kind, q, k, v, pm, wr, h)
    if dout is None:
        return fwd, None
    return fwd, native.causal_feature_attention_backward(kind, q, k, v, pm, wr, h, *fwd, dout)


@pytest.mark.parametrize("kind", sorted(native.FEATURE_KINDS))
def test_native_causal_features_leak_nothing_from_later_keys(kind):
    """Query i's output does not change, bit for bit, when any key or value after i
    changes — for Performer even when a later key in the same block has a logit far above
    the others (the weights' shift is each query's own running maximum, never a later
    key's) — and a loss on the first rows gives the later keys and values zero gradients."""
    vw = _vw()
    q, k, v = _inputs(1, 2, 150, 150, vw, vw, 0.7, 11)
    wr, h = _kind_args(kind, vw, 3)
    out = _causal_run(kind, q, k, v, None, wr, h)[0][0]
    for cut in (0, 37, 63, 64, 100):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, cut + 1:] = torch.randn_like(k2[:, :, cut + 1:]) * 8.0
        v2[:, :, cut + 1:] += 100.0
        out2 = _causal_run(kind, q, k2, v2, None, wr, h)[0][0]
        assert torch.equal(out2[:, :, :cut + 1], out[:, :, :cut + 1]), cut
        dout = torch.zeros_like(out)
        dout[:, :, :cut + 1] = torch.randn_like(dout[:, :, :cut + 1])
        _, (dq, dk, dv) = _causal_run(kind, q, k2, v2, None, wr, h, dout)
        assert not dk[:, :, cut + 1:].any() and not dv[:, :, cut + 1:].any(), cut
        assert not dq[:, :, cut + 1:].any()


def test_native_causal_performer_keeps_early_queries_when_a_later_logit_jumps():
    """A key whose logit is ~200 above the earlier ones (its features would underflow all
    earlier keys' against a block-wide shift) leaves the earlier queries' outputs and
    gradients as the float64 twin has them, and later queries see it dominate."""
    vw = _vw()
    q, k, v = _inputs(1, 1, 130, 130, vw, vw, 0.5, 2)
    wr = torch.randn(2 * vw, vw, generator=torch.Generator().manual_seed(1)) * 20.0 / vw ** 0.5
    k[0, 0, 40] = wr[0]  # its logit wr[0]·k - |k|²/2 = |wr[0]|²/2, ~200
    h = 0.5
    dout = torch.randn(1, 1, 130, vw, generator=torch.Generator().manual_seed(5))
    (out, den, c, _), grads = _causal_run("favor", q, k, v, None, wr, h, dout)
    assert c[0, 0, 40] > c[0, 0, 39] + 87
    xs = [x.double().requires_grad_(True) for x in (q, k, v)]
    phi_q, _ = kernel.performer_features(xs[0], wr.double(), "softmax", is_query=True)
    phi_k, k_log = kernel.performer_features(xs[1], wr.double(), "softmax", is_query=False)
    ref = kernel.feature_map_attention(phi_q, phi_k, xs[2], causal=True, k_log=k_log)
    ref_grads = torch.autograd.grad(ref, xs, dout.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * max(1.0, b.abs().max().item()))
    assert torch.isfinite(out).all() and out[0, 0, :40].abs().max() < 10


@pytest.mark.parametrize("kind", sorted(native.FEATURE_KINDS))
@pytest.mark.parametrize("heads", [1, 3])
def test_native_causal_features_split_scans_over_threads_alike(kind, heads):
    """With at least as many (batch, head)s as threads each is one scan on one thread (the
    same bits whatever the count); with fewer, each scan is split into parts that start
    from the sums of the positions before them (keys) and after them (the queries'
    gradients), taken in a pass of their own: the same result up to rounding — across a
    padded stretch, a key with a large Performer logit late in the sequence and keys past
    the last query (zero gradients), forward and backward."""
    vw = _vw()
    q, k, v = _inputs(1, heads, 700, 760, vw, vw, 0.5, 9)
    k[:, :, 520] *= 6.0
    pm = torch.ones(1, 760, dtype=torch.bool)
    pm[0, 100:330] = False
    wr, h = _kind_args(kind, vw, 4)
    dout = torch.randn(1, heads, 700, vw)
    before = torch.get_num_threads()
    runs = {}
    try:
        for threads in (1, heads, 2, 8):
            torch.set_num_threads(threads)
            fwd, grads = _causal_run(kind, q, k, v, pm, wr, h, dout)
            runs[threads] = fwd + grads
    finally:
        torch.set_num_threads(before)
    for a, b in zip(runs[heads], runs[1]):
        assert torch.equal(a, b)
    for threads in (2, 8):
        for a, b in zip(runs[threads], runs[1]):
            scale = max(1.0, b[torch.isfinite(b)].abs().max().item())
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale)
    dk, dv = runs[8][-2:]
    for g in (dk, dv):
        assert not g[0, :, 100:330].any() and not g[0, :, 700:].any()


@pytest.mark.parametrize("kind", sorted(native.FEATURE_KINDS))
@pytest.mark.parametrize("threads", [1, 2])
def test_native_causal_backward_with_or_without_kept_states_agree(kind, threads):
    """The backward from the forward's kept states (dq in the one reverse scan) and without
    them (dq from a forward scan of its own) give the same gradients up to rounding, a
    single head's scan split into parts or not; ``"auto"`` keeps them for linear and Taylor
    attention (at most twice the size of q) and not for Performer's 4x wider features."""
    q, k, v = _inputs(1, 1, 300, 300, 64, 64, 0.6, 12)
    k[0, 0, 200] *= 5.0
    pm = torch.ones(1, 300, dtype=torch.bool)
    pm[0, 50:90] = False
    wr, h = (torch.randn(256, 64, generator=torch.Generator().manual_seed(2)) * 0.3, 0.1) if kind == "favor" \
        else (None, 0.0)
    dout = torch.randn(1, 1, 300, 64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        kept = native.causal_feature_attention(kind, q, k, v, pm, wr, h, keep_states=True)
        bare = native.causal_feature_attention(kind, q, k, v, pm, wr, h, keep_states=False)
        auto = native.causal_feature_attention(kind, q, k, v, pm, wr, h)
        g_kept = native.causal_feature_attention_backward(kind, q, k, v, pm, wr, h, *kept, dout)
        g_bare = native.causal_feature_attention_backward(kind, q, k, v, pm, wr, h, *bare, dout)
    finally:
        torch.set_num_threads(before)
    assert bare[3] is None and (auto[3] is None) == (kind == "favor")
    assert torch.equal(kept[0], bare[0])
    for a, b in zip(g_kept, g_bare):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("kind", sorted(native.FEATURE_KINDS))
def test_native_causal_gradients_are_the_derivative_of_its_forward(kind):
    """Finite differences of the causal forward against its backward for coordinates in
    the first and second blocks of q, k and v (more keys than queries: the keys past the
    last query get zero gradients)."""
    vw = _vw()
    q, k, v = _inputs(1, 1, 90, 100, vw, vw, 0.7, 6)
    wr, h = _kind_args(kind, vw, 2)
    dout = torch.randn(1, 1, 90, vw, generator=torch.Generator().manual_seed(8))
    _, grads = _causal_run(kind, q, k, v, None, wr, h, dout)
    assert not grads[1][0, 0, 90:].any() and not grads[2][0, 0, 90:].any()
    _assert_finite_differences(lambda *xs: native.causal_feature_attention(kind, *xs, None, wr, h)[0],
                               (q, k, v), dout, grads,
                               lambda n: ((0, 0, 0, 0), (0, 0, 70, vw - 1), (0, 0, 63, 2), (0, 0, 89, 1)))


def test_native_causal_features_decline_what_they_do_not_take():
    """As the non-causal kernel (one check of what it takes); without ``keep_states`` no
    states are written (the backward takes None for them), and the backward declines
    statistics of the wrong shape or missing ones."""
    vw = _vw()
    q, k, v = _inputs(1, 2, 8, 8, vw, vw, 1.0, 0)
    cf, bw = native.causal_feature_attention, native.causal_feature_attention_backward
    assert cf("elu", q.double(), k.double(), v.double(), None) is None
    assert cf("favor", q, k, v, None) is None
    out, den, c, states = cf("elu", q, k, v, None)
    assert cf("elu", q, k, v, None, keep_states=False)[3] is None
    g = torch.randn_like(out)
    assert bw("elu", q, k, v, None, None, 0.0, out, den, c, states, g) is not None
    assert bw("elu", q, k, v, None, None, 0.0, out, den[..., :-1], c, states, g) is None
    assert bw("elu", q, k, v, None, None, 0.0, out, den, c.double(), states, g) is None
    assert bw("elu", q, k, v, None, None, 0.0, out, den, c, states[:, :, :, 1:], g) is None
    assert bw("elu", q, k, v, None, None, 0.0, out, den, c, None, g) is not None  # states not kept
    assert bw("elu", q, k, v, None, None, 0.0, out, None, c, states, g) is None
