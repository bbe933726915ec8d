"""The block-sparse engine against a dense reference built from the same layout.

The reference turns the layout into an ``[N, N]`` multiplicity matrix (a key block that
appears in two slots is counted twice, so its weight doubles: ``+ log 2`` on its scores),
applies the shared masks, and runs a materialized softmax in float64.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from effattn.masks import apply_masks, relative, shared_tile_bias
from effattn.mechanisms import blocksparse
from effattn.mechanisms.blocksparse import block_sparse_attention
from effattn.softmax import softmax_lse
from tests.helpers import finite_lse, rand_qkv, random_padding


@pytest.fixture(autouse=True, params=["native", "tiles"])
def engine_path(request, monkeypatch):
    """Every test here twice: float32 CPU calls through the native kernels where they serve
    (the default), and through the torch tiles (their twin, which every other dtype and
    device runs)."""
    monkeypatch.setattr(blocksparse, "USE_NATIVE", request.param == "native")
    return request.param


def dense_reference(q, k, v, kv_blocks, bq, bk, scale, causal, exclude_self, k_valid, pair_mask):
    Nq, Nk = q.shape[2], k.shape[2]
    nqb = kv_blocks.shape[2]
    nkb = -(-Nk // bk)
    Bl, Hl = kv_blocks.shape[:2]
    count = torch.zeros(Bl, Hl, nqb, nkb, dtype=q.dtype)
    for b in range(Bl):
        for h in range(Hl):
            for i in range(nqb):
                for j in kv_blocks[b, h, i].tolist():
                    if j >= 0:
                        count[b, h, i, j] += 1
    mult = count.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[..., :Nq, :Nk]
    s = q @ k.transpose(-1, -2) * scale
    qp = torch.arange(Nq)[:, None]
    kp = torch.arange(Nk)[None, :]
    kv = None if k_valid is None else k_valid[:, :, None, :]
    s = apply_masks(s, qp, kp, causal=causal, exclude_self=exclude_self, k_valid=kv, pair_mask=pair_mask)
    s = torch.where(mult > 0, s + torch.log(mult.clamp(min=1)), torch.full_like(s, float("-inf")))
    p, lse = softmax_lse(s)
    return p @ v, lse


def assert_matches_with_gradients(got, ref, inputs):
    """``got = (out, lse)`` equals ``ref = (out, lse)`` (fully masked rows' lse compared as
    finite), and so do the gradients of both w.r.t. ``inputs`` under one random output
    gradient plus the lse sum."""
    (out, lse), (ref_out, ref_lse) = got, ref
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(finite_lse(lse), finite_lse(ref_lse), atol=1e-10, rtol=1e-10)
    go = torch.randn_like(out)
    ga = torch.autograd.grad((out * go).sum() + finite_lse(lse).sum(), inputs)
    gb = torch.autograd.grad((ref_out * go).sum() + finite_lse(ref_lse).sum(), inputs)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def random_layout(shape, nkb, n_slots, g, p_empty=0.2, allow_dup=True):
    idx = torch.randint(0, nkb, (*shape, n_slots), generator=g)
    if not allow_dup:
        idx = torch.stack([torch.randperm(nkb, generator=g)[:n_slots] for _ in range(int(torch.Size(shape).numel()))]).view(*shape, n_slots)
    idx[torch.rand(idx.shape, generator=g) < p_empty] = -1
    return idx


@given(
    N=st.integers(1, 70), bq=st.sampled_from([1, 4, 8, 16]), bk=st.sampled_from([1, 4, 8]),
    slots=st.integers(1, 5), causal=st.booleans(), self_=st.booleans(), pad=st.booleans(),
    per_head=st.booleans(), pair=st.booleans(), seed=st.integers(0, 1000),
)
def test_engine_matches_dense_reference(N, bq, bk, slots, causal, self_, pad, per_head, pair, seed):
    g = torch.Generator().manual_seed(seed)
    B, H = 2, 3
    q, k, v = rand_qkv(B, H, N, N, 4, 3, seed=seed)
    nqb, nkb = -(-N // bq), -(-N // bk)
    layout = random_layout((B, H, nqb) if per_head else (1, 1, nqb), nkb, slots, g)
    k_valid = random_padding(B, N, seed=seed)[:, None, :] if pad else None
    pm = (lambda a, b: (a - b) % 3 != 1) if pair else None
    out, lse = block_sparse_attention(q, k, v, layout, block_q=bq, block_k=bk, scale=0.7, causal=causal,
                                      exclude_self=self_, k_valid=k_valid, pair_mask=pm, tile_budget=64)
    ref, ref_lse = dense_reference(q, k, v, layout, bq, bk, 0.7, causal, self_, k_valid, pm)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    with torch.no_grad():  # no lse wanted: fused softmax where rows provably have keys
        out2, lse2 = block_sparse_attention(
            q, k, v, layout, block_q=bq, block_k=bk, scale=0.7, causal=causal, exclude_self=self_,
            k_valid=k_valid, pair_mask=pm, tile_budget=64, need_lse=False)
    assert lse2 is None
    torch.testing.assert_close(out2, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("per_head", [False, True])
def test_engine_gradients_match_reference_including_lse(causal, per_head):
    g = torch.Generator().manual_seed(1)
    B, H, N, bq, bk = 2, 2, 37, 8, 4
    q, k, v = rand_qkv(B, H, N, N, 5, 3, grad=True, seed=3)
    nqb, nkb = -(-N // bq), -(-N // bk)
    layout = random_layout((B, H, nqb) if per_head else (1, 1, nqb), nkb, 4, g)
    kv = random_padding(B, N, seed=2)[:, None, :]
    out, lse = block_sparse_attention(q, k, v, layout, block_q=bq, block_k=bk, scale=0.5, causal=causal,
                                      exclude_self=True, k_valid=kv, tile_budget=100)
    ref, ref_lse = dense_reference(q, k, v, layout, bq, bk, 0.5, causal, True, kv, None)
    go = torch.randn_like(out)
    gl = torch.randn_like(lse)
    ga = torch.autograd.grad((out * go).sum() + (finite_lse(lse) * gl).sum(), (q, k, v))
    gb = torch.autograd.grad((ref * go).sum() + (finite_lse(ref_lse) * gl).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_engine_gradcheck():
    g = torch.Generator().manual_seed(0)
    q, k, v = rand_qkv(1, 2, 11, 11, 3, 2, grad=True, seed=5)
    layout = random_layout((1, 2, 3), 3, 2, g, p_empty=0.0)
    kv = random_padding(1, 11, seed=1)[:, None, :]

    def f(q, k, v):
        o, l = block_sparse_attention(q, k, v, layout, block_q=4, block_k=4, scale=0.8, causal=True,
                                      exclude_self=True, k_valid=kv)
        return o, finite_lse(l)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_engine_fully_masked_rows_are_zero_with_finite_grads():
    q, k, v = rand_qkv(1, 1, 16, 16, 4, grad=True)
    layout = torch.tensor([[[[0], [-1], [1], [-1]]]])  # query blocks 1 and 3 see nothing
    out, lse = block_sparse_attention(q, k, v, layout, block_q=4, block_k=8, scale=1.0)
    assert torch.equal(out[0, 0, 4:8], torch.zeros(4, 4, dtype=out.dtype))
    assert torch.isneginf(lse[0, 0, 4:8]).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_engine_rejects_bad_layout():
    q, k, v = rand_qkv(1, 1, 16, 16, 4)
    with pytest.raises(ValueError, match="kv_blocks"):
        block_sparse_attention(q, k, v, torch.zeros(1, 1, 3, 1, dtype=torch.long), block_q=4, block_k=4, scale=1.0)
    with pytest.raises(ValueError, match="kv_blocks"):
        block_sparse_attention(q, k, v, torch.full((1, 1, 4, 1), 9), block_q=4, block_k=4, scale=1.0)


def test_engine_never_materializes_n_by_n(monkeypatch):
    """Every score tile the engine builds stays within its tile budget (no N x N tensor)."""
    import effattn.mechanisms.blocksparse as bs

    sizes = []
    orig = bs._tile_scores

    def spy(p, t, qt, kt, ws=None, **kw):
        s = orig(p, t, qt, kt, ws, **kw)
        sizes.append(s.numel())
        return s

    monkeypatch.setattr(bs, "_tile_scores", spy)
    N = 1024
    q, k, v = rand_qkv(1, 2, N, N, 8, dtype=torch.float32, grad=True)
    out, lse = block_sparse_attention(q, k, v, None, block_q=64, block_k=64, scale=0.3, tile_budget=1 << 14)
    out.sum().backward()
    assert sizes and max(sizes) <= 1 << 14 < N * N


@pytest.mark.parametrize("causal", [False, True])
def test_engine_bf16_matmuls_keep_float32_statistics(causal):
    """bf16 inputs run bf16 matmuls but float32 softmax statistics: lse is float32, and output
    and gradients match the float64 reference on the same (bf16-rounded) inputs within bf16
    tolerance (one rounding of probabilities / dS per product)."""
    g = torch.Generator().manual_seed(4)
    B, H, N, bq, bk = 1, 2, 96, 16, 16
    q, k, v = (t.bfloat16().requires_grad_() for t in rand_qkv(B, H, N, N, 32, seed=9))
    layout = random_layout((1, 1, N // bq), N // bk, 3, g, p_empty=0.0, allow_dup=False)
    out, lse = block_sparse_attention(q, k, v, layout, block_q=bq, block_k=bk, scale=32 ** -0.5,
                                      causal=causal)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = dense_reference(q64, k64, v64, layout, bq, bk, 32 ** -0.5, causal, False, None, None)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-2, rtol=1e-2, equal_nan=True)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((out.double() * go).sum(), (q, k, v))
    gb = torch.autograd.grad((ref * go).sum(), (q64, k64, v64))
    for a, b in zip(ga, gb):
        assert a.dtype == torch.bfloat16
        err = (a.double() - b).norm() / b.norm()
        assert err < 2e-2, float(err)


@given(
    N=st.integers(8, 70), block=st.sampled_from([4, 8]), reach=st.integers(1, 3),
    w=st.integers(0, 30), causal=st.booleans(), pad=st.booleans(), seed=st.integers(0, 1000),
    rel=st.booleans(), shared=st.booleans(),
)
def test_full_slots_skip_the_rules_only_where_they_allow_every_pair(N, block, reach, w, causal, pad,
                                                                    seed, rel, shared):
    """Slots marked ``full_slots`` skip the pair rules on the own path (the other slots,
    empty ones and blocks holding padding keep them): on a band layout with a window rule
    the result equals the dense reference when the hint is the truth — with the rule
    marked relative too (band tiles then add one shared bias) and with self-exclusion."""
    q, k, v = rand_qkv(2, 2, N, N, 4, 3, seed=seed)
    nb = -(-N // block)
    qb = torch.arange(nb)[:, None]
    cand = qb + torch.arange(-reach, reach + 1)
    layout = torch.where((cand >= 0) & (cand < nb), cand, -1)[None, None]
    k_valid = random_padding(2, N, seed=seed)[:, None, :] if pad else None

    def pair(a, b):
        return (a - b).abs() <= w

    if rel:
        pair = relative(pair)
    # the hint's truth per slot: every (query, key) of the block pair passes the rules
    lo_q, hi_q = qb * block, torch.clamp((qb + 1) * block, max=N) - 1
    kb = layout.clamp(min=0)
    lo_k, hi_k = kb * block, torch.clamp((kb + 1) * block, max=N) - 1
    full = (layout >= 0) & ((hi_q - lo_k).abs() <= w) & ((lo_q - hi_k).abs() <= w)
    if causal:
        full &= hi_k <= lo_q
    got, _ = block_sparse_attention(q, k, v, layout, block_q=block, block_k=block, scale=0.5,
                                    causal=causal, exclude_self=shared, k_valid=k_valid,
                                    pair_mask=pair, full_slots=full)
    ref, _ = dense_reference(q, k, v, layout, block, block, 0.5, causal, shared, k_valid, pair)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-9)
    with torch.no_grad():
        got2, _ = block_sparse_attention(q, k, v, layout, block_q=block, block_k=block, scale=0.5,
                                         causal=causal, exclude_self=shared, k_valid=k_valid,
                                         pair_mask=pair, full_slots=full, need_lse=False)
    torch.testing.assert_close(got2, ref, atol=1e-10, rtol=1e-9)


def test_no_lse_inference_takes_the_fused_softmax_where_rows_have_keys(monkeypatch):
    """Without gradients and lse, band tiles whose rule-free slots give every row a key run
    the fused softmax (and match); tiles with padding keys or empty slots (the sequence
    ends) do not, and stay exact."""
    import effattn.mechanisms.blocksparse as bs

    seen = []
    orig = bs._every_row_has_a_key
    monkeypatch.setattr(bs, "_every_row_has_a_key", lambda p, t: seen.append(orig(p, t)) or seen[-1])
    N, block, w = 64, 8, 12
    q, k, v = rand_qkv(1, 2, N, N, 4, 3, seed=2)
    nb = N // block
    qb = torch.arange(nb)[:, None]
    cand = qb + torch.arange(-2, 3)
    layout = torch.where((cand >= 0) & (cand < nb), cand, -1)[None, None]
    pair = relative(lambda a, b: (a - b).abs() <= w)
    kb = layout.clamp(min=0)
    full = (layout >= 0) & ((qb * block + block - 1 - kb * block).abs() <= w) & (
        (qb * block - kb * block - block + 1).abs() <= w)
    for k_valid in (None, torch.arange(N)[None, None] < N - 3):
        seen.clear()
        with torch.no_grad():
            got, lse = block_sparse_attention(q, k, v, layout, block_q=block, block_k=block,
                                              scale=0.5, pair_mask=pair, full_slots=full,
                                              k_valid=k_valid, need_lse=False, tile_budget=64)
        ref, _ = dense_reference(q, k, v, layout, block, block, 0.5, False, False, k_valid, pair)
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-9)
        assert lse is None and any(seen) and not seen[0] and not seen[-1]


@given(G=st.integers(1, 5), r=st.integers(1, 6), L=st.integers(1, 9), seed=st.integers(0, 1000),
       shifted=st.booleans(), rule=st.sampled_from(["none", "window", "residue", "absolute"]),
       causal=st.booleans(), self_=st.booleans(), valid=st.sampled_from(["none", "all", "some"]))
def test_shared_tile_bias_is_every_groups_masks(G, r, L, seed, shifted, rule, causal, self_, valid):
    """shared_tile_bias: where it returns a bias, adding it equals the masks of every query
    group of the tile (causal, self-exclusion, the pair rule, padding); it returns one
    whenever the groups are shifted copies of group 0 under a relative rule with every key
    valid, and never for a rule not marked relative."""
    g = torch.Generator().manual_seed(seed)
    q0 = torch.randint(0, 20, (r,), generator=g)
    k0 = torch.randint(0, 20, (L,), generator=g)
    shift = torch.randint(-30, 30, (G, 1), generator=g)
    qp, kp = q0 + shift, k0 + shift
    if not shifted and G > 1:
        kp[-1, torch.randint(0, L, (1,), generator=g)] += 1  # one key out of step
    rules = {"none": None, "window": relative(lambda a, b: (a - b).abs() <= 3),
             "residue": relative(lambda a, b: (a - b) % 3 != 1),
             "absolute": lambda a, b: b % 2 == 0}
    pm = rules[rule]
    kv = {"none": None, "all": torch.ones(1, 1, G, 1, L, dtype=torch.bool),
          "some": torch.rand(1, 1, G, 1, L, generator=g) < 0.7}[valid]
    opts = dict(causal=causal, exclude_self=self_, k_valid=kv, pair_mask=pm)
    bias = shared_tile_bias(qp.view(1, 1, G, r, 1), kp.view(1, 1, G, 1, L),
                            dtype=torch.float64, **opts)
    truth = apply_masks(torch.zeros(1, 1, G, r, L, dtype=torch.float64), qp.view(1, 1, G, r, 1),
                        kp.view(1, 1, G, 1, L), inplace=True, **opts)
    if rule == "absolute":
        assert bias is None
    elif (shifted or G == 1) and (kv is None or bool(kv.all())):
        assert bias is not None
    if bias is not None:
        assert bias.shape == (r, L)
        assert torch.equal(bias.expand_as(truth), truth)


def test_mask_runs_group_the_slots_needing_rules():
    from effattn.mechanisms.blocksparse import _mask_runs

    free = torch.tensor([[[[False, True, True, False, True]]]])
    idx = torch.tensor([[[[3, 4, 5, 6, -1]]]])
    assert _mask_runs(free, idx, 8) == [(0, 8), (24, 40)]
    assert _mask_runs(torch.ones_like(free), idx.clamp(min=0), 8) == []
    alternating = torch.tensor([[[[False, True] * 6]]])
    assert _mask_runs(alternating, torch.zeros(1, 1, 1, 12, dtype=torch.long), 2) is None


@given(nb=st.integers(3, 12), block=st.sampled_from([2, 4]), before=st.integers(0, 2),
       after=st.integers(0, 2), group=st.integers(1, 3), causal=st.booleans(), pad=st.booleans(),
       seed=st.integers(0, 1000))
def test_band_tiles_run_on_views_and_match_the_reference_with_gradients(
        nb, block, before, after, group, causal, pad, seed):
    """Sliding-window layouts: every group takes its keys as an overlapping view (one bmm
    per batch, head; gradients added back per slot), the groups at the ends over a copy of
    their window with zero blocks past the ends (their layout rows list the blocks first:
    reordered into band order) -- same outputs, lse and gradients as the dense reference,
    and the band path runs for every group."""
    import effattn.mechanisms.blocksparse as bs
    from effattn.mechanisms._layout import band_layout

    N = nb * block - (seed % block)  # ragged last block too
    q, k, v = rand_qkv(2, 2, N, N, 4, 3, grad=True, seed=seed)
    layout = band_layout(N, block, block, before * block, after * block, "cpu")[None, None]
    kv = random_padding(2, N, seed=seed)[:, None, :] if pad else None
    bands = []
    real = bs._band_start

    def spy(idx, nkb):
        b = real(idx, nkb)
        bands.append(b)
        return b

    with pytest.MonkeyPatch.context() as m:
        m.setattr(bs, "_band_start", spy)
        m.setattr(bs, "TILE_CACHE_SIZE", 0)  # the tiles are cut in this call, not recalled
        bs.clear_tile_cache()
        out, lse = block_sparse_attention(q, k, v, layout, block_q=block, block_k=block, scale=0.6,
                                          causal=causal, k_valid=kv, group_blocks=group)
    ref = dense_reference(q, k, v, layout, block, block, 0.6, causal, False, kv, None)
    assert_matches_with_gradients((out, lse), ref, (q, k, v))
    if layout.shape[-1] == before + after + 1:  # every window slot listed: all bands
        assert bands and all(b is not None for b in bands)


def _engine_grads(layout, rule, causal, self_, seed, cache: bool):
    """Output, lse and input gradients of one engine call (tile cache on or off)."""
    import effattn.mechanisms.blocksparse as bs

    q, k, v = rand_qkv(2, 2, 40, 40, 4, 3, grad=True, seed=seed)
    with pytest.MonkeyPatch.context() as m:
        if not cache:
            m.setattr(bs, "TILE_CACHE_SIZE", 0)
            bs.clear_tile_cache()
        out, lse = block_sparse_attention(q, k, v, layout, block_q=4, block_k=4, scale=0.7,
                                          causal=causal, exclude_self=self_, pair_mask=rule,
                                          group_blocks=3)
        grads = torch.autograd.grad((out * out.detach()).sum() + finite_lse(lse).sum(), (q, k, v))
    return (out, finite_lse(lse), *grads)


@given(width=st.integers(0, 9), causal=st.booleans(), self_=st.booleans(), keyed=st.booleans(),
       seed=st.integers(0, 1000))
def test_kept_tiles_and_biases_give_the_results_of_fresh_ones(width, causal, self_, keyed, seed):
    """The engine keeps each plan's tiles (and their shared mask biases, per named rule)
    between calls: a second call with the same layout rebuilt as a new tensor — and a
    rule rebuilt as a new function with the same key — gives exactly what tiles cut
    afresh give, forward and backward."""
    import effattn.mechanisms.blocksparse as bs
    from effattn.mechanisms._layout import band_layout

    bs.clear_tile_cache()
    rule = lambda: relative(lambda a, b: (a - b).abs() <= width,  # noqa: E731
                            key=("band", width) if keyed else None)
    fresh = _engine_grads(band_layout(40, 4, 4, 12, 12, "cpu")[None, None], rule(), causal, self_,
                          seed, cache=False)
    for _ in range(2):  # the first call cuts and keeps, the second recalls
        kept = _engine_grads(band_layout(40, 4, 4, 12, 12, "cpu")[None, None], rule(), causal,
                             self_, seed, cache=True)
        for a, b in zip(kept, fresh):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert len(bs._tile_cache) == 1
    biases = [t.biases for _, tiles in next(iter(bs._tile_cache.values()))[0] for t in tiles]
    assert any(biases) == keyed  # an unnamed rule's biases are never kept


@given(nb=st.integers(6, 10), before=st.integers(1, 2), after=st.integers(0, 2),
       width=st.integers(0, 9), causal=st.booleans(), self_=st.booleans(), pad=st.booleans(),
       seed=st.integers(0, 1000))
def test_clipped_end_windows_keep_a_rule_bias_and_mask_their_empty_slots(
        nb, before, after, width, causal, self_, pad, seed):
    """A sliding window's groups at the sequence ends (band tiles with empty slots past the
    ends) keep the shared bias of the pair rules like the inner groups — their empty slots
    take the positions the band gives them and are masked by their validity instead — and
    give the dense reference's outputs, lse and gradients (with caller padding too: then
    the tiles are cut per call and masked with each sequence's validity)."""
    import effattn.mechanisms.blocksparse as bs
    from effattn.mechanisms._layout import band_layout

    if not (causal or self_ or width < 9):
        width = 3  # some pair rule, so that there is a bias to keep
    N, block = nb * 4, 4
    q, k, v = rand_qkv(2, 2, N, N, 4, 3, grad=True, seed=seed)
    layout = band_layout(N, block, block, before * block, after * block, "cpu")[None, None]
    kv = random_padding(2, N, seed=seed)[:, None, :] if pad else None
    rule = relative(lambda a, b: (a - b).abs() <= width, key=("band", width))
    bs.clear_tile_cache()
    for _ in range(2):  # cut and keep, then recall
        out, lse = block_sparse_attention(q, k, v, layout, block_q=block, block_k=block, scale=0.6,
                                          causal=causal, exclude_self=self_, k_valid=kv,
                                          pair_mask=rule, group_blocks=3)
        ref = dense_reference(q, k, v, layout, block, block, 0.6, causal, self_, kv, rule)
        assert_matches_with_gradients((out, lse), ref, (q, k, v))
    if pad:  # caller padding: tiles are cut every call, not kept
        assert not bs._tile_cache
        return
    tiles = [t for _, group in next(iter(bs._tile_cache.values()))[0] for t in group]
    assert all(t.band is not None for t in tiles) and any(t.k_valid is not None for t in tiles)
    assert all(any(b is not None for b in t.biases.values()) for t in tiles)


def test_kept_biases_are_per_rule_key_and_tiles_per_layout_content():
    """Two windows over one layout (rules with different keys) and two layouts of the same
    shape but different blocks each match the dense reference, called alternately: a
    bias or tile list kept for one is never served to the other."""
    import effattn.mechanisms.blocksparse as bs
    from effattn.mechanisms._layout import band_layout

    bs.clear_tile_cache()
    q, k, v = rand_qkv(1, 2, 48, 48, 4, 3, seed=5)
    band = band_layout(48, 4, 4, 8, 8, "cpu")[None, None]
    shifted = band.roll(1, dims=2)  # same shape, other blocks
    for _ in range(2):
        for layout in (band, shifted):
            for w in (2, 6):
                rule = relative(lambda a, b, w=w: (a - b).abs() <= w, key=("band", w))
                out, lse = block_sparse_attention(q, k, v, layout, block_q=4, block_k=4, scale=0.5,
                                                  pair_mask=rule, group_blocks=5)
                ref, ref_lse = dense_reference(q, k, v, layout, 4, 4, 0.5, False, False, None, rule)
                torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
                torch.testing.assert_close(finite_lse(lse), finite_lse(ref_lse), atol=1e-10,
                                           rtol=1e-10)
    assert len(bs._tile_cache) == 2


def test_tiles_are_kept_for_contiguous_positions_only():
    """Positions other than a contiguous run (LSH's sorted order, new every call) or a
    padding mask given by the caller leave the tile cache alone; a run of rows (BigBird's
    row pieces) is kept per start, and gives what fresh tiles give (causal: the run's
    start decides which pairs are allowed)."""
    import effattn.mechanisms.blocksparse as bs

    bs.clear_tile_cache()
    q, k, v = rand_qkv(2, 1, 16, 16, 4, 3, seed=2)
    layout = torch.tensor([[[[0, 1], [1, 2], [2, 3], [3, 0]]]])
    run = dict(block_q=4, block_k=4, scale=1.0, causal=True)
    pos = torch.randperm(16)[None, None]
    block_sparse_attention(q, k, v, layout, q_pos=pos, k_pos=pos, **run)
    block_sparse_attention(q, k, v, layout, k_valid=random_padding(2, 16, seed=2)[:, None], **run)
    assert not bs._tile_cache
    for start in (0, 3, 0, 3):
        qp = torch.arange(start, start + 16)[None, None]
        kept = block_sparse_attention(q, k, v, layout, q_pos=qp, **run)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(bs, "_tile_key", lambda p: None)
            fresh = block_sparse_attention(q, k, v, layout, q_pos=qp, **run)
        for a, b in zip(kept, fresh):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert len(bs._tile_cache) == 2


def test_tile_cache_stays_within_its_byte_limit(monkeypatch):
    """Plans whose tiles would hold more than TILE_CACHE_BYTES are cut afresh; kept lists
    are dropped, oldest first, to stay within it."""
    import effattn.mechanisms.blocksparse as bs
    from effattn.mechanisms._layout import band_layout

    bs.clear_tile_cache()
    q, k, v = rand_qkv(1, 1, 64, 64, 4, 3, seed=3)
    wide, narrow = (band_layout(64, 4, 4, w, w, "cpu")[None, None] for w in (12, 4))

    def size(lay):
        return bs._tile_bytes(bs._prepare(q, k, v, lay, block_q=4, block_k=4, scale=1.0)[0])

    monkeypatch.setattr(bs, "TILE_CACHE_BYTES", size(wide) - 1)
    block_sparse_attention(q, k, v, wide, block_q=4, block_k=4, scale=1.0)
    assert not bs._tile_cache
    monkeypatch.setattr(bs, "TILE_CACHE_BYTES", size(wide) + size(narrow) // 2)
    block_sparse_attention(q, k, v, wide, block_q=4, block_k=4, scale=1.0)
    block_sparse_attention(q, k, v, narrow, block_q=4, block_k=4, scale=1.0)
    assert [v[1] for v in bs._tile_cache.values()] == [size(narrow)]


def test_kept_tiles_hold_bounded_biases():
    """Kept state stays small: a dense causal plan's tiles keep no bias (each would be its
    whole score tile: N²/2 floats over the plan), and a sparse tile keeps at most
    BIASES_PER_TILE tile-widths of them however many named rules meet it — the rest are
    evaluated per call, with the same results."""
    import effattn.mechanisms.blocksparse as bs
    from effattn.mechanisms._layout import band_layout

    bs.clear_tile_cache()
    q, k, v = rand_qkv(1, 2, 64, 64, 4, 3, seed=7)
    block_sparse_attention(q, k, v, None, block_q=8, block_k=8, scale=0.5, causal=True,
                           group_blocks=2, slot_chunk=2)
    (tiles, _), = bs._tile_cache.values()
    assert all(t.biases is None for _, group in tiles for t in group)
    bs.clear_tile_cache()
    layout = band_layout(64, 8, 8, 16, 16, "cpu")[None, None]
    for _ in range(2):
        for w in (3, 7, 11, 15):
            rule = relative(lambda a, b, w=w: (a - b).abs() <= w, key=("band", w))
            out, lse = block_sparse_attention(q, k, v, layout, block_q=8, block_k=8, scale=0.5,
                                              pair_mask=rule, group_blocks=2)
            ref, _ = dense_reference(q, k, v, layout, 8, 8, 0.5, False, False, None, rule)
            torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    (tiles, _), = bs._tile_cache.values()
    for _, group in tiles:
        for t in group:
            held = sum(b.numel() for b in t.biases.values() if b is not None)
            assert held <= bs.BIASES_PER_TILE * t.q_pos.shape[-2] * t.k_pos.shape[-1]


@given(N=st.integers(1, 40), block=st.sampled_from([4, 8]), a=st.integers(0, 7), bf16=st.booleans(),
       need_lse=st.booleans(), seed=st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_engine_writes_out_rows_in_place_and_takes_row_ranges_of_queries(N, block, a, bf16, need_lse, seed):
    """``out=``: a row range of a larger output receives exactly the fresh call's result
    (written in place or copied when padded or cast), the rows around it stay untouched;
    queries given as a row range of a larger tensor (not contiguous over heads) give the
    result of their contiguous copy."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    big_q, k, v = (x.to(dtype) for x in rand_qkv(2, 3, N + a + 3, N, 8, seed=seed, dtype=torch.float32))
    q = big_q[:, :, a:a + N]
    nb = -(-N // block)
    layout = torch.randint(-1, nb, (1, 3, nb, 3), generator=g)
    opts = dict(block_q=block, block_k=block, scale=0.3, need_lse=need_lse, race=False)
    with torch.no_grad():
        ref, ref_lse = block_sparse_attention(q.contiguous(), k, v, layout, **opts)
        whole = torch.full((2, 3, N + a + 3, 8), 7.0, dtype=dtype)
        got, lse = block_sparse_attention(q, k, v, layout, out=whole[:, :, a:a + N], **opts)
    assert got.data_ptr() == whole[:, :, a:a + N].data_ptr()
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert bool((whole[:, :, :a] == 7).all()) and bool((whole[:, :, a + N:] == 7).all())
    if need_lse:
        torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)


def test_engine_rejects_out_with_gradients_or_the_wrong_shape():
    q, k, v = rand_qkv(1, 2, 16, 16, 4, dtype=torch.float32)
    layout = torch.zeros(1, 1, 4, 1, dtype=torch.long)
    opts = dict(block_q=4, block_k=4, scale=1.0)
    with pytest.raises(ValueError, match="out: expected"):
        with torch.no_grad():
            block_sparse_attention(q, k, v, layout, out=torch.empty(1, 2, 15, 4), **opts)
    with pytest.raises(ValueError, match="out: expected"):
        with torch.no_grad():
            block_sparse_attention(q, k, v, layout, out=torch.empty(1, 2, 16, 4, dtype=torch.float64), **opts)
    q.requires_grad_(True)
    with pytest.raises(ValueError, match="without gradients"):
        block_sparse_attention(q, k, v, layout, out=torch.empty(1, 2, 16, 4), **opts)
