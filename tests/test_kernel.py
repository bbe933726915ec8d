"""Kernel attention (linear, taylor, efficient, performer): each fast path equals a dense
reference built from the paper's formula, causal versions never read the future (not even
through gradients), padding never reaches an output, Performer approaches softmax
attention as its feature count grows, and every random choice is reproducible."""

import collections
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import effattn
from effattn.mechanisms import kernel as kernel_module
from effattn.mechanisms.kernel import (
    dense_feature_map_attention, feature_map_attention, orthogonal_gaussian,
    performer_projection, reset_feature_generators,
)
from tests.helpers import rand_qkv, random_padding

CAUSAL_METHODS = ["linear", "taylor", "performer"]
ALL = ["linear", "taylor", "efficient", "performer"]
SMALL = {"performer": {"n_features": 16}}


# ---------------------------------------------------------------- dense references (float64)

def _mask(Nq, Nk, causal, pm):
    m = torch.ones(Nq, Nk, dtype=torch.bool)
    if causal:
        m = m.tril()
    m = m[None, None]
    return m if pm is None else m & pm[:, None, None, :]


def _normalized(a, v, mask):
    """``sum_j a_ij v_j / sum_j a_ij`` over allowed pairs; rows without keys -> 0."""
    a = a.masked_fill(~mask, 0.0)
    den = a.sum(-1, keepdim=True)
    has = mask.any(-1, keepdim=True)
    out = (a @ v.nan_to_num()) / torch.where(has, den, torch.ones_like(den))
    return out.masked_fill(~has, 0.0)


def ref_linear(q, k, v, causal, pm, scale):
    return _normalized((F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2), v,
                       _mask(q.shape[2], k.shape[2], causal, pm))


def ref_taylor(q, k, v, causal, pm, scale):
    """Li et al.: (sum_j v_j + q̂ sum_j k̂_j v_j^T) / (N + q̂ sum_j k̂_j), N = allowed keys."""
    qh, kh = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    return _normalized(1 + qh @ kh.transpose(-1, -2), v, _mask(q.shape[2], k.shape[2], causal, pm))


def ref_efficient(q, k, v, causal, pm, scale):
    """Shen et al.: rho_q(Q) (rho_k(K)^T V), no explicit normalizer."""
    t = math.sqrt(scale)
    rq = torch.softmax(q * t, -1)
    sk = k * t
    if pm is not None:
        sk = sk.masked_fill(~pm[:, None, :, None], float("-inf"))
    rk = torch.softmax(sk, dim=-2).nan_to_num()
    vv = v if pm is None else v.masked_fill(~pm[:, None, :, None], 0.0)
    return rq @ (rk.transpose(-1, -2) @ vv)


def ref_performer(q, k, v, causal, pm, scale, w, kernel):
    """Materialized FAVOR+ kernel estimate of exp(q·k·scale) with projection ``w``."""
    r = scale ** 0.5
    x, y = q * r, k * r
    px, py = x @ w.T, y @ w.T
    if kernel == "softmax":
        fx = torch.exp(px - 0.5 * x.pow(2).sum(-1, keepdim=True))
        fy = torch.exp(py - 0.5 * y.pow(2).sum(-1, keepdim=True))
        a = fx @ fy.transpose(-1, -2) / w.shape[0]
    else:
        cosd = (torch.cos(px) @ torch.cos(py).transpose(-1, -2)
                + torch.sin(px) @ torch.sin(py).transpose(-1, -2)) / w.shape[0]
        a = torch.exp(0.5 * x.pow(2).sum(-1))[..., :, None] * torch.exp(0.5 * y.pow(2).sum(-1))[..., None, :] * cosd
    return _normalized(a, v, _mask(q.shape[2], k.shape[2], causal, pm))


REFS = {"linear": ref_linear, "taylor": ref_taylor, "efficient": ref_efficient}


@given(Nq=st.integers(1, 30), Nk=st.integers(1, 30), causal=st.booleans(), pad=st.booleans(),
       empty=st.booleans(), chunk=st.sampled_from([1, 3, 8, 64]), seed=st.integers(0, 9999))
def test_fast_paths_equal_dense_formula(Nq, Nk, causal, pad, empty, chunk, seed):
    q, k, v = rand_qkv(2, 2, Nq, Nk, 5, 3, seed=seed)
    pm = random_padding(2, Nk, seed=seed, empty_row=1 if empty else None) if pad else None
    scale = 0.37
    for m, ref in REFS.items():
        if causal and m == "efficient":
            continue
        opts = {} if m == "efficient" else {"chunk": chunk}
        out = effattn.attention(q, k, v, m, causal=causal, padding_mask=pm, scale=scale, **opts)
        torch.testing.assert_close(out, ref(q, k, v, causal, pm, scale), atol=1e-12, rtol=1e-10)
    w = performer_projection(12, 5, seed=seed, redraw=False)
    for kernel in ("softmax", "trig"):
        qq, kk = (q * 2.5, k * 2.5) if kernel == "softmax" else (q, k)  # exercise stabilization
        out = effattn.attention(qq, kk, v, "performer", causal=causal, padding_mask=pm, scale=scale,
                                projection=w, kernel=kernel, chunk=chunk)
        torch.testing.assert_close(out, ref_performer(qq, kk, v, causal, pm, scale, w, kernel),
                                   atol=1e-10, rtol=1e-8)


@given(N=st.integers(1, 40), causal=st.booleans(), chunk=st.integers(1, 17),
       log_scale=st.sampled_from([0.0, 1.0, 40.0]), seed=st.integers(0, 9999))
def test_shared_path_equals_materialized_kernel(N, causal, chunk, log_scale, seed):
    """The chunked prefix sums and the per-query stabilizer are exact, even when per-key
    log-scales span a range whose exponentials overflow float32."""
    g = torch.Generator().manual_seed(seed)
    pq = torch.rand(2, 2, N, 4, generator=g, dtype=torch.float64)
    pk = torch.rand(2, 2, N, 4, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, N, 3, generator=g, dtype=torch.float64)
    kl = torch.randn(2, 2, N, generator=g, dtype=torch.float64) * log_scale if log_scale else None
    pm = random_padding(2, N, seed=seed, empty_row=1)
    out = feature_map_attention(pq, pk, v, causal=causal, padding_mask=pm, k_log=kl, chunk=chunk)
    ref = dense_feature_map_attention(pq, pk, v, causal=causal, padding_mask=pm, k_log=kl)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-9)
    assert (out[1] == 0).all()


def test_shared_path_float32_extreme_log_scales_stay_finite():
    pq, pk = torch.rand(1, 1, 50, 4), torch.rand(1, 1, 50, 4)
    v = torch.randn(1, 1, 50, 2)
    kl = torch.linspace(-500, 500, 50)[None, None]
    for causal in (False, True):
        out = feature_map_attention(pq, pk, v, causal=causal, k_log=kl, chunk=7)
        assert torch.isfinite(out).all()
        ref = dense_feature_map_attention(pq.double(), pk.double(), v.double(), causal=causal, k_log=kl.double())
        torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- approximation limits

def test_performer_error_shrinks_as_features_grow():
    q, k, v = rand_qkv(2, 4, 33, 33, 8, 4, seed=3)
    q, k = q * 0.5, k * 0.5
    pm = random_padding(2, 33, seed=3)
    for causal in (False, True):
        ref = effattn.attention(q, k, v, "naive", causal=causal, padding_mask=pm)
        errs = [(effattn.attention(q, k, v, "performer", causal=causal, padding_mask=pm,
                                   n_features=m, seed=1) - ref).abs().mean().item()
                for m in (16, 64, 256, 1024, 4096)]
        assert all(a > b for a, b in zip(errs, errs[1:])), errs
        assert errs[-1] < 0.4 * errs[2], errs  # keeps shrinking: no bias floor


def test_performer_trig_error_shrinks_as_features_grow():
    q, k, v = rand_qkv(2, 4, 25, 25, 8, 4, seed=4)
    ref = effattn.attention(q * 0.5, k * 0.5, v, "naive")
    errs = [(effattn.attention(q * 0.5, k * 0.5, v, "performer", kernel="trig", n_features=m,
                               seed=2) - ref).abs().mean().item() for m in (16, 64, 256, 1024)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_orthogonal_features_are_orthogonal_blocks_with_chi_norms():
    w = orthogonal_gaussian(20, 8, torch.Generator().manual_seed(0))
    assert w.shape == (20, 8)
    for blk in (w[:8], w[8:16]):
        u = blk / blk.norm(dim=1, keepdim=True)
        torch.testing.assert_close(u @ u.T, torch.eye(8, dtype=torch.float64))
    # rows are marginally N(0, I): average squared norm ~ d, each coordinate symmetric
    big = orthogonal_gaussian(4096, 8, torch.Generator().manual_seed(1))
    assert abs(big.pow(2).sum(1).mean().item() - 8) < 0.3
    assert big.mean(0).abs().max().item() < 0.1


def test_linear_and_taylor_ignore_scale_efficient_uses_it():
    q, k, v = rand_qkv(1, 2, 9, 9, 4, 3)
    for m in ("linear", "taylor"):
        torch.testing.assert_close(effattn.attention(q, k, v, m, scale=0.1),
                                   effattn.attention(q, k, v, m, scale=3.0))
    assert not torch.allclose(effattn.attention(q, k, v, "efficient", scale=0.1),
                              effattn.attention(q, k, v, "efficient", scale=3.0))


# ---------------------------------------------------------------- causality, padding

@pytest.mark.parametrize("method,opts", [("linear", {}), ("taylor", {}), ("performer", {}),
                                         ("performer", {"kernel": "trig"})])
def test_causal_no_leak(method, opts):
    N, i = 37, 17
    q, k, v = rand_qkv(1, 2, N, N, 8, dtype=torch.float32)
    q, k, v = q * 3, k * 3, v  # large norms: the stabilizer must not look ahead
    opts = dict(opts, chunk=8)
    out = effattn.attention(q, k, v, method, causal=True, **opts)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, i + 1:] = torch.randn_like(t[:, :, i + 1:]) * 10
    out2 = effattn.attention(q2, k2, v2, method, causal=True, **opts)
    assert torch.equal(out[:, :, : i + 1], out2[:, :, : i + 1])
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    o = effattn.attention(qg, kg, vg, method, causal=True, **opts)
    o[:, :, : i + 1].sum().backward()
    for g in (qg.grad, kg.grad, vg.grad):
        assert torch.isfinite(g).all()
        assert (g[:, :, i + 1:] == 0).all()
        assert g[:, :, : i + 1].abs().sum() > 0


@pytest.mark.parametrize("method", ALL)
def test_padded_content_never_matters(method):
    q, k, v = rand_qkv(2, 2, 23, 23, 6, 3)
    pm = random_padding(2, 23, seed=5)
    for causal in ([False, True] if method != "efficient" else [False]):
        out = effattn.attention(q, k, v, method, causal=causal, padding_mask=pm, **SMALL.get(method, {}))
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        pad = ~pm[:, None, :, None]
        k2 = torch.where(pad, torch.full_like(k2, float("nan")), k2)
        v2 = torch.where(pad, torch.full_like(v2, 1e30), v2)
        out2 = effattn.attention(q2, k2, v2, method, causal=causal, padding_mask=pm, **SMALL.get(method, {}))
        assert torch.equal(out, out2)


@pytest.mark.parametrize("method", ALL)
def test_fully_masked_rows_are_zero_with_finite_grads(method):
    q, k, v = rand_qkv(2, 2, 15, 15, 4, 3, grad=True)
    pm = random_padding(2, 15, seed=2, empty_row=1)
    pm[0, :4] = False  # causal: queries 0..3 of batch 0 have no earlier real key
    for causal in ([False, True] if method != "efficient" else [False]):
        out = effattn.attention(q, k, v, method, causal=causal, padding_mask=pm, **SMALL.get(method, {}))
        assert (out[1] == 0).all()
        if causal:
            assert (out[0, :, :4] == 0).all()
            assert (out[0, :, 4:] != 0).any()
        grads = torch.autograd.grad(out.pow(2).sum() + out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)
        assert (grads[1][1] == 0).all() and (grads[2][1] == 0).all()


@pytest.mark.parametrize("method,opts", [("linear", {}), ("taylor", {}), ("efficient", {}),
                                         ("performer", {"n_features": 6}),
                                         ("performer", {"n_features": 3, "kernel": "trig"})])
def test_gradcheck(method, opts):
    q, k, v = rand_qkv(1, 2, 7, 7, 3, 2, grad=True)
    pm = random_padding(1, 7, seed=1)
    for causal in ([False, True] if method != "efficient" else [False]):
        def f(q, k, v):
            return effattn.attention(q, k, v, method, causal=causal, padding_mask=pm,
                                     **dict(opts, **({"chunk": 3} if method != "efficient" else {})))
        assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_large_norms_finite(method, dtype):
    q, k, v = rand_qkv(1, 2, 70, 70, 16, 8, dtype=torch.float32)
    q, k, v = (q * 30).to(dtype), (k * 30).to(dtype), v.to(dtype)
    pm = random_padding(1, 70, seed=4)
    for causal in ([False, True] if method != "efficient" else [False]):
        out = effattn.attention(q, k, v, method, causal=causal, padding_mask=pm)
        assert out.dtype == dtype and torch.isfinite(out).all()
    # moderate norms: close to the float64 computation
    q, k, v = rand_qkv(1, 2, 40, 40, 16, 8, dtype=torch.float64)
    ref = effattn.attention(q, k, v, method)
    low = effattn.attention(q.to(dtype), k.to(dtype), v.to(dtype), method)
    torch.testing.assert_close(low.double(), ref, atol=0.05, rtol=0.05)


def test_batch_and_head_independence():
    q, k, v = rand_qkv(3, 2, 19, 19, 4, 3)
    for m in ALL:
        full = effattn.attention(q, k, v, m)
        part = effattn.attention(q[1:2, 1:], k[1:2, 1:], v[1:2, 1:], m)
        torch.testing.assert_close(full[1:2, 1:], part, atol=1e-12, rtol=1e-10)


# ---------------------------------------------------------------- randomness, options

def test_performer_seed_and_redraw():
    q, k, v = rand_qkv(1, 2, 11, 11, 4, 3)
    a = effattn.attention(q, k, v, "performer", n_features=8, seed=3)
    assert torch.equal(a, effattn.attention(q, k, v, "performer", n_features=8, seed=3))
    assert not torch.allclose(a, effattn.attention(q, k, v, "performer", n_features=8, seed=4))
    w = orthogonal_gaussian(8, 4, torch.Generator().manual_seed(3))
    assert torch.equal(a, effattn.attention(q, k, v, "performer", projection=w))
    reset_feature_generators()
    r1 = effattn.attention(q, k, v, "performer", n_features=8, seed=3, redraw=True)
    r2 = effattn.attention(q, k, v, "performer", n_features=8, seed=3, redraw=True)
    assert not torch.allclose(r1, r2)
    assert torch.equal(r1, a)  # the stream starts where the fixed draw is
    reset_feature_generators()
    assert torch.equal(r1, effattn.attention(q, k, v, "performer", n_features=8, seed=3, redraw=True))
    assert torch.equal(r2, effattn.attention(q, k, v, "performer", n_features=8, seed=3, redraw=True))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    x1 = effattn.attention(q, k, v, "performer", n_features=8, generator=g1)
    x2 = effattn.attention(q, k, v, "performer", n_features=8, generator=g1)
    assert not torch.allclose(x1, x2)
    assert torch.equal(x1, effattn.attention(q, k, v, "performer", n_features=8, generator=g2))
    mod = effattn.get("performer", n_features=8, seed=3)
    assert torch.equal(mod(q, k, v), a)


@pytest.mark.parametrize("method,opts,err", [
    ("performer", {"n_features": 0}, ValueError),
    ("performer", {"kernel": "cosine"}, ValueError),
    ("performer", {"redraw": "yes"}, TypeError),
    ("performer", {"seed": 1.5}, TypeError),
    ("performer", {"projection": torch.randn(4, 5)}, ValueError),
    ("performer", {"generator": 3}, TypeError),
    ("performer", {"chunk": 0}, ValueError),
    ("linear", {"chunk": -1}, ValueError),
    ("taylor", {"chunk": 2.0}, ValueError),
    ("linear", {"n_features": 4}, TypeError),
])
def test_bad_options_raise(method, opts, err):
    q, k, v = rand_qkv(1, 1, 5, 5, 4, 2)
    with pytest.raises(err):
        effattn.attention(q, k, v, method, **opts)


def test_contract_errors():
    q, k, v = rand_qkv(1, 1, 5, 5, 4, 2)
    with pytest.raises(ValueError, match="causal"):
        effattn.attention(q, k, v, "efficient", causal=True)
    for m in ALL:
        with pytest.raises(ValueError, match="shared-QK"):
            effattn.attention(q, None, v, m)
        with pytest.raises(ValueError, match="return_lse"):
            effattn.attention(q, k, v, m, return_lse=True)
    info = {d["name"]: d for d in effattn.methods()}
    assert info["performer"]["random"] and info["performer"]["causal"]
    assert not info["efficient"]["causal"] and info["linear"]["family"] == "kernel"
    assert effattn.api.spec("performer").flops(1, 1, 128, 128, 16, 16, True) > 0


@pytest.mark.parametrize("method,opts", [("linear", {}), ("taylor", {}), ("efficient", {}),
                                         ("performer", {"n_features": 5}),
                                         ("performer", {"n_features": 3, "kernel": "trig"})])
def test_streamed_gradients_across_many_chunks(monkeypatch, method, opts):
    """The non-causal stream with 5 positions per chunk (keys and queries in several
    chunks, one chunk of keys all padding: the running maximum starts at -inf there):
    gradients match finite differences, also with only some inputs requiring grad."""
    from effattn.mechanisms import kernel

    monkeypatch.setattr(kernel, "_stream_rows", lambda B, H, M, n, budget=0: 5)
    q, k, v = rand_qkv(2, 2, 13, 17, 3, 2, grad=True)
    pm = random_padding(2, 17, seed=3)
    pm[0, :5] = False  # the whole first key chunk of batch 0 is padding
    pm[1, 10:] = False

    def f(q, k, v):
        return effattn.attention(q, k, v, method, padding_mask=pm, **opts)

    assert torch.autograd.gradcheck(f, (q, k, v))
    q2 = q.detach()
    assert torch.autograd.gradcheck(lambda k, v: f(q2, k, v), (k, v))
    assert torch.autograd.gradcheck(lambda v: f(q2, k.detach(), v), (v,))


@given(Nq=st.integers(1, 23), Nk=st.integers(1, 23), rows=st.integers(1, 9), pad=st.booleans(),
       empty=st.booleans(), t=st.sampled_from([0.3, 1.0, 4.0]), seed=st.integers(0, 9999))
def test_efficient_stream_equals_dense_with_gradients(Nq, Nk, rows, pad, empty, t, seed):
    """Shen et al.'s attention streamed over chunks of ``rows`` positions (its own forward
    and backward) equals autograd through the dense formula: output and the gradients of
    q, k and v (padding, a batch row with no real key, large temperatures)."""
    from effattn.mechanisms import kernel

    q, k, v = rand_qkv(2, 2, Nq, Nk, 5, 3, seed=seed, grad=True)
    pm = random_padding(2, Nk, seed=seed, empty_row=1 if empty else None) if pad else None
    g = torch.randn(2, 2, Nq, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref = ref_efficient(q * 3, k * 3, v, False, pm, t * t)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel, "_stream_rows", lambda B, H, M, n, budget=0: rows)
        out = effattn.attention(q * 3, k * 3, v, "efficient", padding_mask=pm, scale=t * t)
    grads = torch.autograd.grad(out, (q, k, v), g)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, torch.nan_to_num(b), atol=1e-11, rtol=1e-9)


def test_linear_features_match_elu_plus_one():
    """The exp2-based elu + 1 equals torch's in value and gradient (float32 within exp2's
    error, float64 exactly formed), at 0, at the extremes and for NaN."""
    from effattn.mechanisms.kernel import linear_features

    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-15)):
        x = torch.cat([torch.randn(1000, dtype=dtype) * 4,
                       torch.tensor([0.0, -0.0, -80.0, 60.0, float("-inf"), float("inf")], dtype=dtype)])
        x.requires_grad_(True)
        y = linear_features(x)
        ref = F.elu(x) + 1
        torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
        g = torch.randn_like(x)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                                   rtol=tol, atol=tol)
    assert linear_features(torch.tensor([float("nan")])).isnan().all()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_features, (x,))


def test_performer_projection_gets_gradients(monkeypatch):
    """A projection that requires grad (learned features) gets its gradient through the
    streamed path, as through plain autograd."""
    from effattn.mechanisms import kernel

    monkeypatch.setattr(kernel, "_stream_rows", lambda B, H, M, n, budget=0: 4)
    q, k, v = rand_qkv(1, 2, 9, 11, 3, 2)
    w = performer_projection(6, 3, seed=2, redraw=False).double().requires_grad_(True)
    pm = random_padding(1, 11, seed=8)
    assert torch.autograd.gradcheck(
        lambda w: effattn.attention(q, k, v, "performer", projection=w, padding_mask=pm), (w,))


@given(Nq=st.integers(1, 19), Nk=st.integers(1, 19), rows=st.integers(1, 7), pad=st.booleans(),
       empty=st.booleans(), big=st.booleans(), seed=st.integers(0, 9999))
def test_stream_maps_with_own_backward_equal_the_autograd_graph_path(Nq, Nk, rows, pad, empty, big, seed):
    """Performer-softmax, linear and Taylor maps with their own chunk backward (features
    recomputed, keys against the final maximum) give the same output and q/k/v/projection
    gradients as the same maps run through per-chunk autograd graphs (chunks of ``rows``
    positions, padding, a batch row without keys, key logits spread over ~60 nats so the
    running maximum rises from chunk to chunk)."""
    from effattn.mechanisms import kernel

    q, k, v = rand_qkv(2, 2, Nq, Nk, 4, 3, seed=seed, grad=True)
    k = (k * (4.0 if big else 1.0)).detach().requires_grad_(True)
    pm = random_padding(2, Nk, seed=seed, empty_row=1 if empty else None) if pad else None
    w = performer_projection(6, 4, seed=seed, redraw=False).double().requires_grad_(True)
    g = torch.randn(2, 2, Nq, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    vz = kernel.zero_padded(v, pm)
    cases = {
        "performer": ((kernel.PerformerSoftmaxMap(0.7, True), kernel.PerformerSoftmaxMap(0.7, False)),
                      (lambda x, w_: kernel.performer_features(x, w_, "softmax", True, 0.7)[0],
                       lambda x, w_: (None, kernel.performer_logits(x, w_, 0.7))), (w,), 6),
        "linear": ((kernel.LinearMap(True), kernel.LinearMap(False)),
                   (kernel.linear_features, lambda x: (kernel.linear_features(x), None)), (), 4),
        "taylor": ((kernel.TaylorMap(True), kernel.TaylorMap(False)),
                   (kernel.taylor_features, lambda x: (kernel.taylor_features(x), None)), (), 5),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel, "_stream_rows", lambda B, H, M, n, budget=0: rows)
        for own, graph, params, M in cases.values():
            inputs = (q, k, v, *params)
            res = []
            for maps in (own, graph):
                out = kernel.streamed_feature_attention((q,), (k,), vz, *maps, n_features=M,
                                                        padding_mask=pm, params=params)
                res.append((out, torch.autograd.grad(out, inputs, g, retain_graph=True)))
            torch.testing.assert_close(res[0][0], res[1][0], atol=1e-12, rtol=1e-10)
            for a, b in zip(res[0][1], res[1][1]):
                torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-9)


@pytest.mark.parametrize("method,opts", [("linear", {}),  # own chunk backward
                                         ("performer", {"kernel": "trig", "n_features": 4})])  # chunk graphs
def test_streamed_backward_twice_needs_retain_graph(method, opts):
    """What backward needs is freed unless the graph is retained: a second backward then
    fails as plain autograd does; with retain_graph it gives the same grads."""
    q, k, v = rand_qkv(1, 2, 9, 9, 3, 2, grad=True)
    out = effattn.attention(q, k, v, method, **opts)
    g1 = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    g2 = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="backward through the graph a second time|freed"):
        torch.autograd.grad(out.sum(), (q, k, v))


@settings(deadline=None, max_examples=200)
@given(BH=st.integers(1, 64), M=st.integers(1, 5000), n=st.integers(1, 1 << 20))
def test_stream_chunks_stay_within_four_budgets_and_reach_2048_rows_where_they_can(BH, M, n):
    """A chunk of the streamed feature maps holds at most 4x the 2 MB budget (or 16 rows),
    no more rows than the sequence (or 16), and 2,048 rows wherever that fits in 4x the
    budget (fewer, larger chunks: each costs ~40 torch calls)."""
    from effattn.mechanisms import kernel

    budget = 1 << 19
    rows = kernel._stream_rows(1, BH, M, n, budget)
    assert 1 <= rows <= max(n, 16)
    assert rows * BH * M <= 4 * budget or rows <= 16
    if 2048 * BH * M <= 4 * budget:
        assert rows >= min(n, 2048)


def test_causal_log_scaled_keys_scan_has_no_per_chunk_selects(monkeypatch):
    """The causal torch path with log-scaled key features (Performer; where the native
    kernel does not serve) carries its state across chunks through one unbind of the chunk
    sums, not an index per chunk: each such select's backward fills and adds a gradient the
    size of all chunks, T² memory traffic (at N = 16,384 that made Performer's causal
    training step 6.3 s instead of 0.7 s)."""
    monkeypatch.setattr(kernel_module, "USE_NATIVE_FEATURES", False)
    q, k, v = (torch.randn(1, 2, 64 * 32, 16, requires_grad=True) for _ in range(3))
    out = effattn.attention(q, k, v, "performer", causal=True, n_features=32)
    kinds, seen, stack = collections.Counter(), set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        kinds[type(fn).__name__] += 1
        stack.extend(f for f, _ in fn.next_functions)
    assert kinds["SelectBackward0"] <= 1 and kinds["UnbindBackward0"] >= 1, kinds  # 32 chunks
