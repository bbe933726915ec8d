"""The contract's argument checks, the registry and the module form."""

import pytest
import torch

import effattn
from effattn.api import shared_qk_keys
from tests.helpers import rand_qkv


def qkv():
    return rand_qkv(2, 3, 8, 8, 4, dtype=torch.float32)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "q"),
        (lambda q, k, v: (q, k[:, :2], v), ValueError, "k"),
        (lambda q, k, v: (q, k[..., :3], v), ValueError, "k"),
        (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, "v"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "k"),
        (lambda q, k, v: (q, k, v.double()), TypeError, "v"),
        (lambda q, k, v: (q.long(), k, v), TypeError, "q"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "k"),
        (lambda q, k, v: (q, k, v.to("meta")), ValueError, "v"),
    ],
)
def test_bad_tensors_name_the_argument(mutate, exc, match):
    q, k, v = mutate(*qkv())
    with pytest.raises(exc, match=match):
        effattn.attention(q, k, v)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(padding_mask=torch.ones(2, 8)), TypeError, "padding_mask"),
        (dict(padding_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError, "padding_mask"),
        (dict(padding_mask=torch.ones(2, 8, dtype=torch.bool, device="meta")), ValueError, "padding_mask"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(scale="x"), TypeError, "scale"),
        (dict(causal=1), TypeError, "causal"),
        (dict(return_lse="yes"), TypeError, "return_lse"),
        (dict(method="nope"), ValueError, "method"),
        (dict(method="full", bogus=3), TypeError, "bogus"),
        (dict(method="blockwise", chunk_len=3), TypeError, "chunk_len"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    q, k, v = qkv()
    with pytest.raises(exc, match=match):
        effattn.attention(q, k, v, **kwargs)


def test_methods_listing_has_the_contract_fields():
    rows = effattn.methods()
    names = [m["name"] for m in rows]
    assert {"naive", "full", "blockwise"} <= set(names)
    assert len(names) == len(set(names))
    for m in rows:
        assert isinstance(m["exact"], bool) and isinstance(m["causal"], bool)
        assert m["time"].startswith("O(") and m["memory"]
        assert m["flops"] and isinstance(m["options"], dict)


def test_every_method_flops_is_positive():
    from effattn.api import spec

    needs = {"window2d": {"grid": (64, 64)}}  # a 2-D method needs its grid (64*64 = 4096)
    for m in effattn.methods():
        opts = {**m["options"], **needs.get(m["name"], {})}
        f = spec(m["name"]).flops(1, 4, 4096, 4096, 64, 64, False, **opts)
        assert f > 0 and f == f and f != float("inf")


def test_get_returns_a_module_bound_to_its_options():
    q, k, v = qkv()
    mod = effattn.get("blockwise", block_q=2, block_k=4)
    assert isinstance(mod, torch.nn.Module)
    torch.testing.assert_close(mod(q, k, v, causal=True), effattn.attention(q, k, v, "naive", causal=True))
    with pytest.raises(TypeError, match="bogus"):
        effattn.get("blockwise", bogus=1)
    with pytest.raises(ValueError, match="method"):
        effattn.get("nope")


def test_shared_qk_keys_are_rms_normalized():
    q = torch.randn(2, 3, 5, 8)
    k = shared_qk_keys(q)
    torch.testing.assert_close(k.pow(2).mean(-1), torch.ones(2, 3, 5), atol=1e-4, rtol=0)
    assert shared_qk_keys(q.bfloat16()).dtype == torch.bfloat16


def test_shared_qk_keys_gradient_is_the_rms_norms():
    """The keys' one-pass backward is the derivative of ``x rsqrt(mean(x²) + eps)``:
    gradcheck in float64 (a zero row included, where only ``eps`` keeps it finite), and in
    float32 the plain expression's autograd gradient; bf16 queries get bf16-cast keys whose
    gradient reaches them."""
    q = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    q[0, 1, 2] = 0.0
    assert torch.autograd.gradcheck(shared_qk_keys, (q.requires_grad_(True),))
    x = torch.randn(2, 3, 7, 8, requires_grad=True)
    g = torch.randn(2, 3, 7, 8)
    ours, = torch.autograd.grad(shared_qk_keys(x), x, g)
    plain, = torch.autograd.grad(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), x, g)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    xb = x.detach().bfloat16().requires_grad_(True)
    shared_qk_keys(xb).float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad).all()
