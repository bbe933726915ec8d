"""The optional native kernels (:mod:`effattn.native`): built where a C compiler is, the
same results as their torch twins, and a clean fallback where they are not built."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings, strategies as st

from effattn import native
from effattn.mechanisms import lsh


def _reference(x):
    return torch.cat([x, -x], -1).argmax(-1)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A native library state of its own (environment, cache folder); the process's loaded
    one is restored afterwards."""
    monkeypatch.setenv("EFFATTN_CACHE_DIR", str(tmp_path))
    native._library.cache_clear()
    yield
    monkeypatch.undo()
    native._library.cache_clear()


def test_native_kernels_build_where_a_compiler_is():
    """CI machines have gcc: the kernels must load there (a silent fallback would leave
    them untested)."""
    if native._compiler() is None:
        pytest.skip("no C compiler on this machine: the torch twins run")
    assert native.available(), native.status()


@given(rows=st.integers(0, 40), h=st.integers(1, 600), lo=st.integers(-4, 0), hi=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_native_concat_argmax_is_the_argmax_of_the_concatenation(rows, h, lo, hi, dtype, seed):
    """Same index as ``argmax(cat([x, -x]))``, ties included (small integers tie often: the
    first maximum wins, the positive half before the negative), all-zero rows, signed
    zeros, random reals."""
    if not native.available():
        pytest.skip(native.status())
    g = torch.Generator().manual_seed(seed)
    ties = torch.randint(lo, hi, (rows, 3, h), generator=g).to(dtype)
    if rows:
        ties[0, 0] = 0.0
        ties[0, 1] = -0.0
    reals = torch.randn(rows, 2, h, generator=g, dtype=dtype)
    for x in (ties, reals):
        assert torch.equal(native.concat_argmax(x), _reference(x))
        assert torch.equal(native.concat_argmax(x), lsh.concat_argmax(x))


def test_native_concat_argmax_keeps_nan_rows_in_range_and_declines_other_tensors():
    if not native.available():
        pytest.skip(native.status())
    x = torch.randn(5, 33)
    x[1, 4] = float("nan")
    x[2] = float("nan")
    got = native.concat_argmax(x)
    assert bool(((got >= 0) & (got < 66)).all())
    clean = [0, 3, 4]
    assert torch.equal(got[clean], _reference(x[clean]))
    # not served: the caller's torch passes run instead
    assert native.concat_argmax(torch.randn(4, 6).t()) is None  # not contiguous
    assert native.concat_argmax(torch.randint(0, 5, (4, 6))) is None
    assert native.concat_argmax(torch.randn(4, 6, dtype=torch.bfloat16)) is None
    assert native.concat_argmax(torch.randn(4, 6, requires_grad=True)) is None


@pytest.mark.parametrize("N", [512, 4096])  # half 4 (tokens-last layout) and 32 / 64
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hash_buckets_are_the_same_with_and_without_the_native_argmax(monkeypatch, N, dtype):
    """Buckets from the native argmax (and the layout chosen with it) equal the torch
    passes' buckets, padding bucket included; the fused hash (projections summed in its own
    order) gives them too but for near-ties, and the same padding buckets."""
    g = torch.Generator().manual_seed(N)
    x = torch.randn(2, 3, N, 16, generator=g, dtype=dtype)
    valid = torch.rand(2, 1, N, generator=g) > 0.1
    for n_buckets in (8, 64, 128):
        rot = torch.randn(3, 16, 2, n_buckets // 2, generator=g, dtype=dtype)
        fused = lsh.hash_vectors(x, rot, n_buckets, valid)
        monkeypatch.setattr(lsh, "FUSED_HASH", False)
        with_native = lsh.hash_vectors(x, rot, n_buckets, valid)
        monkeypatch.setattr(native, "hash_buckets", lambda *a: False)  # slices declined
        declined = lsh.hash_vectors(x, rot, n_buckets, valid)
        monkeypatch.setattr(native, "available", lambda: False)
        monkeypatch.setattr(native, "concat_argmax", lambda t: None)
        without = lsh.hash_vectors(x, rot, n_buckets, valid)
        monkeypatch.undo()
        assert torch.equal(with_native, without) and torch.equal(declined, without)
        padding = ((fused % (n_buckets + 1)) == n_buckets) | ((without % (n_buckets + 1)) == n_buckets)
        assert torch.equal(fused[padding], without[padding])
        assert (fused == without).float().mean() > 0.999
        ref = _reference(torch.einsum("bhnd,hdrk->bhrnk", x, rot)) + \
            torch.arange(2).view(2, 1) * (n_buckets + 1)
        ref = torch.where(valid[:, :, None], ref, torch.full_like(ref, n_buckets) +
                          torch.arange(2).view(2, 1) * (n_buckets + 1))
        assert torch.equal(with_native, ref.flatten(-2))


@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 150), D=st.sampled_from([8, 16, 33, 64]),
       R=st.integers(1, 3), h=st.sampled_from([4, 8, 12, 16, 40, 64, 132]), per_head=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_native_lsh_hash_picks_the_maximum_of_the_projections(B, H, N, D, R, h, per_head, seed):
    """The fused hash's bucket for each token and round is an entry of
    ``concat[x R_r, -x R_r]`` (float64 projections) within float32 rounding of the maximum,
    and exactly the first maximum wherever it leads the runner-up by more than that; round
    offsets added; any N (block tails), D, and h a multiple of 4 (not of the vector width)."""
    if not native.available():
        pytest.skip(native.status())
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, N, D, generator=g)
    rot = torch.randn(*((H,) if per_head else ()), D, R, h, generator=g)
    per_round = 2 * h + 1
    got = native.lsh_hash(x, rot, per_round)
    assert got is not None and got.shape == (B, H, R, N)
    eq = "bhnd,hdrk->bhrnk" if per_head else "bhnd,drk->bhrnk"
    proj = torch.einsum(eq, x.double(), rot.double())
    full = torch.cat([proj, -proj], -1)  # [B, H, R, N, 2h]
    idx = got - torch.arange(R).view(R, 1) * per_round
    assert bool(((idx >= 0) & (idx < 2 * h)).all())
    chosen = full.gather(-1, idx[..., None]).squeeze(-1)
    top2 = full.topk(2, -1).values
    tol = 1e-5 * (1 + full.abs().amax(-1))
    assert bool((top2[..., 0] - chosen <= tol).all())
    clear = top2[..., 0] - top2[..., 1] > tol
    assert torch.equal(idx[clear], full.argmax(-1)[clear])


def test_native_lsh_hash_declines_what_it_does_not_take():
    """Rounds of h not a multiple of 4, other dtypes, tensors wanting gradients, per-head
    rotations that do not match the heads: None (the sliced torch path then runs)."""
    if not native.available():
        pytest.skip(native.status())
    x = torch.randn(1, 2, 32, 16)
    assert native.lsh_hash(x, torch.randn(16, 2, 8), 17) is not None
    assert native.lsh_hash(x, torch.randn(16, 2, 6), 13) is None
    assert native.lsh_hash(x.double(), torch.randn(16, 2, 8).double(), 17) is None
    assert native.lsh_hash(x.requires_grad_(True), torch.randn(16, 2, 8), 17) is None
    with torch.no_grad():
        assert native.lsh_hash(x, torch.randn(16, 2, 8), 17) is not None
    assert native.lsh_hash(x.detach(), torch.randn(3, 16, 2, 8), 17) is None


def test_environment_switch_disables_the_kernels(monkeypatch, fresh_library):
    monkeypatch.setenv("EFFATTN_NATIVE", "0")
    assert not native.available()
    assert "EFFATTN_NATIVE" in native.status()
    assert native.concat_argmax(torch.randn(3, 4)) is None
    x = torch.randn(2, 1, 64, 8)
    rot = torch.randn(8, 2, 16)
    assert lsh.hash_vectors(x, rot, 32).shape == (2, 1, 128)  # the torch passes serve


def test_a_failing_compiler_falls_back_with_its_reason(monkeypatch, fresh_library):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` command to stand in for a broken compiler")
    monkeypatch.setenv("CC", false)
    assert not native.available()
    assert native.status().startswith("build or load failed")
    monkeypatch.setenv("CC", "no-such-compiler-anywhere")
    native._library.cache_clear()
    assert not native.available() and "no C compiler" in native.status()


@given(BH=st.integers(1, 3), n=st.integers(1, 9), R=st.integers(1, 3), h=st.integers(1, 70),
       t0=st.integers(0, 4), per_round=st.integers(0, 300), seed=st.integers(0, 1000))
@settings(max_examples=40, deadline=None)
def test_native_hash_buckets_write_their_columns_with_round_offsets(BH, n, R, h, t0, per_round, seed):
    """``out[b, r, t] = argmax(concat[x[b, t, r], -x[b, t, r]]) + r * per_round`` into columns
    ``t0 .. t0 + n`` of a larger bucket tensor; the other columns stay untouched."""
    if not native.available():
        pytest.skip(native.status())
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-3, 3, (BH, n, R, h), generator=g).float()
    whole = torch.full((BH, R, n + t0 + 2), -7, dtype=torch.long)
    assert native.hash_buckets(x, whole[:, :, t0:t0 + n], per_round)
    want = _reference(x).transpose(1, 2) + torch.arange(R).view(R, 1) * per_round
    assert torch.equal(whole[:, :, t0:t0 + n], want)
    assert bool((whole[:, :, :t0] == -7).all()) and bool((whole[:, :, t0 + n:] == -7).all())
    assert not native.hash_buckets(x, torch.empty(BH, R, n + 1, dtype=torch.long), per_round)
    assert not native.hash_buckets(x.long(), whole[:, :, t0:t0 + n], per_round)
    assert not native.hash_buckets(x, whole[:, :, t0:t0 + n].int(), per_round)


def _lsh_both_ways(monkeypatch, q, k, v, *, shared, grad, **opts):
    """``lsh`` results ``[out, lse]`` (with ``grad``, then the gradients of q, v and, unless
    ``shared``, k) through the fused native chunk kernels and through the torch groups, and
    whether each kernel call (forward and backward) served."""
    import effattn

    calls = []

    def counted(real):
        def call(*a, **kw):
            calls.append(real(*a, **kw))
            return calls[-1]
        return call

    monkeypatch.setattr(native, "lsh_chunks", counted(native.lsh_chunks))
    monkeypatch.setattr(native, "lsh_chunks_backward", counted(native.lsh_chunks_backward))
    results = []
    for use in (True, False):
        monkeypatch.setattr(lsh, "USE_NATIVE_CHUNKS", use)
        xs = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
        with torch.set_grad_enabled(grad):
            out, lse = effattn.attention(xs[0], None if shared else xs[1], xs[2], "lsh",
                                         return_lse=True, **opts)
        res = [out.detach(), lse.detach()]
        if grad:
            g = torch.Generator().manual_seed(5)
            fin = torch.isfinite(lse)  # the lse's gradient enters through delta
            loss = (out * torch.randn(out.shape, generator=g)).sum()
            (loss + (lse[fin] * torch.randn(int(fin.sum()), generator=g)).sum()).backward()
            res += [x.grad for x in (xs[::2] if shared else xs)]
        results.append(res)
    return results, calls


@pytest.mark.parametrize("shared,causal,padded,before,after,n_hashes,C,D", [
    (True, False, False, 1, 0, 4, 64, 64),   # the bench's setting
    (True, True, False, 1, 0, 2, 16, 32),
    (False, False, True, 1, 0, 3, 32, 16),
    (True, True, True, 2, 1, 2, 16, 48),
    (True, False, True, 1, 1, 1, 16, 32),   # one round: the window wraps onto itself
    (False, True, False, 1, 0, 2, 48, 80),  # odd vector counts (columns, values)
])
def test_native_lsh_chunks_equal_the_torch_groups(monkeypatch, shared, causal, padded, before,
                                                  after, n_hashes, C, D):
    """The fused chunk kernels give the torch groups' results: the forward (scores,
    shared-QK self penalty, causal and padding masks, base-2 softmax, round merge) their
    output and lse; the backward (recomputed from the merged lse, key and value gradients
    gathered per key chunk across the window's query chunks and the rounds' wrap) their
    gradients of q, k, v.  Padding leaves fully masked rows (zeros, -inf)."""
    if not native.available():
        pytest.skip(native.status())
    g = torch.Generator().manual_seed(1)
    N = 8 * C
    q, k, v = (torch.randn(2, 2, N, D, generator=g) for _ in range(3))
    pm = None
    if padded:
        pm = torch.ones(2, N, dtype=torch.bool)
        pm[0, N - 3 * C // 2:] = False
        pm[1, :5] = False
    opts = dict(n_hashes=n_hashes, chunk_len=C, causal=causal, padding_mask=pm,
                n_chunks_before=before, n_chunks_after=after, seed=3)
    for grad in (False, True):
        (fused, ref), calls = _lsh_both_ways(monkeypatch, q, k, v, shared=shared, grad=grad, **opts)
        # forward: one call per round; training adds the backward's one call
        assert calls == [True] * (n_hashes + grad), "the kernels must serve these shapes"
        assert torch.equal(torch.isneginf(fused[1]), torch.isneginf(ref[1]))
        fin = torch.isfinite(ref[1])
        torch.testing.assert_close(fused[1][fin], ref[1][fin], rtol=0, atol=5e-6)
        for a, b in zip([fused[0]] + fused[2:], [ref[0]] + ref[2:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)


def test_native_lsh_chunks_decline_what_they_do_not_take():
    """Shapes off the vector width, other dtypes, tensors wanting gradients and too few
    chunks are declined (nothing written); the torch groups then run."""
    if not native.available():
        pytest.skip(native.status())
    vw = native._library().effattn_lsh_vector_width()
    N, C = 64, 16

    def call(q, k, v, chunk_len=C, before=1, rounds=2):
        pos = torch.arange(N).repeat(rounds).view(1, 1, -1)
        out = torch.full((1, 1, N, v.shape[-1]), 7.0)
        lse = torch.full((1, 1, N), 7.0)
        served = native.lsh_chunks(q, k, v, pos, pos, None, chunk_len=chunk_len, before=before,
                                   after=0, qscale=1.0, exclude_self=True, penalty=1e5, causal=False,
                                   first=0, count=N // chunk_len, out=out, lse=lse, merge=False)
        return served, bool((out == 7.0).all() and (lse == 7.0).all())

    x = torch.randn(1, 1, N, 32)
    assert call(x, x, x) == (True, False)
    odd = torch.randn(1, 1, N, vw + 4)
    assert call(odd, odd, odd) == (False, True)
    assert call(x.double(), x.double(), x.double()) == (False, True)
    assert call(x.bfloat16(), x.bfloat16(), x.bfloat16()) == (False, True)
    assert call(x, x, x, chunk_len=vw + 4) == (False, True)
    assert call(x, x, x, before=2 * N // C, rounds=2) == (False, True)  # window > chunks
    w = x.clone().requires_grad_(True)
    assert call(w, x, x) == (False, True)
    with torch.no_grad():
        assert call(w, x, x)[0]


def test_native_lsh_chunks_backward_declines_what_it_does_not_take(monkeypatch):
    """Fewer (batch, head)s than threads (one thread owns each), other dtypes, shapes off
    the vector width, tensors wanting gradients: declined with nothing written."""
    if not native.available():
        pytest.skip(native.status())
    vw = native._library().effattn_lsh_vector_width()
    N, C = 64, 16

    def call(q, k, v, BH=2, threads=2):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        pos = torch.arange(N).repeat(2).view(1, 1, -1)
        q, k, v = (x.expand(1, BH, N, x.shape[-1]).contiguous() for x in (q, k, v))
        stats = [torch.zeros(1, BH, N, dtype=q.dtype) for _ in range(2)]
        grads = [torch.full(t.shape, 7.0, dtype=t.dtype) for t in (q, k, v)]
        served = native.lsh_chunks_backward(
            q, k, v, pos, pos, None, *stats, torch.ones_like(v), chunk_len=C, before=1, after=0,
            qscale=1.0, scale=1.0, exclude_self=True, penalty=1e5, causal=False,
            dq=grads[0], dk=grads[1], dv=grads[2])
        return served, all(bool((t == 7.0).all()) for t in grads)

    x = torch.randn(1, 1, N, 32)
    assert call(x, x, x) == (True, False)
    assert call(x, x, x, BH=1) == (False, True)
    assert call(x, x, x, BH=1, threads=1)[0]
    odd = torch.randn(1, 1, N, vw + 4)
    assert call(odd, odd, odd) == (False, True)
    assert call(x.double(), x.double(), x.double()) == (False, True)
    w = x.clone().requires_grad_(True)
    assert call(w, x, x) == (False, True)
    with torch.no_grad():
        assert call(w, x, x)[0]


def test_native_lsh_chunks_merge_rounds_like_merge_pair():
    """Written then merged rows: the second call folds its rows into the first's with the
    log-sum-exp weights of :func:`effattn.softmax.merge_pair_` (here two identical rounds:
    the output is unchanged, the lse rises by log 2)."""
    if not native.available():
        pytest.skip(native.status())
    g = torch.Generator().manual_seed(0)
    N, C = 64, 16
    q, k, v = (torch.randn(1, 2, N, 32, generator=g) for _ in range(3))
    perm = torch.randperm(N, generator=g)
    pos = torch.cat([perm, perm]).view(1, 1, -1)
    out, lse = torch.empty(1, 2, N, 32), torch.empty(1, 2, N)
    kw = dict(chunk_len=C, before=1, after=0, qscale=1.0, exclude_self=False, penalty=0.0,
              causal=False, count=N // C, out=out, lse=lse)
    assert native.lsh_chunks(q, k, v, pos, pos, None, first=0, merge=False, **kw)
    o1, l1 = out.clone(), lse.clone()
    # round 1 repeats round 0's chunks, but its first chunk's window wraps onto round 0's last
    # chunk, which is round 1's own last chunk: identical windows for every chunk
    assert native.lsh_chunks(q, k, v, pos, pos, None, first=N // C, merge=True, **kw)
    torch.testing.assert_close(out, o1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, l1 + torch.log(torch.tensor(2.0)), rtol=0, atol=2e-6)
