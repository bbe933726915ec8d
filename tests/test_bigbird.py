"""``bigbird`` / ``bigbird_etc`` against a dense reference built from the block-level
definition (window, ITC global blocks, the drawn random blocks), in float64; the random
draw itself is checked for its rules (excluded blocks, past only when causal, count,
reproducibility)."""

import pytest
import torch
from hypothesis import given, strategies as st

import effattn
from effattn.api import shared_qk_keys
from effattn.mechanisms._layout import pattern_reference
from effattn.mechanisms.bigbird import bigbird_block_pattern
from tests.helpers import finite_lse, rand_qkv, random_padding


def bigbird_allowed(N, H, b, nw, ng, nr, seed, causal):
    """``[1, H, N, N]`` from the definition; random blocks from the library's draw."""
    nb = -(-N // b)
    _, rand = bigbird_block_pattern(nb, H, n_window_blocks=nw, n_global_blocks=ng,
                                    n_random_blocks=nr, seed=seed, causal=causal)
    qb = torch.arange(N)[:, None] // b
    kb = torch.arange(N)[None, :] // b

    def is_global(x):
        return (x < ng) if causal else (x < ng) | (x >= nb - ng)

    base = ((qb - kb).abs() <= nw // 2) | is_global(qb) | is_global(kb)
    return (base[None] | rand[:, qb, kb])[None]


def reference(q, k, v, allow, causal, pm, shared, extra=None):
    kr = shared_qk_keys(q) if shared else k
    return pattern_reference(q, kr, v, allow, causal=causal, padding_mask=pm,
                             scale=q.shape[-1] ** -0.5, shared_qk=shared, extra_kv=extra)


CFG = st.sampled_from([(4, 3, 1, 2), (3, 1, 0, 1), (5, 3, 2, 3), (4, 5, 1, 0), (2, 3, 1, 4)])


@given(N=st.integers(1, 50), cfg=CFG, causal=st.booleans(), shared=st.booleans(), pad=st.booleans(),
       etc=st.booleans(), seed=st.integers(0, 99))
def test_bigbird_matches_block_definition(N, cfg, causal, shared, pad, etc, seed):
    b, nw, ng, nr = cfg
    B, H = 2, 3
    q, k, v = rand_qkv(B, H, N, D=4, Dv=3, seed=seed)
    pm = random_padding(B, N, seed=seed) if pad else None
    gqkv = None
    if etc:
        g = torch.Generator().manual_seed(seed)
        gqkv = (torch.randn(H, 2, 4, generator=g, dtype=torch.float64),
                torch.randn(H, 2, 4, generator=g, dtype=torch.float64),
                torch.randn(H, 2, 3, generator=g, dtype=torch.float64))
    out, lse = effattn.attention(q, None if shared else k, v, "bigbird", causal=causal, padding_mask=pm,
                                 return_lse=True, block_size=b, n_window_blocks=nw, n_global_blocks=ng,
                                 n_random_blocks=nr, seed=seed, global_qkv=gqkv)
    allow = bigbird_allowed(N, H, b, nw, ng, nr, seed, causal)
    extra = None if gqkv is None else (gqkv[1][None], gqkv[2][None])
    ref, ref_lse = reference(q, k, v, allow, causal, pm, shared, extra)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)


@given(nb=st.integers(1, 20), H=st.integers(1, 3), nw=st.sampled_from([1, 3, 5]), ng=st.integers(0, 2),
       nr=st.integers(0, 4), seed=st.integers(0, 999), causal=st.booleans())
def test_random_blocks_follow_the_rules(nb, H, nw, ng, nr, seed, causal):
    kw = dict(n_window_blocks=nw, n_global_blocks=ng, n_random_blocks=nr, seed=seed, causal=causal)
    pattern, rand = bigbird_block_pattern(nb, H, **kw)
    a = torch.arange(nb)[:, None]
    c = torch.arange(nb)[None, :]
    glob = (torch.arange(nb) < ng) | (torch.zeros(nb, dtype=torch.bool) if causal else torch.arange(nb) >= nb - ng)
    excluded = ((a - c).abs() <= nw // 2) | glob[None, :] | glob[:, None]
    assert not (rand & excluded).any()
    if causal:
        assert not (rand & (c >= a)).any()
    avail = ~excluded & ((c < a) if causal else torch.ones(nb, nb, dtype=torch.bool))
    assert torch.equal(rand.sum(-1), avail.sum(-1).clamp(max=nr).expand(H, nb))
    again, rand2 = bigbird_block_pattern(nb, H, **kw)
    assert torch.equal(rand2, rand) and torch.equal(again, pattern)


def test_seed_changes_random_blocks():
    _, r0 = bigbird_block_pattern(32, 4, n_window_blocks=3, n_global_blocks=1, n_random_blocks=3, seed=0, causal=False)
    _, r1 = bigbird_block_pattern(32, 4, n_window_blocks=3, n_global_blocks=1, n_random_blocks=3, seed=1, causal=False)
    assert not torch.equal(r0, r1)
    assert not torch.equal(r0[0], r0[1])  # heads draw independently


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("opts", [
    dict(block_size=8, n_window_blocks=11, n_global_blocks=0, n_random_blocks=0),  # window covers all
    dict(block_size=8, n_window_blocks=1, n_global_blocks=3, n_random_blocks=0),   # global covers all
    dict(block_size=8, n_window_blocks=1, n_global_blocks=1, n_random_blocks=6),   # random fills the rest
])
def test_layout_covering_every_block_is_exact(opts, causal):
    q, k, v = rand_qkv(2, 2, 37, D=8, seed=1)
    pm = random_padding(2, 37, seed=1)
    if causal and opts["n_global_blocks"] == 3:
        opts = dict(opts, n_global_blocks=5)  # causal: only the first blocks are global
    out = effattn.attention(q, k, v, "bigbird", causal=causal, padding_mask=pm, **opts)
    ref = effattn.attention(q, k, v, "naive", causal=causal, padding_mask=pm)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_causal_no_leak_including_gradients():
    N, i = 40, 21
    q, k, v = rand_qkv(1, 2, N, D=4, seed=2, grad=True)
    H = 2
    gqkv = tuple(torch.randn(H, 2, 4, dtype=torch.float64) for _ in range(3))
    opts = dict(block_size=4, n_window_blocks=3, n_global_blocks=1, n_random_blocks=2, seed=5, global_qkv=gqkv)
    out = effattn.attention(q, k, v, "bigbird", causal=True, **opts)
    for g in torch.autograd.grad(out[:, :, i].sum(), (q, k, v)):
        assert torch.all(g[:, :, i + 1:] == 0)
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, i + 1:] = torch.randn_like(t[:, :, i + 1:])
        t.requires_grad_(True)  # the same (differentiable) path as out: compared bitwise
    out2 = effattn.attention(q2, k2, v2, "bigbird", causal=True, **opts)
    assert torch.equal(out2[:, :, : i + 1], out.detach()[:, :, : i + 1])


def test_padding_invariance_and_empty_rows():
    q, k, v = rand_qkv(2, 2, 24, D=4, seed=3, grad=True)
    pm = torch.ones(2, 24, dtype=torch.bool)
    pm[0, 20:] = False
    pm[1] = False
    opts = dict(block_size=4, n_window_blocks=3, n_global_blocks=1, n_random_blocks=0)
    out, lse = effattn.attention(q, k, v, "bigbird", padding_mask=pm, return_lse=True, **opts)
    # padded keys are never attended: changing their content leaves every real row unchanged
    q2, k2, v2 = (t.detach().clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[0, :, 20:] = 1e3 * torch.randn_like(t[0, :, 20:])
    out2 = effattn.attention(q2, k2, v2, "bigbird", padding_mask=pm, **opts)
    torch.testing.assert_close(out2[0, :, :20], out.detach()[0, :, :20], atol=1e-12, rtol=1e-12)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    (out.sum() + finite_lse(lse).sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_gradcheck_including_extra_global_tokens():
    q, k, v = rand_qkv(1, 2, 13, D=3, seed=4, grad=True)
    gqkv = tuple(torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pm = random_padding(1, 13, seed=4)

    def f(q, k, v, gk, gv):
        o, l = effattn.attention(q, k, v, "bigbird", causal=True, padding_mask=pm, return_lse=True,
                                 block_size=3, n_random_blocks=1, seed=2, global_qkv=(gqkv[0], gk, gv))
        return o, finite_lse(l)

    assert torch.autograd.gradcheck(f, (q, k, v, gqkv[1], gqkv[2]))


def test_bf16_large_norm_finite():
    q, k, v = rand_qkv(1, 2, 300, D=16, dtype=torch.bfloat16, seed=5)
    out = effattn.attention(q * 300, k * 300, v, "bigbird", block_size=16, seed=1)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_etc_module_learns_global_tokens_and_matches_functional():
    torch.manual_seed(0)
    m = effattn.get("bigbird_etc", extra_global_tokens=3, heads=2, dim=4, block_size=4, seed=1)
    assert [p.shape for p in m.parameters()] == [(2, 3, 4)] * 3
    q, k, v = rand_qkv(2, 2, 19, D=4, dtype=torch.float32, seed=6)
    out = m(q, k, v)
    ref = effattn.attention(q, k, v, "bigbird", block_size=4, seed=1, global_qkv=(m.gq, m.gk, m.gv))
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert m.gk.grad is not None and m.gv.grad.abs().sum() > 0
    g_out = m.global_outputs(k, v)
    assert g_out.shape == (2, 2, 3, 4) and torch.isfinite(g_out).all()
    lazy = effattn.get("bigbird_etc", extra_global_tokens=1)  # heads/dim taken from the first input
    assert lazy(q, k, v).shape == (2, 2, 19, 4) and lazy.gq.shape == (2, 1, 4)
    with pytest.raises(ValueError, match="heads"):
        m(q[:, :1], k[:, :1], v[:, :1])


@pytest.mark.parametrize("opts, match", [
    (dict(block_size=0), "block_size"), (dict(n_window_blocks=2), "n_window_blocks"),
    (dict(n_global_blocks=-1), "n_global_blocks"), (dict(n_random_blocks=-1), "n_random_blocks"),
    (dict(seed=-1), "seed"), (dict(global_qkv=(1, 2)), "global_qkv"),
    (dict(global_qkv=(torch.zeros(3, 2, 4),) * 3), "global_qkv"),
])
def test_rejects_bad_options(opts, match):
    q, k, v = rand_qkv(1, 2, 12, D=4)
    with pytest.raises(ValueError, match=match):
        effattn.attention(q, k, v, "bigbird", **opts)


def test_extra_global_tokens_option_builds_the_learned_etc_module():
    from effattn.mechanisms.bigbird import BigBirdETC

    mod = effattn.get("bigbird", extra_global_tokens=3, block_size=4, n_random_blocks=1)
    assert isinstance(mod, BigBirdETC) and mod.g == 3
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    assert mod(q, k, v).shape == (1, 2, 16, 8)
    # functional form: the tokens' q/k/v must be passed, and their count must agree
    g = tuple(t.detach() for t in (mod.gq, mod.gk, mod.gv))
    torch.testing.assert_close(
        effattn.attention(q, k, v, "bigbird", block_size=4, n_random_blocks=1, global_qkv=g,
                          extra_global_tokens=3), mod(q, k, v))
    with pytest.raises(ValueError, match="extra_global_tokens"):
        effattn.attention(q, k, v, "bigbird", block_size=4, extra_global_tokens=3)
    with pytest.raises(ValueError, match="extra_global_tokens"):
        effattn.attention(q, k, v, "bigbird", block_size=4, global_qkv=g, extra_global_tokens=2)
