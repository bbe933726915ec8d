"""``sparse_strided`` / ``sparse_fixed`` against dense references built from the paper's
definitions (Child et al. 2019, section 4.2), in float64."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import effattn
from effattn.api import shared_qk_keys
from effattn.mechanisms._layout import pattern_reference
from tests.helpers import finite_lse, rand_qkv, random_padding


def strided_parts(N, l):
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    return (i - j).abs() < l, (i - j) % l == 0


def fixed_parts(N, l, c):
    i, j = torch.arange(N)[:, None], torch.arange(N)[None, :]
    return i // l == j // l, (j % l >= l - c).expand(N, N)


def allowed(parts, H, per_head):
    a1, a2 = parts
    if per_head:
        return torch.stack([a1 if h % 2 == 0 else a2 for h in range(H)])[None]
    return a1 | a2


def small(method, **opts):
    """Options for small inputs: the fixed pattern also gets one summary position."""
    return {**opts, "summary": 1} if method == "sparse_fixed" else opts


def reference(q, k, v, allow, causal, pm, shared):
    kr = shared_qk_keys(q) if shared else k
    return pattern_reference(q, kr, v, allow, causal=causal, padding_mask=pm,
                             scale=q.shape[-1] ** -0.5, shared_qk=shared)


@given(method=st.sampled_from(["sparse_strided", "sparse_fixed"]), N=st.integers(1, 50),
       stride=st.integers(1, 9), summary=st.integers(1, 9), block=st.sampled_from([1, 3, 4, 8, 16]),
       causal=st.booleans(), shared=st.booleans(), pad=st.booleans(), per_head=st.booleans(),
       seed=st.integers(0, 99))
def test_matches_paper_definition(method, N, stride, summary, block, causal, shared, pad, per_head, seed):
    B, H = 2, 3
    summary = min(summary, stride)
    q, k, v = rand_qkv(B, H, N, D=4, Dv=3, seed=seed)
    pm = random_padding(B, N, seed=seed) if pad else None
    opts = dict(stride=stride, block_size=block, per_head=per_head)
    if method == "sparse_fixed":
        opts["summary"] = summary
        parts = fixed_parts(N, stride, summary)
    else:
        parts = strided_parts(N, stride)
    out, lse = effattn.attention(q, None if shared else k, v, method, causal=causal, padding_mask=pm,
                                 return_lse=True, **opts)
    ref, ref_lse = reference(q, k, v, allowed(parts, H, per_head), causal, pm, shared)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)


@settings(deadline=None, max_examples=30)
@given(method=st.sampled_from(["sparse_strided", "sparse_fixed"]), N=st.integers(1, 40),
       stride=st.integers(1, 7), block=st.sampled_from([1, 4, 8]), causal=st.booleans(),
       shared=st.booleans(), pad=st.booleans(), per_head=st.booleans(), seed=st.integers(0, 99))
def test_gradients_match_paper_definition(method, N, stride, block, causal, shared, pad, per_head, seed):
    """Gradients of the output and the lse (the union of the two parts runs as one autograd
    node whose backward reuses the union's statistics) against the dense definition."""
    q, k, v = rand_qkv(2, 2, N, D=4, Dv=3, seed=seed, grad=True)
    pm = random_padding(2, N, seed=seed) if pad else None
    opts = small(method, stride=stride, block_size=block, per_head=per_head)
    parts = fixed_parts(N, stride, 1) if method == "sparse_fixed" else strided_parts(N, stride)
    out, lse = effattn.attention(q, None if shared else k, v, method, causal=causal, padding_mask=pm,
                                 return_lse=True, **opts)
    ref, ref_lse = reference(q, k, v, allowed(parts, 2, per_head), causal, pm, shared)
    g = torch.Generator().manual_seed(seed)
    go, gl = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    inputs = (q, v) if shared else (q, k, v)
    ga = torch.autograd.grad((out * go).sum() + (finite_lse(lse) * gl).sum(), inputs)
    gb = torch.autograd.grad((ref * go).sum() + (finite_lse(ref_lse) * gl).sum(), inputs)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("method, opts", [
    ("sparse_fixed", dict(stride=64, summary=1)),     # one block of l covers the sequence
    ("sparse_strided", dict(stride=64)),              # previous l positions cover it
    ("sparse_strided", dict(stride=1)),               # every position is a multiple of 1
])
def test_pattern_covering_everything_is_exact(method, opts, causal):
    q, k, v = rand_qkv(2, 2, 41, D=8, seed=1)
    pm = random_padding(2, 41, seed=1)
    out = effattn.attention(q, k, v, method, causal=causal, padding_mask=pm, block_size=8, **opts)
    ref = effattn.attention(q, k, v, "naive", causal=causal, padding_mask=pm)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("method", ["sparse_strided", "sparse_fixed"])
def test_causal_no_leak_including_gradients(method):
    N, i = 31, 13
    q, k, v = rand_qkv(1, 2, N, D=4, seed=2, grad=True)
    opts = small(method, stride=4, block_size=4)
    out = effattn.attention(q, k, v, method, causal=True, **opts)
    for g in torch.autograd.grad(out[:, :, i].sum(), (q, k, v)):
        assert torch.all(g[:, :, i + 1:] == 0)
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, i + 1:] = torch.randn_like(t[:, :, i + 1:])
        t.requires_grad_(True)  # the same (differentiable) path as out: compared bitwise
    out2 = effattn.attention(q2, k2, v2, method, causal=True, **opts)
    assert torch.equal(out2[:, :, : i + 1], out.detach()[:, :, : i + 1])


@pytest.mark.parametrize("method", ["sparse_strided", "sparse_fixed"])
def test_padding_invariance_and_empty_rows(method):
    q, k, v = rand_qkv(2, 2, 24, D=4, seed=3, grad=True)
    pm = torch.ones(2, 24, dtype=torch.bool)
    pm[0, 17:] = False
    pm[1] = False
    out, lse = effattn.attention(q, k, v, method, padding_mask=pm, return_lse=True, **small(method, stride=5, block_size=4))
    short = effattn.attention(q[:1, :, :17], k[:1, :, :17], v[:1, :, :17], method, **small(method, stride=5, block_size=4))
    # rows < 17 of the padded sequence see exactly the real keys of the short one
    torch.testing.assert_close(out[:1, :, :17], short, atol=1e-12, rtol=1e-12)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    (out.sum() + finite_lse(lse).sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("method", ["sparse_strided", "sparse_fixed"])
@pytest.mark.parametrize("per_head", [False, True])
def test_gradcheck(method, per_head):
    q, k, v = rand_qkv(1, 2, 10, D=3, seed=4, grad=True)
    pm = random_padding(1, 10, seed=4)

    def f(q, k, v):
        o, l = effattn.attention(q, k, v, method, causal=True, padding_mask=pm, return_lse=True,
                                 **small(method, stride=3, block_size=4, per_head=per_head))
        return o, finite_lse(l)

    assert torch.autograd.gradcheck(f, (q, k, v))


@pytest.mark.parametrize("method", ["sparse_strided", "sparse_fixed"])
def test_bf16_large_norm_finite(method):
    q, k, v = rand_qkv(1, 2, 300, D=16, dtype=torch.bfloat16, seed=5)
    out = effattn.attention(q * 300, k * 300, v, method, causal=True, stride=16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_flops_count_the_sparse_work():
    f = effattn.api.spec("sparse_strided").flops
    dense = effattn.api.spec("naive").flops(1, 1, 4096, 4096, 64, 64)
    assert f(1, 1, 4096, 4096, 64, 64, stride=64, block_size=64) < dense / 8
    g = effattn.api.spec("sparse_fixed").flops
    assert g(1, 1, 4096, 4096, 64, 64, stride=64, summary=4, block_size=64) < dense / 4


@pytest.mark.parametrize("method, opts, match", [
    ("sparse_strided", dict(stride=0), "stride"), ("sparse_strided", dict(block_size=0), "block_size"),
    ("sparse_strided", dict(per_head=1), "per_head"), ("sparse_fixed", dict(stride=4, summary=5), "summary"),
    ("sparse_fixed", dict(summary=0), "summary"),
])
def test_rejects_bad_options(method, opts, match):
    q, k, v = rand_qkv(1, 1, 12, D=4)
    with pytest.raises(ValueError, match=match):
        effattn.attention(q, k, v, method, **opts)


def test_rejects_different_key_length():
    q, k, v = rand_qkv(1, 1, 12, Nk=10, D=4)
    with pytest.raises(ValueError, match="Nk"):
        effattn.attention(q, k, v, "sparse_strided", stride=3)


@pytest.mark.parametrize("method", ["sparse_strided", "sparse_fixed"])
def test_no_grad_in_place_merge_equals_the_differentiable_one(method):
    """The union's no-grad forward and its differentiable one give the same outputs and lse,
    padded and empty rows included."""
    q, k, v = rand_qkv(2, 2, 29, D=4, seed=4, grad=True)
    pm = torch.ones(2, 29, dtype=torch.bool)
    pm[0, 20:] = False
    pm[1] = False
    opts = dict(padding_mask=pm, return_lse=True, **small(method, stride=5, block_size=4))
    out, lse = effattn.attention(q, k, v, method, **opts)
    with torch.no_grad():
        out_ng, lse_ng = effattn.attention(q, k, v, method, **opts)
    torch.testing.assert_close(out_ng, out.detach(), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse_ng, lse.detach(), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("class_max", [0, 512])
@pytest.mark.parametrize("causal", [False, True])
def test_residue_classes_as_one_block_or_many_match_the_definition(class_max, causal):
    """Non-causal residue classes up to CLASS_BLOCK_MAX slots run as one engine block each
    (keys a view of the reordered rows); larger ones, and causal ones, in blocks: the same
    attention either way, gradients included."""
    import effattn.mechanisms.sparse as sp

    N, stride, block = 45, 4, 4
    q, k, v = rand_qkv(2, 2, N, D=4, Dv=3, seed=11, grad=True)
    pm = random_padding(2, N, seed=11)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(sp, "CLASS_BLOCK_MAX", class_max)
        _, _, used = sp._residue_plan(N, stride, block, causal, "cpu")
        out = effattn.attention(q, k, v, "sparse_strided", causal=causal, padding_mask=pm,
                                stride=stride, block_size=block)
    assert used == (12 if class_max and not causal else 4)  # 12 = ceil(45/4) -> 3 blocks of 4
    ref, _ = reference(q, k, v, allowed(strided_parts(N, stride), 2, False), causal, pm, False)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    go = torch.randn_like(out)
    ga = torch.autograd.grad((out * go).sum(), (q, k, v))
    gb = torch.autograd.grad((ref * go).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("use_lse", [False, True])
def test_fixed_summary_part_on_sdpa_kernels_matches_definition(use_lse, monkeypatch):
    """float32, non-causal, no padding: sparse_fixed's summary part (every query over every
    summary key) runs through torch's fused CPU flash kernels inside the union — forward and
    backward, from the union's out and lse — and still equals the paper's definition in
    value and gradient; a loss on the lse (a nonzero lse gradient, which those kernels
    cannot take) sends that backward to the engine, also exact."""
    import effattn.mechanisms._union as un

    calls = []
    for name in ("_FLASH", "_FLASH_BACKWARD"):
        fn = getattr(un, name)
        monkeypatch.setattr(un, name, lambda *a, _f=fn, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    N, l, c = 48, 8, 2
    q, k, v = (x.float().requires_grad_() for x in rand_qkv(2, 2, N, D=8, Dv=8, seed=5))
    out, lse = effattn.attention(q, k, v, "sparse_fixed", stride=l, summary=c, block_size=4,
                                 return_lse=True)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref, ref_lse = reference(q64, k64, v64, allowed(fixed_parts(N, l, c), 2, False), False, None, False)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    gl = torch.randn(lse.shape, generator=torch.Generator().manual_seed(2)) if use_lse else None
    loss = (out * go).sum() + ((lse * gl).sum() if use_lse else 0)
    loss_ref = (ref * go.double()).sum() + ((ref_lse * gl.double()).sum() if use_lse else 0)
    ga = torch.autograd.grad(loss, (q, k, v))
    gb = torch.autograd.grad(loss_ref, (q64, k64, v64))
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-6, rtol=1e-5)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)
    assert "_FLASH" in calls
    assert ("_FLASH_BACKWARD" in calls) != use_lse
