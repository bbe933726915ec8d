"""The tensor contract, checked for EVERY registered method through one parametrized module.

Per-method exactness limits live in each family's own test module; here every method —
including ones added later, picked up from the registry — must honour the shape, dtype,
padding, empty-row, causal and error rules of DESIGN.md.  Options below only shrink
block/window sizes so that small test inputs exercise the approximate paths.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

import effattn
from effattn.api import spec
from tests.helpers import rand_qkv, random_padding

SMALL = {
    "blockwise": lambda N: dict(block_q=4, block_k=8),
    "lsh": lambda N: dict(n_hashes=2, chunk_len=4, seed=0),
    "sparse_strided": lambda N: dict(stride=4),
    "sparse_fixed": lambda N: dict(stride=4, summary=1),
    "longformer": lambda N: dict(window=3),
    "bigbird": lambda N: dict(block_size=4, n_random_blocks=1, seed=0),
    "linformer": lambda N: dict(k=4, max_len=64, seed=0),
    "nystrom": lambda N: dict(n_landmarks=4),
    "performer": lambda N: dict(n_features=32, seed=0),
    "linear": lambda N: {},
    "efficient": lambda N: {},
    "taylor": lambda N: {},
    "window2d": lambda N: dict(grid=(1, N), window=(1, 4)),
}

METHODS = [m["name"] for m in effattn.methods()]
CAUSAL = [m["name"] for m in effattn.methods() if m["causal"]]
NON_CAUSAL = [m["name"] for m in effattn.methods() if not m["causal"]]


def options(name, N):
    opts = SMALL.get(name, lambda N: {})(N)
    return {k: v for k, v in opts.items() if k in spec(name).options or spec(name).module is not None}


def call(name, q, k, v, **kw):
    """``effattn.attention`` for plain methods, the module from ``effattn.get`` for learned ones."""
    opts = options(name, q.shape[2])
    if spec(name).module is not None:
        torch.manual_seed(0)
        return effattn.get(name, **opts).to(q.dtype)(q, k, v, **kw)
    return effattn.attention(q, k, v, name, **kw, **opts)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("N", [1, 13, 29])
def test_shape_dtype_and_any_length(name, N):
    q, k, v = rand_qkv(2, 2, N, N, 8, 6, dtype=torch.float32)
    out = call(name, q, k, v)
    assert out.shape == (2, 2, N, 6) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", METHODS)
def test_padded_keys_never_change_real_outputs(name):
    N = 24
    q, k, v = rand_qkv(2, 2, N, N, 8)
    pm = random_padding(2, N, seed=4)
    out = call(name, q, k, v, padding_mask=pm)
    k2, v2 = k.clone(), v.clone()
    pad = ~pm[:, None, :, None]
    k2 = torch.where(pad, torch.randn_like(k) * 10, k)
    v2 = torch.where(pad, torch.randn_like(v) * 10, v)
    out2 = call(name, q, k2, v2, padding_mask=pm)
    real = pm[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], out2[real], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", METHODS)
def test_query_with_no_key_outputs_zero_with_finite_grads(name):
    N = 16
    q, k, v = rand_qkv(2, 2, N, N, 8, grad=True)
    pm = random_padding(2, N, empty_row=1)
    out = call(name, q, k, v, padding_mask=pm)
    assert torch.count_nonzero(out[1]) == 0
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_gradient_to_later_positions_is_exactly_zero(name):
    N, i = 24, 9
    q, k, v = rand_qkv(1, 2, N, N, 8, grad=True)
    out = call(name, q, k, v, causal=True)
    out[:, :, i].sum().backward()
    for t in (q, k, v):
        assert torch.count_nonzero(t.grad[:, :, i + 1:]) == 0, name


@pytest.mark.parametrize("name", NON_CAUSAL)
def test_non_causal_methods_refuse_causal(name):
    q, k, v = rand_qkv(1, 1, 8, 8, 4)
    with pytest.raises(ValueError, match="causal"):
        call(name, q, k, v, causal=True)


@pytest.mark.parametrize("name", METHODS)
def test_unknown_option_is_an_error(name):
    q, k, v = rand_qkv(1, 1, 8, 8, 4)
    with pytest.raises(TypeError, match="not_an_option"):
        if spec(name).module is not None:
            effattn.get(name, not_an_option=1)
        else:
            effattn.attention(q, k, v, name, not_an_option=1)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_large_norms_are_finite(name, dtype):
    q, k, v = rand_qkv(1, 2, 32, 32, 16, dtype=torch.float32)
    out = call(name, (q * 30).to(dtype), (k * 30).to(dtype), v.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()


@pytest.mark.parametrize("name", METHODS)
def test_batch_elements_are_independent(name):
    q, k, v = rand_qkv(3, 2, 20, 20, 8)
    pm = random_padding(3, 20, seed=2)
    out = call(name, q, k, v, padding_mask=pm)
    one = call(name, q[1:2], k[1:2], v[1:2], padding_mask=pm[1:2])
    torch.testing.assert_close(out[1:2], one, atol=1e-9, rtol=1e-9)


@given(name=st.sampled_from(METHODS), B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 40),
       D=st.sampled_from([4, 8]), causal=st.booleans(), pad=st.booleans(), seed=st.integers(0, 999))
def test_random_shapes_and_masks_are_finite_and_padding_safe(name, B, H, N, D, causal, pad, seed):
    causal = causal and name in CAUSAL
    q, k, v = rand_qkv(B, H, N, N, D, seed=seed)
    pm = random_padding(B, N, seed=seed) if pad else None
    out = call(name, q, k, v, causal=causal, padding_mask=pm)
    assert out.shape == (B, H, N, D) and torch.isfinite(out).all()


@pytest.mark.parametrize("name, causal", [(n, False) for n in METHODS] + [(n, True) for n in CAUSAL])
def test_bf16_matches_float32_within_bf16_tolerance(name, causal):
    """bf16 inputs (which may run bf16 matmuls) give outputs and gradients within bf16
    rounding of the float32 run on the same values: softmax statistics, merges and gradient
    accumulators stay float32 (bf16 statistics would put errors of ~|lse|·2^-8 on top)."""
    pm = random_padding(2, 64, seed=1)
    q, k, v = rand_qkv(2, 2, 64, 64, 16, seed=3)
    q, k, v = (t.bfloat16().float().requires_grad_() for t in (3 * q, k, v))  # peaked softmax
    out = call(name, q, k, v, causal=causal, padding_mask=pm)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    ref = torch.autograd.grad((out * go).sum(), (q, k, v))
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    outb = call(name, qb, kb, vb, causal=causal, padding_mask=pm)
    got = torch.autograd.grad((outb.float() * go).sum(), (qb, kb, vb))
    assert outb.dtype == torch.bfloat16
    assert (outb.float() - out).norm() / out.norm() < 1.5e-2
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16
        assert (a.float() - b).norm() / b.norm() < 1.5e-2
