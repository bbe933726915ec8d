"""Reformer LSH attention: exactness limit, agreement with a dense multiset reference,
causal no-leak, padding invariance, gradients, precision, randomness and option errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, strategies as st

import effattn
from effattn.api import shared_qk_keys, spec
from effattn.masks import apply_masks
from effattn.mechanisms.lsh import (
    bucket_sort_keys, chunk_layout, hash_vectors, make_rotations, sort_buckets,
)
from effattn.softmax import merge_partials, softmax_lse
from tests.helpers import rand_qkv, random_padding


def lsh(q, k, v, **kw):
    return effattn.attention(q, k, v, "lsh", **kw)


# ---------------------------------------------------------------- exactness limit


@pytest.mark.parametrize("n_hashes", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_one_chunk_covering_the_sequence_is_exact_shared_qk(n_hashes, causal, padded):
    """chunk_len >= N: every round's chunk holds every token, so LSH is exact attention
    (shared-QK keys, self-exclusion) whatever the buckets."""
    N = 13
    q, _, v = rand_qkv(2, 3, N, N, 8, dtype=torch.float64, seed=n_hashes)
    pm = random_padding(2, N, seed=3) if padded else None
    out, lse = lsh(q, None, v, causal=causal, padding_mask=pm, return_lse=True,
                   n_hashes=n_hashes, n_buckets=2, chunk_len=16, seed=1)
    ref, ref_lse = effattn.attention(q, None, v, "naive", causal=causal, padding_mask=pm,
                                     return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    # one chunk per round: with n_hashes >= 2 the previous round's chunk (the same tokens)
    # doubles every key, and the n_hashes equal rounds merge to + log(n_hashes)
    shift = math.log(n_hashes) + (math.log(2) if n_hashes > 1 else 0.0)
    torch.testing.assert_close(lse, ref_lse + shift, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("causal", [False, True])
def test_one_chunk_covering_the_sequence_is_exact_separate_keys(causal):
    N = 11
    q, k, v = rand_qkv(2, 2, N, N, 6, dtype=torch.float64)
    pm = random_padding(2, N, seed=5)
    out, lse = lsh(q, k, v, causal=causal, padding_mask=pm, return_lse=True, n_hashes=1,
                   n_buckets=4, chunk_len=N, n_chunks_before=0, seed=2)
    ref, ref_lse = effattn.attention(q, k, v, "naive", causal=causal, padding_mask=pm,
                                     return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lse, ref_lse, atol=1e-9, rtol=1e-9)


# ---------------------------------------------------------------- multiset reference


def dense_lsh_reference(q, k, v, rotations, n_buckets, chunk_len, before, after, *, causal,
                        padding_mask, shared_qk):
    """Dense reference of the LSH semantics (tests only, builds N x N per round): each
    round, query i sees key j once per window chunk holding j (Trax's look_adjacent
    windows, a chunk listed once); shared masks on top; rounds merged on their lse."""
    B, H, N, D = q.shape
    scale = D ** -0.5
    kk = shared_qk_keys(q) if shared_qk else k
    Np = -(-N // chunk_len) * chunk_len
    pad = Np - N
    valid = torch.ones(B, N, dtype=torch.bool) if padding_mask is None else padding_mask
    valid = torch.nn.functional.pad(valid, (0, pad), value=False)[:, None, :]
    qp, kp, vp = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, kk, v))
    qb = hash_vectors(qp, rotations, n_buckets, valid)
    kb = qb if shared_qk else hash_vectors(kp, rotations, n_buckets, valid)
    qs, _ = sort_buckets(qb, Np)
    ks, _ = sort_buckets(kb, Np)
    R = qb.shape[-1] // Np
    n_chunks = R * Np // chunk_len
    _, layout = chunk_layout(n_chunks, before, after)
    offs = [0] + [-o for o in range(1, before + 1)] + list(range(1, after + 1))
    s = torch.matmul(qp, kp.transpose(-1, -2)) * scale
    pos = torch.arange(Np)
    s = apply_masks(s, pos[:, None], pos[None, :], causal=causal, exclude_self=shared_qk,
                    k_valid=valid[:, :, None, :])
    outs, lses = [], []
    for r in range(R):
        count = torch.zeros(B, H, Np, Np, dtype=q.dtype)
        for c in range(r * Np // chunk_len, (r + 1) * Np // chunk_len):
            qi = qs[..., c * chunk_len:(c + 1) * chunk_len] % Np  # [B, H, c]
            for slot, o in enumerate(offs):
                if layout[c, slot] < 0:
                    continue
                g = (c + o) % n_chunks
                kj = ks[..., g * chunk_len:(g + 1) * chunk_len] % Np
                for a in range(chunk_len):
                    for b in range(chunk_len):
                        count[torch.arange(B)[:, None], torch.arange(H)[None, :],
                              qi[..., a], kj[..., b]] += 1
        probs, lse = softmax_lse(s + torch.log(count))
        outs.append(probs @ vp)
        lses.append(lse)
    out, lse = merge_partials(torch.stack(outs), torch.stack(lses))
    return out[:, :, :N], lse[:, :, :N]


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("causal,padded,before,after", [
    (False, False, 1, 0), (True, True, 1, 0), (False, True, 2, 1), (True, False, 0, 1),
])
def test_matches_dense_multiset_reference(shared, causal, padded, before, after):
    N, D, R, nb, c = 19, 6, 2, 4, 4
    q, k, v = rand_qkv(2, 2, N, N, D, dtype=torch.float64, seed=7)
    pm = random_padding(2, N, seed=1) if padded else None
    rot = make_rotations(D, R, nb, seed=3).double()
    out, lse = lsh(q, None if shared else k, v, causal=causal, padding_mask=pm, return_lse=True,
                   rotations=rot, chunk_len=c, n_chunks_before=before, n_chunks_after=after)
    ref, ref_lse = dense_lsh_reference(q, k, v, rot, nb, c, before, after, causal=causal,
                                       padding_mask=pm, shared_qk=shared)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(lse, ref_lse, atol=1e-9, rtol=1e-9)


def test_chunk_layout_is_cyclic_and_lists_a_chunk_once():
    gids, layout = chunk_layout(6, 1, 1, first=3, count=3)
    assert gids.tolist() == [2, 3, 4, 5, 0]
    assert layout.tolist() == [[1, 0, 2], [2, 1, 3], [3, 2, 4]]
    # first chunk of the sequence sees the last one (look_adjacent wraps around)
    gids, layout = chunk_layout(4, 1, 0)
    assert gids[layout[0, 1]].item() == 3
    # fewer chunks than slots: repeats become -1
    _, layout = chunk_layout(1, 1, 1)
    assert layout.tolist() == [[1, -1, -1]]
    _, layout = chunk_layout(2, 2, 0)
    assert layout.tolist() == [[2, 1, -1], [3, 2, -1]]


# ---------------------------------------------------------------- causal


@pytest.mark.parametrize("shared", [True, False])
def test_causal_gradient_to_later_positions_is_exactly_zero(shared):
    N, i = 29, 11
    q, k, v = rand_qkv(1, 2, N, N, 8, grad=True)
    out = lsh(q, None if shared else k, v, causal=True, n_hashes=3, chunk_len=4, seed=0)
    out[:, :, i].sum().backward()
    for t in ((q, v) if shared else (q, k, v)):
        assert torch.count_nonzero(t.grad[:, :, i + 1:]) == 0
        assert torch.count_nonzero(t.grad[:, :, :i + 1]) > 0


@pytest.mark.parametrize("shared", [True, False])
def test_causal_output_ignores_later_tokens_when_buckets_are_kept(shared):
    """Later tokens scaled by positive factors (the angular hash is scale-invariant) and
    later values replaced: the buckets, hence the sort and chunks, are kept, and every
    output up to i is unchanged."""
    N, i, D = 31, 12, 8
    q, k, v = rand_qkv(2, 2, N, N, D)
    rot = make_rotations(D, 2, 6, seed=4).double()
    opts = dict(causal=True, rotations=rot, chunk_len=4)
    later = torch.arange(N) > i
    factor = torch.rand(2, 2, N, 1, dtype=q.dtype) * 3 + 0.2
    q2 = torch.where(later[:, None], q * factor, q)
    k2 = torch.where(later[:, None], k * factor.flip(2), k)
    v2 = torch.where(later[:, None], torch.randn_like(v) * 5, v)
    assert torch.equal(hash_vectors(q, rot, 6), hash_vectors(q2, rot, 6))
    assert torch.equal(hash_vectors(k, rot, 6), hash_vectors(k2, rot, 6))
    out = lsh(q, None if shared else k, v, **opts)
    out2 = lsh(q2, None if shared else k2, v2, **opts)
    torch.testing.assert_close(out2[:, :, :i + 1], out[:, :, :i + 1], atol=1e-12, rtol=1e-12)
    assert not torch.allclose(out2[:, :, i + 1:], out[:, :, i + 1:])


# ---------------------------------------------------------------- padding


@pytest.mark.parametrize("causal", [False, True])
def test_padded_tokens_content_never_changes_real_outputs_shared_qk(causal):
    """Shared-QK: a padded token's query takes part in the hash; it goes to the padding
    bucket, so its content moves nothing."""
    N = 26
    q, _, v = rand_qkv(2, 2, N, N, 8)
    pm = random_padding(2, N, seed=8)
    opts = dict(causal=causal, padding_mask=pm, n_hashes=2, chunk_len=4, seed=5)
    out = lsh(q, None, v, **opts)
    pad = ~pm[:, None, :, None]
    out2 = lsh(torch.where(pad, torch.randn_like(q) * 10, q), None,
               torch.where(pad, torch.randn_like(v) * 10, v), **opts)
    real = pm[:, None, :, None].expand_as(out)
    torch.testing.assert_close(out[real], out2[real], atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- gradients, precision


@pytest.mark.parametrize("shared,causal", [(True, False), (False, True)])
def test_gradcheck_float64_fixed_rotations(shared, causal):
    N, D = 10, 4
    q, k, v = rand_qkv(1, 2, N, N, D, Dv=3, grad=True, seed=11)
    rot = make_rotations(D, 2, 4, seed=6).double()
    pm = random_padding(1, N, seed=2)

    def f(q, k, v):
        out, lse = lsh(q, None if shared else k, v, causal=causal, padding_mask=pm,
                       return_lse=True, rotations=rot, chunk_len=4)
        return out, lse.masked_fill(torch.isinf(lse), 0.0)

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shared", [True, False])
def test_low_precision_large_norms_are_finite_and_close(dtype, shared):
    q, k, v = rand_qkv(1, 2, 40, 40, 16, dtype=torch.float32)
    q, k = q * 200, k * 200
    opts = dict(n_hashes=2, chunk_len=8, seed=0)
    out = lsh(q.to(dtype), None if shared else k.to(dtype), v.to(dtype), **opts)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if not shared:  # hashing and softmax run in float32: same as float32 on the rounded inputs
        # (shared-QK keys are built and rounded in the input dtype by the api, so with
        # scores this large the two runs legitimately differ)
        ref = lsh(q.to(dtype).float(), k.to(dtype).float(), v.to(dtype).float(), **opts)
        torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------- randomness


def test_seed_reproducible_and_equal_to_its_rotations():
    q, _, v = rand_qkv(1, 2, 33, 33, 8)
    a = lsh(q, None, v, seed=7, n_hashes=2, chunk_len=4, n_buckets=8)
    b = lsh(q, None, v, seed=7, n_hashes=2, chunk_len=4, n_buckets=8)
    assert torch.equal(a, b)
    c = lsh(q, None, v, rotations=make_rotations(8, 2, 8, 7), chunk_len=4)
    torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-12)
    d = lsh(q, None, v, seed=8, n_hashes=2, chunk_len=4, n_buckets=8)
    assert not torch.allclose(a, d)
    # no seed, no rotations: the documented default seed 0
    assert torch.equal(lsh(q, None, v, chunk_len=4), lsh(q, None, v, chunk_len=4, seed=0))


def test_per_head_rotations_hash_each_head_with_its_own():
    H, D = 3, 8
    q, _, v = rand_qkv(2, H, 21, 21, D)
    rot = torch.stack([make_rotations(D, 2, 6, seed=s) for s in range(H)])
    out = lsh(q, None, v, rotations=rot, chunk_len=4)
    for h in range(H):
        one = lsh(q[:, h:h + 1], None, v[:, h:h + 1], rotations=rot[h], chunk_len=4)
        torch.testing.assert_close(out[:, h:h + 1], one, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(out, lsh(q, None, v, rotations=rot[0], chunk_len=4))


# ---------------------------------------------------------------- shapes and errors


@pytest.mark.parametrize("N", [1, 2, 7, 29])
def test_any_length(N):
    q, k, v = rand_qkv(2, 2, N, N, 8, Dv=5, dtype=torch.float32)
    for kk in (None, k):
        out, lse = lsh(q, kk, v, return_lse=True, n_hashes=3, chunk_len=4, seed=1)
        assert out.shape == (2, 2, N, 5) and lse.shape == (2, 2, N)
        assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("opts,name", [
    (dict(n_buckets=3), "n_buckets"),
    (dict(n_buckets=0), "n_buckets"),
    (dict(chunk_len=0), "chunk_len"),
    (dict(n_hashes=0), "n_hashes"),
    (dict(n_chunks_before=-1), "n_chunks_before"),
    (dict(n_chunks_after=1.5), "n_chunks_after"),
    (dict(seed="x"), "seed"),
    (dict(rotations=torch.randn(5, 2, 3)), "rotations"),
    (dict(rotations=torch.randn(4, 8, 2, 3)), "rotations"),
    (dict(rotations=torch.randn(8, 2)), "rotations"),
    (dict(rotations=torch.randn(8, 2, 3), seed=1), "rotations"),
    (dict(rotations=torch.randn(8, 2, 3), n_hashes=3), "n_hashes"),
    (dict(rotations=torch.randn(8, 2, 3), n_buckets=4), "n_buckets"),
])
def test_bad_options_raise_value_error_naming_the_option(opts, name):
    q, _, v = rand_qkv(1, 2, 8, 8, 8)
    with pytest.raises(ValueError, match=name):
        lsh(q, None, v, **opts)


def test_different_query_and_key_lengths_are_refused():
    q, k, v = rand_qkv(1, 1, 8, 12, 4)
    with pytest.raises(ValueError, match="Nk"):
        lsh(q, k, v)


def test_registration_and_flops():
    s = spec("lsh")
    assert s.random and not s.exact and s.causal and s.family == "lsh"
    assert "lsh" in [m["name"] for m in effattn.methods()]
    f = s.flops
    small = f(1, 4, 4096, 4096, 64, 64, False, n_hashes=4, chunk_len=64)
    big = f(1, 4, 8192, 8192, 64, 64, False, n_hashes=4, chunk_len=64)
    # engine part: 2·B·H·h·N·(2·c)·(D+Dv); hashing: 2·B·H·N·D·h·b/2 with b = N/c
    assert small == 2 * 4 * 4 * 4096 * 128 * 128 + 2 * 4 * 4096 * 64 * 4 * 32
    assert big > 2 * small


def test_rounds_split_over_calls_recompute_and_match_one_call(monkeypatch):
    """Rounds batched in one engine call, or one per call with recomputation in backward
    (the long-sequence path), or merged in slices of a few rows: same outputs, lse and
    gradients."""
    import effattn.mechanisms.lsh as lsh_mod

    q, _, v = rand_qkv(2, 2, 40, 40, 8, grad=True, seed=7)
    go = torch.randn(2, 2, 40, 8, dtype=q.dtype)

    def run():
        out, lse = effattn.attention(q, None, v, "lsh", n_hashes=3, chunk_len=8, causal=True,
                                     return_lse=True)
        grads = torch.autograd.grad((out * go).sum() + lse.sum(), (q, v))
        return out, lse, grads

    one = run()
    monkeypatch.setattr(lsh_mod, "GROUP_GATHER_BYTES", 1)
    split = run()
    monkeypatch.setattr(lsh_mod, "MERGE_ROWS", 7)  # rounds merged in slices of 7 rows
    sliced = run()
    for got in (split, sliced):
        torch.testing.assert_close(got[0], one[0])
        torch.testing.assert_close(got[1], one[1])
        for a, b in zip(got[2], one[2]):
            torch.testing.assert_close(a, b)


@given(h=st.integers(1, 40), lo=st.integers(-4, 0), hi=st.integers(1, 4), seed=st.integers(0, 1000))
def test_concat_argmax_equals_argmax_of_the_concatenation(h, lo, hi, seed):
    """Hashing's argmax over ``concat[xR, -xR]`` with the concatenation never built: same
    index, ties included (small integers tie often; the first maximum wins)."""
    from effattn.mechanisms.lsh import concat_argmax

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(lo, hi, (3, 5, h), generator=g).float()
    x[0, 0] = 0.0  # all equal
    assert torch.equal(concat_argmax(x), torch.cat([x, -x], -1).argmax(-1))
    xt = x.transpose(1, 2).contiguous()  # reduced along a middle dim, as hash_vectors does
    assert torch.equal(concat_argmax(xt, dim=1), torch.cat([xt, -xt], 1).argmax(1))
    y = torch.randn(4, h, generator=g)
    assert torch.equal(concat_argmax(y), torch.cat([y, -y], -1).argmax(-1))
    wide = torch.randint(lo, hi, (300 + h, 7), generator=g).float()  # int32 weights past 255
    assert torch.equal(concat_argmax(wide, dim=0), torch.cat([wide, -wide], 0).argmax(0))


@given(N=st.integers(5, 40), c=st.sampled_from([2, 4, 8]), R=st.integers(1, 3),
       before=st.integers(0, 2), after=st.integers(0, 2), causal=st.booleans(),
       shared=st.booleans(), padded=st.booleans(), seed=st.integers(0, 100))
def test_banded_groups_equal_the_engine_layout(N, c, R, before, after, causal, shared, padded,
                                               seed):
    """Groups run as bands of the gathered key window (views, the self pair on the own
    chunk's diagonal plus other rounds' chunks; shared-QK keys derived from the gathered
    query rows) give the engine layout's outputs, lse and gradients, in one group or many."""
    import effattn.mechanisms.lsh as lsh_mod

    q, k, v = rand_qkv(2, 2, N, N, 4, dtype=torch.float64, grad=True, seed=seed)
    pm = random_padding(2, N, seed=seed) if padded else None
    go = torch.randn(2, 2, N, 4, dtype=torch.float64)

    def run():
        out, lse = lsh(q, None if shared else k, v, causal=causal, padding_mask=pm,
                       return_lse=True, n_hashes=R, chunk_len=c, n_chunks_before=before,
                       n_chunks_after=after, seed=seed)
        grads = torch.autograd.grad((out * go).sum() + lse.clamp(min=-1e3).sum(), (q, k, v),
                                    allow_unused=True)
        return out, lse, grads

    with pytest.MonkeyPatch.context() as m:
        m.setattr(lsh_mod._Sorted, "banded", property(lambda self: False))
        ref = run()
    for group_bytes in (lsh_mod.GROUP_GATHER_BYTES, 1):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(lsh_mod, "GROUP_GATHER_BYTES", group_bytes)
            got = run()
        torch.testing.assert_close(got[0], ref[0], atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(got[1], ref[1], atol=1e-10, rtol=1e-10)
        for a, b in zip(got[2], ref[2]):
            if b is None:
                assert a is None or not a.abs().any()
            else:
                torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@given(lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), seqlen=st.integers(1, 40),
       R=st.integers(1, 3), nb=st.sampled_from([2, 4, 64]), seed=st.integers(0, 1000))
def test_sort_buckets_is_a_stable_row_wise_sort_by_bucket_then_position(lead, seqlen, R, nb, seed):
    """Every row's entries sorted by (bucket, position) with the inverse permutation, as a
    stable row-wise sort of Trax's keys gives — the rows sorted in one flat pass must not
    mix."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, nb, (*lead, R * seqlen), generator=g)
    b = b + torch.arange(R).repeat_interleave(seqlen) * nb  # per-round offsets
    sticker, undo = sort_buckets(b, seqlen)
    ref = torch.sort(bucket_sort_keys(b, seqlen), dim=-1, stable=True).indices
    assert torch.equal(sticker, ref)
    ticker = torch.arange(R * seqlen).expand_as(b)
    assert torch.equal(sticker.gather(-1, undo), ticker)
