"""``longformer`` and ``window2d`` against dense references built from the papers' rules.

Longformer: ``allowed[i, j] = |i - j| <= w·d and (i - j) mod d == 0`` per head, plus
global rows and columns.  Swin: the reference follows Swin's code literally (pad the
grid, ``torch.roll`` it, ``window_partition``, region ids from the ``slice`` triples).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import effattn
from effattn.api import shared_qk_keys
from effattn.mechanisms._layout import pattern_reference
from tests.helpers import finite_lse, rand_qkv, random_padding


def longformer_allowed(N, window, dilations, glob=None):
    """``[1|B, H, N, N]`` bool from the definition (``glob`` bool ``[B|1, N]``)."""
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    per_head = [((i - j).abs() <= window * d) & ((i - j) % d == 0) for d in dilations]
    a = torch.stack(per_head)[None]
    if glob is not None:
        a = a | glob[:, None, :, None] | glob[:, None, None, :]
    return a


def reference(q, k, v, allowed, causal, pm, shared):
    kr = shared_qk_keys(q) if shared else k
    return pattern_reference(q, kr, v, allowed, causal=causal, padding_mask=pm,
                             scale=q.shape[-1] ** -0.5, shared_qk=shared)


@given(N=st.integers(1, 45), window=st.integers(0, 9), block=st.sampled_from([1, 4, 8, 16]),
       causal=st.booleans(), shared=st.booleans(), pad=st.booleans(),
       dil=st.sampled_from([1, 2, 3, [1, 2, 3], [3, 1, 2]]),
       glob=st.sampled_from(["none", "list", "mask"]), seed=st.integers(0, 99))
def test_longformer_matches_definition(N, window, block, causal, shared, pad, dil, glob, seed):
    B, H = 2, 3
    q, k, v = rand_qkv(B, H, N, D=4, Dv=3, seed=seed)
    pm = random_padding(B, N, seed=seed) if pad else None
    dils = dil if isinstance(dil, list) else [dil] * H
    g = None
    gt = None
    if glob == "list":
        gt = sorted({0, N // 2, N - 1})
        g = torch.zeros(1, N, dtype=torch.bool)
        g[0, gt] = True
    elif glob == "mask":
        gt = g = torch.rand(B, N, generator=torch.Generator().manual_seed(seed)) < 0.15
    out, lse = effattn.attention(q, None if shared else k, v, "longformer", causal=causal,
                                 padding_mask=pm, return_lse=True, window=window, dilation=dil,
                                 global_tokens=gt, block_size=block)
    ref, ref_lse = reference(q, k, v, longformer_allowed(N, window, dils, g), causal, pm, shared)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_longformer_window_covering_sequence_is_exact(causal):
    q, k, v = rand_qkv(2, 2, 37, D=8, seed=1)
    pm = random_padding(2, 37, seed=1)
    out = effattn.attention(q, k, v, "longformer", causal=causal, padding_mask=pm, window=37, block_size=8)
    ref = effattn.attention(q, k, v, "naive", causal=causal, padding_mask=pm)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_longformer_causal_no_leak_including_gradients():
    N, i = 30, 17
    q, k, v = rand_qkv(1, 2, N, D=4, seed=2, grad=True)
    opts = dict(window=3, dilation=[1, 2], global_tokens=[0, 9, 25], block_size=4)
    out = effattn.attention(q, k, v, "longformer", causal=True, **opts)
    gq, gk, gv = torch.autograd.grad(out[:, :, i].sum(), (q, k, v))
    for g in (gq, gk, gv):
        assert torch.all(g[:, :, i + 1:] == 0)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, i + 1:] += 5.0
    v2[:, :, i + 1:] -= 3.0
    q2 = q.detach().clone()
    q2[:, :, i + 1:] *= -2.0
    for t in (q2, k2, v2):
        t.requires_grad_(True)  # the same (differentiable) path as out: compared bitwise
    out2 = effattn.attention(q2, k2, v2, "longformer", causal=True, **opts)
    assert torch.equal(out2[:, :, : i + 1], out.detach()[:, :, : i + 1])


def test_longformer_padding_invariance_and_empty_rows():
    q, k, v = rand_qkv(2, 2, 20, D=4, seed=3, grad=True)
    pm = torch.ones(2, 20, dtype=torch.bool)
    pm[0, 13:] = False
    pm[1] = False  # batch 1: nothing real, every row empty
    opts = dict(window=4, global_tokens=[2, 15], block_size=8)
    out, lse = effattn.attention(q, k, v, "longformer", padding_mask=pm, return_lse=True, **opts)
    short = effattn.attention(q[:1, :, :13], k[:1, :, :13], v[:1, :, :13], "longformer",
                              window=4, global_tokens=[2], block_size=8)
    torch.testing.assert_close(out[:1, :, :13], short, atol=1e-12, rtol=1e-12)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    (out.sum() + finite_lse(lse).sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_longformer_gradcheck():
    q, k, v = rand_qkv(1, 2, 11, D=3, seed=4, grad=True)
    pm = random_padding(1, 11, seed=4)

    def f(q, k, v):
        o, l = effattn.attention(q, k, v, "longformer", causal=True, padding_mask=pm, return_lse=True,
                                 window=2, dilation=[1, 2], global_tokens=[3, 7], block_size=4)
        return o, finite_lse(l)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_longformer_bf16_large_norm_finite():
    q, k, v = rand_qkv(1, 2, 300, D=16, dtype=torch.bfloat16, seed=5)
    out = effattn.attention(q * 300, k * 300, v, "longformer", window=16, global_tokens=[0, 150])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("opts, match", [
    (dict(window=-1), "window"), (dict(dilation=0), "dilation"), (dict(dilation=[1, 2, 3]), "dilation"),
    (dict(global_tokens=[40]), "global_tokens"), (dict(global_tokens=torch.ones(3, 20, dtype=torch.bool)), "global_tokens"),
    (dict(block_size=0), "block_size"),
])
def test_longformer_rejects_bad_options(opts, match):
    q, k, v = rand_qkv(2, 2, 20, D=4)
    with pytest.raises(ValueError, match=match):
        effattn.attention(q, k, v, "longformer", **opts)


# ---------------------------------------------------------------- Swin


def swin_allowed(grid, window, shift):
    """``[N, N]`` allowed pairs, following Swin's reference code step by step."""
    (h, w), (wh, ww), (sh, sw) = grid, window, shift
    Hp, Wp = -(-h // wh) * wh, -(-w // ww) * ww
    idx = torch.full((Hp, Wp), -1, dtype=torch.long)
    idx[:h, :w] = torch.arange(h * w).view(h, w)  # F.pad of the image: padding has index -1
    img_mask = torch.zeros(Hp, Wp, dtype=torch.long)
    if sh or sw:
        cnt = 0
        hs = (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)) if sh else (slice(0, None),)
        ws = (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)) if sw else (slice(0, None),)
        for a in hs:
            for b in ws:
                img_mask[a, b] = cnt
                cnt += 1
    shifted = torch.roll(idx, shifts=(-sh, -sw), dims=(0, 1))
    win_idx = shifted.view(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    win_reg = img_mask.view(Hp // wh, wh, Wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    allowed = torch.zeros(h * w, h * w, dtype=torch.bool)
    for ids, reg in zip(win_idx, win_reg):
        for a in range(ids.numel()):
            for b in range(ids.numel()):
                if ids[a] >= 0 and ids[b] >= 0 and reg[a] == reg[b]:
                    allowed[ids[a], ids[b]] = True
    return allowed


@given(h=st.integers(1, 9), w=st.integers(1, 9), wh=st.integers(1, 5), ww=st.integers(1, 5),
       data=st.data(), shared=st.booleans(), pad=st.booleans(), seed=st.integers(0, 99))
def test_window2d_matches_swin(h, w, wh, ww, data, shared, pad, seed):
    sh = data.draw(st.integers(0, wh - 1))
    sw = data.draw(st.integers(0, ww - 1))
    N = h * w
    q, k, v = rand_qkv(2, 2, N, D=4, Dv=3, seed=seed)
    pm = random_padding(2, N, seed=seed) if pad else None
    out, lse = effattn.attention(q, None if shared else k, v, "window2d", padding_mask=pm, return_lse=True,
                                 grid=(h, w), window=(wh, ww), shift=(sh, sw))
    ref, ref_lse = reference(q, k, v, swin_allowed((h, w), (wh, ww), (sh, sw)), False, pm, shared)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)


def test_window2d_one_window_covering_grid_is_exact():
    q, k, v = rand_qkv(2, 2, 35, D=8, seed=6)
    pm = random_padding(2, 35, seed=6)
    out = effattn.attention(q, k, v, "window2d", padding_mask=pm, grid=(5, 7), window=(8, 8))
    ref = effattn.attention(q, k, v, "naive", padding_mask=pm)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


def test_window2d_gradcheck_and_bf16():
    q, k, v = rand_qkv(1, 2, 15, D=3, seed=7, grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: effattn.attention(q, k, v, "window2d", grid=(3, 5), window=2, shift=1), (q, k, v))
    qb, kb, vb = rand_qkv(1, 2, 256, D=16, dtype=torch.bfloat16, seed=8)
    out = effattn.attention(qb * 300, kb * 300, vb, "window2d", grid=(16, 16), window=7, shift=3)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("opts, match", [
    (dict(), "grid"), (dict(grid=(4, 4)), "grid"), (dict(grid=(3, 5), window=0), "window"),
    (dict(grid=(3, 5), window=2, shift=2), "shift"), (dict(grid=(3, 5), window=(2, 2, 2)), "window"),
])
def test_window2d_rejects_bad_options(opts, match):
    q, k, v = rand_qkv(1, 1, 15, D=4)
    with pytest.raises(ValueError, match=match):
        effattn.attention(q, k, v, "window2d", **opts)


def test_window2d_cannot_be_causal():
    q, k, v = rand_qkv(1, 1, 15, D=4)
    with pytest.raises(ValueError, match="causal"):
        effattn.attention(q, k, v, "window2d", causal=True, grid=(3, 5), window=2)


@given(N=st.integers(1, 60), window=st.integers(0, 7), block=st.sampled_from([1, 3, 4, 8]),
       dil=st.sampled_from([[1], [2], [3, 1]]), causal=st.booleans())
def test_longformer_layout_is_exactly_the_blocks_holding_allowed_pairs(N, window, block, dil, causal):
    from effattn.mechanisms.window import longformer_layout

    layout = longformer_layout(N, window, torch.tensor(dil), block, causal)[0]
    allow = longformer_allowed(N, window, dil)[0]
    if causal:
        allow = allow & torch.ones(N, N, dtype=torch.bool).tril()
    nb = -(-N // block)
    padded = torch.zeros(len(dil), nb * block, nb * block, dtype=torch.bool)
    padded[:, :N, :N] = allow
    want = padded.view(len(dil), nb, block, nb, block).any(4).any(2)
    got = torch.zeros_like(want)
    for h in range(len(dil)):
        for a in range(nb):
            for c in layout[h, a].tolist():
                if c >= 0:
                    assert not got[h, a, c], "a key block listed twice"
                    got[h, a, c] = True
    assert torch.equal(got, want)
