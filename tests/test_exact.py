"""Exact methods: ``naive`` is the reference; ``full`` (SDPA) and ``blockwise`` (FlashAttention)
must equal it in float64 for every mask combination, keep causality bit-exactly, and
give finite gradients on rows with nothing to attend to."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

import effattn
from tests.helpers import finite_lse, rand_qkv, random_padding

EXACT = ["full", "blockwise"]
TILES = {"blockwise": {"block_q": 8, "block_k": 16}, "full": {}}


def test_naive_matches_textbook_softmax():
    q, k, v = rand_qkv(2, 2, 9, 13, 4, 3)
    pm = random_padding(2, 13)
    s = q @ k.transpose(-1, -2) / 2.0
    s = s.masked_fill(~pm[:, None, None, :], float("-inf"))
    ref = torch.softmax(s, -1) @ v
    out, lse = effattn.attention(q, k, v, "naive", padding_mask=pm, return_lse=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


@given(Nq=st.integers(1, 40), Nk=st.integers(1, 40), causal=st.booleans(), pad=st.booleans(),
       shared=st.booleans(), empty=st.booleans(), seed=st.integers(0, 10_000))
def test_exact_methods_equal_naive(Nq, Nk, causal, pad, shared, empty, seed):
    if shared:
        Nk = Nq
    q, k, v = rand_qkv(2, 2, Nq, Nk, 6, 5, seed=seed)
    k = None if shared else k
    pm = random_padding(2, Nk, seed=seed, empty_row=1 if empty else None) if pad else None
    ref, ref_lse = effattn.attention(q, k, v, "naive", causal=causal, padding_mask=pm, return_lse=True)
    for m in EXACT:
        out = effattn.attention(q, k, v, m, causal=causal, padding_mask=pm, **TILES[m])
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
        out, lse = effattn.attention(q, k, v, m, causal=causal, padding_mask=pm, return_lse=True, **TILES[m])
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("shared", [False, True])
def test_gradients_equal_naive_including_empty_rows(method, shared):
    q, k, v = rand_qkv(2, 2, 21, 21, 4, 3, grad=True)
    kk = None if shared else k
    pm = random_padding(2, 21, empty_row=1)
    args = (q, v) if shared else (q, k, v)
    go = torch.randn(2, 2, 21, 3, dtype=torch.float64)
    grads = {}
    for m in ("naive", method):
        out = effattn.attention(q, kk, v, m, causal=True, padding_mask=pm, **TILES.get(m, {}))
        grads[m] = torch.autograd.grad((out * go).sum(), args)
    for a, b in zip(grads["naive"], grads[method]):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, atol=1e-10, rtol=1e-9)


def test_blockwise_gradcheck_with_lse():
    q, k, v = rand_qkv(1, 2, 10, 7, 3, 2, grad=True)
    pm = random_padding(1, 7, seed=3)

    def f(q, k, v):
        o, l = effattn.attention(q, k, v, "blockwise", causal=True, padding_mask=pm, return_lse=True,
                                 block_q=3, block_k=2)
        return o, finite_lse(l)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("method", ["naive"] + EXACT)
def test_causal_no_leak_bit_exact(method):
    N, i = 40, 17
    q, k, v = rand_qkv(1, 2, N, N, 8, dtype=torch.float32)
    out = effattn.attention(q, k, v, method, causal=True, **TILES.get(method, {}))
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[:, :, i + 1:] = torch.randn_like(t[:, :, i + 1:]) * 5
    out2 = effattn.attention(q2, k2, v2, method, causal=True, **TILES.get(method, {}))
    assert torch.equal(out[:, :, : i + 1], out2[:, :, : i + 1])
    # gradient of output i to every later position is exactly zero
    qg, kg, vg = (t.clone().double().requires_grad_(True) for t in (q, k, v))
    o = effattn.attention(qg, kg, vg, method, causal=True, **TILES.get(method, {}))
    o[:, :, i].sum().backward()
    for t in (qg, kg, vg):
        assert torch.count_nonzero(t.grad[:, :, i + 1:]) == 0
    assert torch.count_nonzero(kg.grad[:, :, : i + 1]) > 0


@pytest.mark.parametrize("method", ["naive"] + EXACT)
def test_padding_content_never_matters(method):
    q, k, v = rand_qkv(2, 2, 19, 23, 4)
    pm = random_padding(2, 23, seed=7)
    out = effattn.attention(q, k, v, method, padding_mask=pm, **TILES.get(method, {}))
    k2, v2 = k.clone(), v.clone()
    k2[~pm[:, None, :, None].expand_as(k)] = 1e3
    v2[~pm[:, None, :, None].expand_as(v)] = -7.0
    out2 = effattn.attention(q, k2, v2, method, padding_mask=pm, **TILES.get(method, {}))
    torch.testing.assert_close(out, out2, atol=1e-12, rtol=0)


def test_shared_qk_excludes_self_unless_alone():
    q, _, v = rand_qkv(1, 1, 6, 6, 4)
    out = effattn.attention(q, None, v, "naive", causal=True)
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0])  # nothing else allowed: itself
    # with self-exclusion the second token can only see the first
    torch.testing.assert_close(out[0, 0, 1], v[0, 0, 0], atol=1e-12, rtol=0)
    # shared keys are the RMS-normalized queries: score = q_i . q_j / |q_j| at the default scale
    kn = q / q.norm(dim=-1, keepdim=True) * math.sqrt(4)
    s = (q @ kn.transpose(-1, -2)) / 2.0 - 1e5 * torch.eye(6, dtype=q.dtype)
    torch.testing.assert_close(effattn.attention(q, None, v, "naive"), torch.softmax(s, -1) @ v,
                               atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["naive"] + EXACT)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_large_norms_finite_and_close(method, dtype):
    q, k, v = rand_qkv(1, 2, 33, 33, 16, dtype=torch.float32)
    q, k = q * 30, k * 30
    ref = effattn.attention(q, k, v, "naive", causal=True)
    out = effattn.attention(q.to(dtype), k.to(dtype), v.to(dtype), method, causal=True, **TILES.get(method, {}))
    assert out.dtype == dtype and torch.isfinite(out).all()
    # large norms make the softmax nearly one-hot: agreement up to the inputs' rounding
    assert (out.float() - ref).abs().mean() < 0.15


@pytest.mark.parametrize("method", EXACT)
def test_batch_and_head_independence(method):
    q, k, v = rand_qkv(3, 2, 12, 12, 4)
    out = effattn.attention(q, k, v, method, causal=True, **TILES[method])
    one = effattn.attention(q[1:2, 1:2], k[1:2, 1:2], v[1:2, 1:2], method, causal=True, **TILES[method])
    torch.testing.assert_close(out[1:2, 1:2], one, atol=1e-12, rtol=0)


def test_blockwise_rejects_bad_tiles():
    q, k, v = rand_qkv(1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="block_q"):
        effattn.attention(q, k, v, "blockwise", block_q=0)
