"""Low-rank attention (Linformer, Nyström): exact in their limits (identity projections,
one landmark per token), errors shrink as the rank grows, padding never matters, neither
pretends to be causal, and both obey the tensor contract (gradients, dtypes, errors)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, strategies as st

import effattn
from effattn.mechanisms.lowrank import (
    LinformerAttention, NystromAttention, iterative_pinv, linformer_attention, nystrom_attention,
    segment_means, sequence_projection,
)
from tests.helpers import finite_lse, rand_qkv, random_padding


def identity_linformer(N, max_len=None, share_kv=False):
    """A float64 Linformer module whose projections are [I_N | junk beyond N]."""
    m = effattn.get("linformer", k=N, max_len=max_len or N, share_kv=share_kv).double()
    with torch.no_grad():
        for P in (m.E, m.F):
            if P is not None:
                P.normal_()
                P[:, :N] = torch.eye(N)
    return m


def subsample(k, N):
    """``[k, N]`` rows of the identity at evenly spaced positions."""
    return torch.eye(N, dtype=torch.float64)[(torch.arange(k) * N) // k]


def smooth_inputs(seed, B=2, H=4, N=64, D=8, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64) * scale
    k = torch.randn(B, H, N, D, generator=g, dtype=torch.float64) * scale
    v = torch.randn(B, H, N, 4, generator=g, dtype=torch.float64)
    return q, k, v


# ---------------------------------------------------------------- Linformer

@given(N=st.integers(1, 25), extra=st.integers(0, 6), pad=st.booleans(), empty=st.booleans(),
       share=st.booleans(), seed=st.integers(0, 9999))
def test_linformer_identity_projection_is_exact(N, extra, pad, empty, share, seed):
    q, k, v = rand_qkv(2, 2, N, N, 5, 3, seed=seed)
    pm = random_padding(2, N, seed=seed, empty_row=1 if empty else None) if pad else None
    mod = identity_linformer(N, N + extra, share_kv=share)
    ref, ref_lse = effattn.attention(q, k, v, "naive", padding_mask=pm, return_lse=True)
    out, lse = mod(q, k, v, padding_mask=pm, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-10)


def test_linformer_functional_identity_and_cross_lengths():
    q, k, v = rand_qkv(2, 2, 9, 13, 4, 3)
    pm = random_padding(2, 13)
    out, _ = linformer_attention(q, k, v, padding_mask=pm, scale=0.5, E=torch.eye(13, 20, dtype=torch.float64))
    torch.testing.assert_close(out, effattn.attention(q, k, v, "naive", padding_mask=pm, scale=0.5))


def test_linformer_error_shrinks_as_k_grows():
    """Subsampling projections (rows of I): more kept keys, smaller error; k = N exact."""
    q, k, v = smooth_inputs(0)
    ref = effattn.attention(q, k, v, "naive")
    errs = [(linformer_attention(q, k, v, scale=8 ** -0.5, E=subsample(r, 64))[0] - ref).abs().mean().item()
            for r in (4, 8, 16, 32, 64)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-14


def test_linformer_module_contract():
    mod = LinformerAttention(k=4, max_len=16, seed=0)
    assert {n for n, _ in mod.named_parameters()} == {"E", "F"}
    assert {n for n, _ in LinformerAttention(k=4, max_len=16, share_kv=True).named_parameters()} == {"E"}
    assert torch.equal(LinformerAttention(k=4, max_len=16, seed=0).E, mod.E)
    q, k, v = rand_qkv(2, 2, 11, 11, 4, 3, dtype=torch.float32)
    out = mod(q, k, v)
    assert out.shape == (2, 2, 11, 3) and out.dtype == torch.float32
    out.sum().backward()
    assert mod.E.grad is not None and (mod.E.grad[:, 11:] == 0).all() and mod.E.grad[:, :11].abs().sum() > 0
    with pytest.raises(ValueError, match="max_len"):
        mod(*rand_qkv(1, 1, 17, 17, 4, 3, dtype=torch.float32))
    with pytest.raises(ValueError, match="future"):
        mod(q, k, v, causal=True)
    with pytest.raises(ValueError, match="shared-QK"):
        mod(q, None, v)
    with pytest.raises(ValueError, match="effattn.get"):
        effattn.attention(q, k, v, "linformer")
    for bad, err in (({"k": 0}, ValueError), ({"max_len": -3}, ValueError),
                     ({"share_kv": "no"}, TypeError), ({"seed": 1.5}, TypeError), ({"rank": 3}, TypeError)):
        with pytest.raises(err):
            effattn.get("linformer", **bad)


def test_linformer_padding_fully_masked_and_gradcheck():
    mod = LinformerAttention(k=5, max_len=12, seed=1).double()
    q, k, v = rand_qkv(2, 2, 9, 9, 3, 2, grad=True)
    pm = random_padding(2, 9, seed=2, empty_row=1)
    out, lse = mod(q, k, v, padding_mask=pm, return_lse=True)
    pad = ~pm[:, None, :, None]
    for want_lse in (True, False):  # the lse path and the fused (SDPA) path
        out2 = mod(q, torch.where(pad, torch.full_like(k, float("nan")), k),
                   torch.where(pad, torch.full_like(v, 1e30), v), padding_mask=pm,
                   return_lse=want_lse)
        out2 = out2[0] if want_lse else out2
        if want_lse:
            assert torch.equal(out, out2)
        else:
            torch.testing.assert_close(out2, out, rtol=1e-12, atol=1e-12)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    grads = torch.autograd.grad(out.sum() + finite_lse(lse).sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)

    def f(q, k, v):
        o, l = mod(q, k, v, padding_mask=pm, return_lse=True)
        return o, finite_lse(l)

    assert torch.autograd.gradcheck(f, (q, k, v))


@given(N=st.integers(1, 70), k=st.sampled_from([16, 32, 48]), pad=st.booleans(),
       empty=st.booleans(), share=st.booleans(), seed=st.integers(0, 9999))
def test_linformer_float32_fused_path_matches_the_lse_path(N, k, pad, empty, share, seed):
    """On float32 CPU inputs the fused path runs the queries-over-landmarks kernel with the
    projected keys as landmarks (where it serves: k and D multiples of the vector width);
    outputs and every gradient (q, k, v, E, F) match the unfused lse path, padding and a
    keyless batch row included."""
    mod = LinformerAttention(k=k, max_len=N + 3, share_kv=share, seed=seed)
    q, k_, v = (t.float().requires_grad_() for t in rand_qkv(2, 2, N, N, 16, 16, seed=seed))
    pm = random_padding(2, N, seed=seed, empty_row=1 if empty else None) if pad else None
    params = [p for p in (mod.E, mod.F) if p is not None]
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(2, 2, N, 16, generator=g)
    results = []
    for want_lse in (True, False):
        got = mod(q, k_, v, padding_mask=pm, return_lse=want_lse)
        out = got[0] if want_lse else got
        results.append((out, torch.autograd.grad((out * dout).sum(), (q, k_, v, *params))))
    (o1, g1), (o2, g2) = results
    torch.testing.assert_close(o2, o1, rtol=1e-4, atol=1e-5)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- Nyström

def _landmark_kernel_cond(q, k, pm):
    """Largest condition number over (batch, head) of the softmax kernel among real tokens
    (what Nyström inverts when every token is a landmark)."""
    worst = 1.0
    for b in range(q.shape[0]):
        m = slice(None) if pm is None else pm[b]
        qb, kb = q[b][:, m], k[b][:, m]
        if qb.shape[1]:
            probs = torch.softmax(qb @ kb.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
            worst = max(worst, float(torch.linalg.cond(probs).max()))
    return worst


@given(N=st.integers(1, 24), pad=st.booleans(), empty=st.booleans(), seed=st.integers(0, 9999))
def test_nystrom_one_landmark_per_token_is_exact(N, pad, empty, seed):
    q, k, v = rand_qkv(2, 2, N, N, 5, 3, seed=seed)
    q, k = 2 * q, 2 * k  # sharper softmax: a better-conditioned landmark kernel
    pm = random_padding(2, N, seed=seed, empty_row=1 if empty else None) if pad else None
    # the limit is exact once the iterative pseudo-inverse has converged: 40 iterations do
    # up to cond ~1e6 (N = 21, seed 183, padded: cond 6e7, error 1e-5 after 40 and 2e-6 after
    # 60 -- the iteration, not a wrong landmark, which is off by > 1e-3)
    assume(_landmark_kernel_cond(q, k, pm) < 1e6)
    ref = effattn.attention(q, k, v, "naive", padding_mask=pm)
    out = effattn.attention(q, k, v, "nystrom", padding_mask=pm, n_landmarks=N, pinv_iters=40)
    torch.testing.assert_close(out, ref, atol=1e-8, rtol=1e-7)


def test_nystrom_error_shrinks_as_landmarks_grow():
    """With the paper's 6 pseudo-inverse iterations (a regularized inverse)."""
    q, k, v = smooth_inputs(1)
    ref = effattn.attention(q, k, v, "naive")
    errs = [(effattn.attention(q, k, v, "nystrom", n_landmarks=m) - ref).abs().mean().item()
            for m in (2, 8, 32, 64)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_segment_means_uneven_and_padded():
    x = torch.arange(7, dtype=torch.float64).reshape(1, 1, 7, 1)
    means, ne = segment_means(x, 3, None)  # segments {0,1,2}, {3,4}, {5,6}
    torch.testing.assert_close(means.flatten(), torch.tensor([1.0, 3.5, 5.5], dtype=torch.float64))
    valid = torch.tensor([[True, False, True, False, False, True, True]])
    means, ne = segment_means(x, 3, valid)
    torch.testing.assert_close(means.flatten(), torch.tensor([1.0, 0.0, 5.5], dtype=torch.float64))
    assert ne.tolist() == [[True, False, True]]


@given(N=st.integers(1, 40), S=st.integers(1, 40), pad=st.booleans(), seed=st.integers(0, 9999))
def test_segment_means_equal_a_loop_over_segments_with_gradients(N, S, pad, seed):
    """Divisible (reshaped sum) or not (index_add): the mean of each segment
    ``{n : floor(n S / N) = s}`` over its real tokens, padded contents never read, and
    gradcheck through both paths."""
    assume(S <= N)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, N, 4, generator=g, dtype=torch.float64, requires_grad=True)
    valid = random_padding(2, N, seed=seed) if pad else None
    xp = x if valid is None else x.masked_fill(~valid[:, None, :, None], float("nan"))
    means, ne = segment_means(xp, S, valid)
    seg = torch.arange(N) * S // N
    for s in range(S):
        cols = seg == s
        m = cols[None].expand(2, N) if valid is None else valid & cols[None]
        for b in range(2):
            assert bool(ne[min(b, ne.shape[0] - 1), s]) == bool(m[b].any())
            ref = x[b, :, m[b]].mean(1) if m[b].any() else torch.zeros(3, 4, dtype=torch.float64)
            torch.testing.assert_close(means[b, :, s], ref, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(lambda t: segment_means(t, S, valid)[0], (x,))


def test_iterative_pinv_converges_to_pinv():
    g = torch.Generator().manual_seed(0)
    A = torch.softmax(torch.randn(3, 6, 6, generator=g, dtype=torch.float64), -1)
    torch.testing.assert_close(iterative_pinv(A, 40), torch.linalg.pinv(A), atol=1e-9, rtol=1e-8)
    assert (iterative_pinv(torch.zeros(2, 4, 4), 6) == 0).all()


def test_nystrom_conv_residual():
    q, k, v = rand_qkv(2, 3, 10, 10, 4, 2)
    pm = random_padding(2, 10, seed=1)
    w = torch.randn(3, 5, dtype=torch.float64)
    base = effattn.attention(q, k, v, "nystrom", padding_mask=pm, n_landmarks=4)
    out = effattn.attention(q, k, v, "nystrom", padding_mask=pm, n_landmarks=4, conv_weight=w)
    vz = v.masked_fill(~pm[:, None, :, None], 0.0)
    manual = torch.zeros_like(vz)
    for h in range(3):
        for i in range(10):
            for t in range(5):
                j = i + t - 2
                if 0 <= j < 10:
                    manual[:, h, i] += w[h, t] * vz[:, h, j]
    torch.testing.assert_close(out - base, manual)
    mod = NystromAttention(n_landmarks=4, conv_kernel=5, num_heads=3).double()
    with torch.no_grad():
        mod.conv.copy_(w)
    torch.testing.assert_close(mod(q, k, v, padding_mask=pm), out)
    mod(q, k, v).sum().backward()
    assert mod.conv.grad is not None and mod.conv.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="odd"):
        NystromAttention(conv_kernel=4, num_heads=3)
    with pytest.raises(ValueError, match="conv_weight"):
        effattn.attention(q, k, v, "nystrom", conv_weight=torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="Nq == Nk"):
        effattn.attention(q[:, :, :5], k, v, "nystrom", conv_weight=w)


def test_nystrom_padding_fully_masked_gradcheck():
    q, k, v = rand_qkv(2, 2, 11, 11, 3, 2, grad=True)
    pm = random_padding(2, 11, seed=3, empty_row=1)
    out = effattn.attention(q, k, v, "nystrom", padding_mask=pm, n_landmarks=4)
    pad = ~pm[:, None, :, None]
    junk = [torch.where(pad, torch.full_like(t, 1e30), t) for t in (q, k, v)]
    out2 = effattn.attention(*junk, "nystrom", padding_mask=pm, n_landmarks=4)
    real = pm[:, None, :, None].expand_as(out)
    assert torch.equal(out[real], out2[real])  # padded queries/keys/values never matter
    assert (out[1] == 0).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.autograd.gradcheck(
        lambda q, k, v: effattn.attention(q, k, v, "nystrom", padding_mask=pm, n_landmarks=4, pinv_iters=3),
        (q, k, v))
    qc, kc, vc = rand_qkv(1, 2, 6, 9, 3, 2, grad=True)  # cross-attention lengths, odd N
    assert torch.autograd.gradcheck(
        lambda q, k, v: effattn.attention(q, k, v, "nystrom", n_landmarks=4, pinv_iters=2), (qc, kc, vc))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_large_norms_finite(dtype):
    q, k, v = rand_qkv(1, 2, 50, 50, 16, 8, dtype=torch.float32)
    q, k, v = (q * 30).to(dtype), (k * 30).to(dtype), v.to(dtype)
    pm = random_padding(1, 50, seed=4)
    out = effattn.attention(q, k, v, "nystrom", padding_mask=pm, n_landmarks=8)
    assert out.dtype == dtype and torch.isfinite(out).all()
    mod = LinformerAttention(k=8, max_len=64, seed=0)
    out = mod(q, k, v, padding_mask=pm)
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_nystrom_options_and_contract():
    q, k, v = rand_qkv(1, 1, 5, 5, 4, 2)
    with pytest.raises(ValueError, match="landmark pooling|future"):
        effattn.attention(q, k, v, "nystrom", causal=True)
    for bad in ({"n_landmarks": 0}, {"pinv_iters": -1}, {"n_landmarks": 2.5}):
        with pytest.raises(ValueError):
            effattn.attention(q, k, v, "nystrom", **bad)
    with pytest.raises(TypeError):
        effattn.attention(q, k, v, "nystrom", conv_weight="x")
    with pytest.raises(ValueError, match="shared-QK"):
        effattn.attention(q, None, v, "nystrom")
    info = {d["name"]: d for d in effattn.methods()}
    assert info["linformer"]["learned"] and not info["linformer"]["causal"]
    assert info["nystrom"]["family"] == "lowrank" and not info["nystrom"]["lse"]
    for name in ("linformer", "nystrom"):
        assert effattn.api.spec(name).flops(1, 2, 256, 256, 16, 16, False) > 0
    # more landmarks than tokens: clamped to N (then exact with enough iterations)
    torch.testing.assert_close(effattn.attention(q, k, v, "nystrom", n_landmarks=64, pinv_iters=40),
                               effattn.attention(q, k, v, "naive"), atol=1e-9, rtol=1e-8)


@given(B=st.integers(0, 2), H=st.integers(1, 3), N=st.integers(1, 20), k=st.integers(1, 6),
       D=st.integers(1, 5), p_grad=st.booleans(), x_grad=st.booleans(), seed=st.integers(0, 9999))
def test_sequence_projection_equals_matmul_with_gradients(B, H, N, k, D, p_grad, x_grad, seed):
    """Linformer's projection (a forward on detached tensors, the backward written out)
    is ``P @ x`` per head, with the same gradients for whichever inputs need them —
    also for a column slice of a longer ``P`` (``E[:, :N]``)."""
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(k, N + 3, generator=g, dtype=torch.float64).requires_grad_(p_grad)
    x = torch.randn(B, H, N, D, generator=g, dtype=torch.float64).requires_grad_(x_grad)
    go = torch.randn(B, H, k, D, generator=g, dtype=torch.float64)
    ours = sequence_projection(E[:, :N], x)
    ref = torch.matmul(E[:, :N], x)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    wants = [t for t in (E, x) if t.requires_grad]
    if wants:
        for a, b in zip(torch.autograd.grad(ours, wants, go), torch.autograd.grad(ref, wants, go)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    else:
        assert not ours.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(sequence_projection(E[:, :N], x), ref.detach())
