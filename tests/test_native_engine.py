"""The block-sparse engine's native kernels (``effattn.native.block_sparse`` and its
backward): the same results as the engine's torch tiles (their twin) for any layout, rule,
position and padding the kernels take, used by the methods built on the engine, and a
clean decline (nothing written) for what they do not take."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import effattn
from effattn import native
from tests.helpers import native_vector_width as _vw
from effattn.masks import allowed_pairs, distance_rule, elementwise
from effattn.mechanisms import blocksparse
from effattn.mechanisms.blocksparse import block_sparse_attention

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")



@pytest.fixture
def calls(monkeypatch):
    """Every native engine call's result ("fwd" / "bwd", served), in order; ``.with_rows``:
    the same for the calls given a row map."""

    class Calls(list):
        with_rows = []

    got = Calls()
    got.with_rows = []

    def counted(name, real):
        def call(*a, **kw):
            got.append((name, real(*a, **kw)))
            if kw.get("rows") is not None:
                got.with_rows.append(got[-1])
            return got[-1][1]
        return call

    monkeypatch.setattr(native, "block_sparse", counted("fwd", native.block_sparse))
    monkeypatch.setattr(native, "block_sparse_backward", counted("bwd", native.block_sparse_backward))
    return got


def _both_paths(fn, q, k, v, grad=True, seed=5):
    """``fn(q, k, v) -> (out, lse)`` with the native kernels and with the torch tiles:
    ``[native results, tile results]``, each ``[out, lse] (+ [dq, dk, dv])``, the loss
    including the lse (its gradient enters the backward through delta)."""
    results = []
    for use in (True, False):
        xs = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
        with pytest.MonkeyPatch.context() as mp, torch.set_grad_enabled(grad):
            mp.setattr(blocksparse, "USE_NATIVE", use)
            out, lse = fn(*xs)
        res = [out.detach(), lse.detach()]
        if grad:
            g = torch.Generator().manual_seed(seed)
            fin = torch.isfinite(lse)
            loss = (out * torch.randn(out.shape, generator=g)).sum()
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(blocksparse, "USE_NATIVE", use)
                (loss + (lse[fin] * torch.randn(int(fin.sum()), generator=g)).sum()).backward()
            res += [x.grad for x in xs]
        results.append(res)
    return results


def _assert_same(fused, ref):
    """Outputs and lse within float32 rounding of a few hundred terms; gradients (sums over
    every query of a key, in another order) within a few times that."""
    assert torch.equal(torch.isneginf(fused[1]), torch.isneginf(ref[1]))
    fin = torch.isfinite(ref[1])
    torch.testing.assert_close(fused[1][fin], ref[1][fin], rtol=1e-5, atol=5e-6)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-5, atol=5e-6)
    for a, b in zip(fused[2:], ref[2:]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), H=st.integers(1, 3), blocks=st.integers(1, 6), cut=st.integers(0, 15),
       C_mult=st.integers(1, 3), D_mult=st.integers(1, 3), Dv_mult=st.integers(1, 2),
       S=st.integers(1, 5), dense=st.booleans(), per_head=st.booleans(), causal=st.booleans(),
       shared=st.booleans(), padded=st.booleans(), rule=st.sampled_from(
           ["none", "band", "dilated", "offdiag", "band-offdiag"]),
       permuted=st.booleans(), hint=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_native_engine_equals_the_torch_tiles(B, H, blocks, cut, C_mult, D_mult,
                                              Dv_mult, S, dense, per_head, causal, shared, padded,
                                              rule, permuted, hint, seed):
    """Forward (output, lse) and gradients (q, k, v, the lse's included) of the native
    kernels equal the torch tiles' for random layouts (empty slots, per-head or shared,
    dense), causal, shared-QK self penalty, padding (rows left with no key: zeros, -inf),
    distance rules, permuted positions (LSH-like sorted orders), the rule-free slot hint,
    and lengths off the block size (the engine pads)."""
    vw = _vw()
    C, D, Dv = C_mult * vw, D_mult * vw, Dv_mult * vw
    N = max(1, blocks * C - cut)
    nb = -(-N // C)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=g) for d in (D, D, Dv))
    if shared:
        k = q
    lay = None
    if not dense:
        Hl = H if per_head else 1
        lay = torch.stack([torch.randperm(nb, generator=g)[:min(S, nb)] for _ in range(Hl * nb)])
        lay = lay.view(1, Hl, nb, -1)
        lay = torch.where(torch.rand(lay.shape, generator=g) < 0.15, -1, lay)
    pm = (torch.rand(B, 1, N, generator=g) > 0.3) if padded else None
    pair = {"none": None, "band": distance_rule(C), "dilated": distance_rule(2 * C, 3),
            "offdiag": distance_rule(off_diagonal=True),
            "band-offdiag": distance_rule(C // 2, off_diagonal=True)}[rule]
    pos = torch.randperm(N, generator=g)[None, None] if permuted else None
    full = None
    if hint and lay is not None:  # slots whose every pair the rules allow (some dropped)
        qp = torch.arange(nb * C) if pos is None else torch.cat([pos[0, 0], torch.full((nb * C - N,), -1)])
        ok = allowed_pairs(qp.view(nb, C)[:, :, None, None], qp.view(1, 1, nb, C), causal=causal,
                           pair_mask=pair)
        ok = torch.ones(nb, C, nb, C, dtype=torch.bool) if ok is None else ok.expand(nb, C, nb, C)
        whole = ok.all(3).all(1)  # [query block, key block]
        full = (lay >= 0) & torch.gather(whole[None, None].expand(1, lay.shape[1], nb, nb), 3,
                                         lay.clamp(min=0))
        full &= torch.rand(full.shape, generator=g) < 0.7

    def fn(q, k, v):
        return block_sparse_attention(q, k, v, lay, block_q=C, block_k=C, scale=0.4, causal=causal,
                                      exclude_self=shared, k_valid=pm, pair_mask=pair, q_pos=pos,
                                      k_pos=pos, full_slots=full)

    served = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("block_sparse", "block_sparse_backward"):
            real = getattr(native, name)
            mp.setattr(native, name, lambda *a, real=real, name=name, **kw: served.append(
                (name, real(*a, **kw))) or served[-1][1])
        fused, ref = _both_paths(fn, q, k, v)
    # the forward serves every call here; the backward where each thread gets a (batch, head)
    bwd = B * H >= torch.get_num_threads()
    assert served == [("block_sparse", True), ("block_sparse_backward", bwd)]
    _assert_same(fused, ref)


def test_native_engine_serves_the_bench_shapes_and_row_views(monkeypatch, calls):
    """At the bench's shapes (B=1, H=4, D=64, 64-blocks) both kernels serve; a no-grad call
    writing a row range of a larger output (``out=``, from a row range of the queries)
    writes those rows only, as the tiles do."""
    g = torch.Generator().manual_seed(0)
    N, C = 512, 64
    q, k, v = (torch.randn(1, 4, N, 64, generator=g) for _ in range(3))
    lay = torch.tensor([[i, (i + 3) % 8, 7 - i] for i in range(8)]).view(1, 1, 8, 3)

    def fn(q, k, v):
        return block_sparse_attention(q, k, v, lay, block_q=C, block_k=C, scale=0.125)

    fused, ref = _both_paths(fn, q, k, v)
    assert [c for c in calls] == [("fwd", True), ("bwd", True)]
    _assert_same(fused, ref)
    outs = []
    for use in (True, False):
        monkeypatch.setattr(blocksparse, "USE_NATIVE", use)
        big = torch.full((1, 4, N + 128, 64), 3.0)
        with torch.no_grad():
            block_sparse_attention(q[:, :, 128:384], k, v, lay[:, :, 2:6], block_q=C, block_k=C,
                                   scale=0.125, q_pos=torch.arange(128, 384)[None, None],
                                   need_lse=False, out=big[:, :, 64:320])
        outs.append(big)
    assert calls[-1] == ("fwd", True)
    assert bool((outs[0][:, :, :64] == 3.0).all() and (outs[0][:, :, 320:] == 3.0).all())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("method,N,opts", [
    ("bigbird", 512, {}),
    ("bigbird", 512, {"causal": True}),
    ("longformer", 512, {"window": 48}),
    ("longformer", 512, {"window": 40, "dilation": 2, "causal": True}),
    ("sparse_strided", 512, {"stride": 32, "block_size": 32}),
    ("sparse_strided", 512, {"stride": 32, "block_size": 32, "causal": True}),
    # residue classes with padding slots (500 = 15 * 32 + 20), and padded keys
    ("sparse_strided", 500, {"stride": 32, "block_size": 32, "padded": True}),
])
def test_methods_on_the_engine_equal_with_and_without_the_kernels(calls, method, N, opts):
    """BigBird (global rows dense, the others sparse), Longformer (band rules, dilated or
    not) and strided Sparse Transformer (near band plus the off-diagonal residue classes,
    read and written in place through the row map) give the torch tiles' output, lse and
    gradients through the native kernels, which serve every one of their engine calls."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, N, 32, generator=g) for _ in range(3))
    opts = dict(opts, return_lse=True)
    if opts.pop("padded", False):
        opts["padding_mask"] = torch.rand(1, N, generator=g) > 0.2

    def fn(q, k, v):
        return effattn.attention(q, k, v, method, **opts)

    fused, ref = _both_paths(fn, q, k, v)
    assert calls and all(served for _, served in calls), calls
    assert {name for name, _ in calls} == {"fwd", "bwd"}
    if method == "sparse_strided":  # the residue part: its rows through the row map
        assert calls.with_rows == [("fwd", True), ("bwd", True)]
    _assert_same(fused, ref)


def test_native_engine_declines_what_it_does_not_take(monkeypatch):
    """Other dtypes, blocks off the vector width, unequal query/key blocks, pair rules that
    are not distance rules, tensors wanting gradients and (backward) fewer (batch, head)s
    than threads: declined with nothing written; the engine then runs its tiles."""
    vw = _vw()
    C, N = 2 * vw, 4 * vw
    x = torch.randn(1, 2, N, vw)
    pos = torch.arange(N)[None, None]
    lay = torch.tensor([[0, 1], [1, 0], [2, 3], [3, 2]]).view(1, 1, 4, 2)[:, :, :N // C]

    def fwd(q, k, v, block=C, rule=None):
        out = torch.full((*q.shape[:3], v.shape[-1]), 7.0)
        lse = torch.full(q.shape[:3], 7.0)
        served = native.block_sparse(q, k, v, lay, block=block, q_pos=pos, k_pos=pos,
                                     k_valid=None, full_slots=None, qscale=1.0, causal=False,
                                     exclude_self=False, penalty=1e5, distance=rule, out=out,
                                     lse=lse)
        return served, bool((out == 7.0).all() and (lse == 7.0).all())

    assert fwd(x, x, x) == (True, False)
    assert fwd(x.double(), x.double(), x.double()) == (False, True)
    odd = torch.randn(1, 2, N, vw + 4)
    assert fwd(odd, odd, odd) == (False, True)
    assert fwd(x, x, x, block=vw + 4)[0] is False
    w = x.clone().requires_grad_(True)
    assert fwd(w, x, x) == (False, True)

    def bwd(q, k, v, threads):
        grads = [torch.full(t.shape, 7.0) for t in (q, k, v)]
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        served = native.block_sparse_backward(
            q, k, v, lay, block=C, q_pos=pos, k_pos=pos, k_valid=None, full_slots=None,
            qscale=1.0, scale=1.0, causal=False, exclude_self=False, penalty=1e5, distance=None,
            lse2=torch.zeros(q.shape[:3]), delta=torch.zeros(q.shape[:3]), dout=torch.randn(q.shape),
            dq=grads[0], dk=grads[1], dv=grads[2], add_dq=False)
        monkeypatch.undo()
        return served, all(bool((t == 7.0).all()) for t in grads)

    assert bwd(x, x, x, threads=2) == (True, False)
    assert bwd(x, x, x, threads=3) == (False, True)  # 2 (batch, head)s < 3 threads
    # the engine: unequal blocks and an arbitrary rule go to the tiles, with the same results
    q = torch.randn(1, 2, N, vw)

    @elementwise
    def same_half(a, b):
        return (a < N // 2) == (b < N // 2)

    for kw in (dict(block_q=C, block_k=vw, kv_blocks=None),
               dict(block_q=C, block_k=C, kv_blocks=lay, pair_mask=same_half)):
        called = []
        monkeypatch.setattr(native, "block_sparse",
                            lambda *a, **k: called.append(1) or False)
        kvb = kw.pop("kv_blocks")
        out, _ = block_sparse_attention(q, q, q, kvb, scale=1.0, **kw)
        monkeypatch.undo()
        assert not called and torch.isfinite(out).all()
