"""FlexAttention dispatch of the block-sparse engine: both paths give the same answer.

Each case runs the engine (or a method) with the dispatch forced on and forced off
(:func:`effattn.mechanisms._flex.flex_mode`) and compares the outputs to float32
tolerance; a spy checks that the forced-on call really went to FlexAttention.  Shapes
are small but fixed (each new shape costs one ``torch.compile``).
"""

import pytest
import torch

import effattn
from effattn.masks import elementwise
from effattn.mechanisms import _flex
from effattn.mechanisms._flex import flex_mode
from effattn.mechanisms.blocksparse import block_sparse_attention
from tests.helpers import rand_qkv, random_padding

pytestmark = pytest.mark.skipif(not _flex.available(),
                                reason="torch.nn.attention.flex_attention is not available in this torch")

TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.fixture
def flex_calls(monkeypatch):
    """Counts the engine calls that went to FlexAttention."""
    calls = []
    orig = _flex.forward

    def spy(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    monkeypatch.setattr(_flex, "forward", spy)
    return calls


def _both(fn):
    """``fn()`` under no_grad with dispatch off and on -> ``(own, flex)``."""
    with torch.no_grad():
        with flex_mode("off"):
            own = fn()
        with flex_mode("on"):
            flex = fn()
    return own, flex


def _layout(nqb, nkb, S, g, per_head=False, B=2, H=2):
    """Random layout ``[B|1, H|1, nqb, S]`` with distinct blocks per row and empty slots."""
    rows = B * H if per_head else 1
    idx = torch.stack([torch.randperm(nkb, generator=g)[:S] for _ in range(rows * nqb)])
    idx[torch.rand(idx.shape, generator=g) < 0.25] = -1
    idx[0] = -1  # query block 0 sees nothing: its rows must be zeros
    return idx.view(B if per_head else 1, H if per_head else 1, nqb, S)


@pytest.mark.parametrize("causal,self_,pad,per_head,pair", [
    (False, False, False, False, False),
    (True, True, True, True, True),
])
def test_engine_flex_equals_own_path(flex_calls, causal, self_, pad, per_head, pair):
    g = torch.Generator().manual_seed(3)
    B, H, N, bq, bk = 2, 2, 45, 8, 16  # N not a block multiple: padded rows and keys
    q, k, v = rand_qkv(B, H, N, N, 16, 8, dtype=torch.float32, seed=1)
    layout = _layout(-(-N // bq), -(-N // bk), 2, g, per_head)
    kv = random_padding(B, N, seed=4, empty_row=1)[:, None, :] if pad else None
    pm = elementwise(lambda a, b: (a - b) % 3 != 1) if pair else None

    def run():
        return block_sparse_attention(q, k, v, layout, block_q=bq, block_k=bk, scale=0.4,
                                      causal=causal, exclude_self=self_, k_valid=kv,
                                      pair_mask=pm, need_lse=False)[0]

    own, flex = _both(run)
    assert flex_calls, "the forced-on call did not go to FlexAttention"
    torch.testing.assert_close(flex, own, **TOL)
    assert torch.equal(flex[0, 0, :bq], torch.zeros_like(flex[0, 0, :bq]))


def test_engine_keeps_own_path_for_grad_lse_duplicates_and_unmarked_rules(flex_calls):
    q, k, v = rand_qkv(1, 1, 32, 32, 8, dtype=torch.float32, seed=2)
    ok = torch.tensor([[[[0, 1], [1, -1]]]])
    dup = torch.tensor([[[[0, 0], [1, -1]]]])
    kw = dict(block_q=16, block_k=16, scale=1.0)
    with flex_mode("on"), torch.no_grad():
        _, lse = block_sparse_attention(q, k, v, ok, **kw)  # lse asked for: own path on CPU
        assert lse is not None
        block_sparse_attention(q, k, v, dup, need_lse=False, **kw)
        block_sparse_attention(q, k, v, ok, need_lse=False, pair_mask=lambda a, b: a >= b, **kw)
    with flex_mode("on"):
        qg = q.clone().requires_grad_(True)
        out, _ = block_sparse_attention(qg, k, v, ok, need_lse=False, **kw)
        out.sum().backward()  # CPU training: own path, with gradients
    assert not flex_calls
    with flex_mode("on"), torch.no_grad():
        block_sparse_attention(q, k, v, ok, need_lse=False, **kw)
    assert flex_calls


def test_inference_with_inputs_that_require_grad_goes_to_flex(flex_calls):
    """Under no_grad, leaf inputs with requires_grad=True (an evaluation loop over
    parameters) still take the FlexAttention path and match the own path."""
    q, k, v = (t.requires_grad_(True) for t in rand_qkv(1, 2, 64, 64, 8, dtype=torch.float32, seed=5))
    lay = torch.tensor([[[[0, -1], [0, 1]]]])
    kw = dict(block_q=32, block_k=32, scale=0.5, need_lse=False)
    own, flex = _both(lambda: block_sparse_attention(q, k, v, lay, **kw)[0])
    assert flex_calls
    assert not flex.requires_grad
    torch.testing.assert_close(flex, own, **TOL)


def test_block_tables_are_cached_and_reject_duplicates():
    lay = torch.tensor([[[[2, -1, 0], [1, 2, -1]]]])
    t1 = _flex.block_tables(lay, 4)
    assert t1 is _flex.block_tables(lay.clone(), 4)
    num, idx, fnum, fidx, member = t1
    assert member[0, 0].tolist() == [[True, False, True, False], [False, True, True, False]]
    assert fnum is None and fidx is None
    assert num.tolist() == [[[2, 2]]]
    assert idx[0, 0].tolist() == [[0, 2, 0, 0], [1, 2, 0, 0]]
    assert _flex.block_tables(torch.tensor([[[[1, 1]]]]), 4) is None


def test_full_slots_skip_the_mask_only_where_every_pair_is_allowed():
    lay = torch.tensor([[[[0, 1], [1, -1]]]])
    full = torch.tensor([[[[True, False], [True, True]]]])
    num, idx, fnum, fidx, _ = _flex.block_tables(lay, 2, full)
    assert num.tolist() == [[[1, 0]]] and fnum.tolist() == [[[1, 1]]]
    assert idx[0, 0, 0, 0] == 1 and fidx[0, 0, :, 0].tolist() == [0, 1]


def test_flex_mode_env_and_errors(monkeypatch):
    monkeypatch.setenv(_flex.ENV, "0")
    assert _flex.mode() == "off"
    monkeypatch.setenv(_flex.ENV, "1")
    assert _flex.mode() == "on"
    with flex_mode("auto"):
        assert _flex.mode() == "auto"
    with pytest.raises(ValueError, match="flex mode"):
        with flex_mode("sometimes"):
            pass


@pytest.mark.parametrize("method,options,shared,causal,padded", [
    ("longformer", dict(window=5, block_size=8, dilation=2), True, True, True),
    ("longformer", dict(window=17, block_size=8), False, False, True),  # full blocks + padding
    ("bigbird", dict(block_size=8, n_random_blocks=1), True, True, True),
    ("window2d", dict(grid=(6, 8), window=4, shift=2), False, False, True),
])
def test_methods_flex_equals_own_path(flex_calls, method, options, shared, causal, padded):
    q, k, v = rand_qkv(2, 2, 48, 48, 16, dtype=torch.float32, seed=5)
    pad = random_padding(2, 48, seed=6) if padded else None
    own, flex = _both(lambda: effattn.attention(q, None if shared else k, v, method, causal=causal,
                                                padding_mask=pad, **options))
    assert flex_calls
    torch.testing.assert_close(flex, own, **TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_single_layout_for_flex_equals_row_pieces(causal):
    """With the dispatch on, BigBird runs its whole pattern as one layout (global rows list
    every block); the own path keeps the dense global rows: same result."""
    q, k, v = rand_qkv(1, 2, 64, 64, 16, dtype=torch.float32, seed=8)
    own, flex = _both(lambda: effattn.attention(q, k, v, "bigbird", causal=causal, block_size=8,
                                                n_random_blocks=2))
    torch.testing.assert_close(flex, own, **TOL)


def test_recompile_limit_falls_back_to_own_path_not_to_eager_flex(monkeypatch):
    """Past dynamo's recompile limit torch would run FlexAttention eagerly (N x N scores);
    the dispatch falls back to the engine's own tiles instead, with the same result, and
    stops dispatching in the process."""
    import torch._dynamo

    monkeypatch.setattr(_flex, "_exhausted", False)
    monkeypatch.setattr(_flex, "_compiled", None)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(3)
    with torch._dynamo.config.patch(recompile_limit=1):
        for n in (64, 96):  # the second shape needs a second compile: over the limit
            q, k, v = rand_qkv(1, 2, n, n, 16, dtype=torch.float32, seed=n)
            layout = _layout(n // 16, n // 16, 2, g, B=1, H=2)
            own, flex = _both(lambda: block_sparse_attention(q, k, v, layout, block_q=16, block_k=16,
                                                                  scale=0.25, need_lse=False)[0])
            torch.testing.assert_close(flex, own, **TOL)
    assert _flex.exhausted()
    torch._dynamo.reset()


def test_block_tables_of_the_same_layout_object_skip_the_digest(monkeypatch):
    """A layout object seen before (memoized by its method) is answered without hashing its
    content again; an in-place change to it is noticed (tensor version)."""
    digests = []
    orig = _flex.content_digest
    monkeypatch.setattr(_flex, "content_digest", lambda t: digests.append(1) or orig(t))
    lay = torch.tensor([[[[3, -1, 0], [1, 2, -1]]]])
    t1 = _flex.block_tables(lay, 4)
    n = len(digests)
    assert n >= 1
    assert _flex.block_tables(lay, 4) is t1 and len(digests) == n
    lay[0, 0, 0, 0] = 2  # in place: the identity entry is stale
    t2 = _flex.block_tables(lay, 4)
    assert len(digests) > n
    assert t2[4][0, 0, 0].tolist() == [True, False, True, False]


def test_bigbird_repeated_calls_reuse_their_layout(monkeypatch, flex_calls):
    """BigBird memoizes its layout, so a repeated call reaches FlexAttention without
    rebuilding the pattern or hashing the layout."""
    import torch._dynamo

    torch._dynamo.reset()  # earlier tests' compiles may have used up dynamo's recompile limit
    monkeypatch.setattr(_flex, "_exhausted", False)
    q, k, v = rand_qkv(1, 2, 64, 64, 16, dtype=torch.float32, seed=9)
    with flex_mode("on"), torch.no_grad():
        first = effattn.attention(q, k, v, "bigbird", block_size=8, n_random_blocks=2, seed=11)
        digests = []
        monkeypatch.setattr(_flex, "content_digest", lambda t: digests.append(1))
        again = effattn.attention(q, k, v, "bigbird", block_size=8, n_random_blocks=2, seed=11)
    assert len(flex_calls) == 2 and not digests
    torch.testing.assert_close(again, first, atol=0, rtol=0)


@pytest.mark.parametrize("causal,dilation", [(False, 1), (True, 1), (False, 3), (True, 2)])
def test_longformer_rules_imply_its_layout(causal, dilation):
    """Longformer tells the engine its layout is exact (FlexAttention's mask then skips the
    listing check): every pair its rules allow must lie in a listed block pair."""
    from effattn.mechanisms import window
    from effattn.masks import allowed_pairs

    N, w, bs = 70, 5, 8
    dil = window._dilations(dilation, 2, "cpu")
    layout = window.longformer_layout(N, w, dil, bs, causal)
    rule = window._band_rule(w * dilation, dilation)
    i = torch.arange(N)[:, None]
    j = torch.arange(N)[None, :]
    allowed = allowed_pairs(i, j, causal=causal, k_valid=None, pair_mask=rule)
    nb = -(-N // bs)
    listed = torch.zeros(nb, nb + 1, dtype=torch.bool)
    listed.scatter_(1, torch.where(layout[0, 0] >= 0, layout[0, 0], nb), True)
    in_listed = listed[:, :nb][i // bs, j // bs]
    assert bool(allowed.any()) and not bool((allowed & ~in_listed).any())


def test_longformer_equal_per_head_dilations_read_as_one():
    """A per-head dilation list with one value for every head is the int (the closed-form,
    FlexAttention-eligible rule), with the same result."""
    q, k, v = rand_qkv(1, 2, 40, 40, 8, dtype=torch.float32, seed=4)
    a = effattn.attention(q, k, v, "longformer", window=3, dilation=[2, 2], block_size=8)
    b = effattn.attention(q, k, v, "longformer", window=3, dilation=2, block_size=8)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("slow", ["flex", "own"])
def test_auto_on_cpu_races_once_and_keeps_the_faster_backend(monkeypatch, slow):
    """'auto' on CPU: the first call of a pattern and shape times compiled FlexAttention
    against the own path (a block of calls each, the own block after an untimed own call)
    and remembers the faster; later calls go straight to it (no further FlexAttention call
    when the own path won); results equal."""
    import time as _time

    import torch._dynamo

    import effattn.mechanisms.blocksparse as bs

    torch._dynamo.reset()  # earlier tests' compiles may have used up dynamo's recompile limit
    monkeypatch.setattr(_flex, "_exhausted", False)
    monkeypatch.setattr(_flex, "MIN_SCORES", 0)
    monkeypatch.setattr(_flex, "_races", type(_flex._races)())
    calls = []
    orig_flex, orig_own = _flex.forward, bs._forward

    def flex_forward(*a, **kw):
        calls.append("flex")
        if slow == "flex":
            _time.sleep(0.05)
        return orig_flex(*a, **kw)

    def own_forward(*a, **kw):
        calls.append("own")
        if slow == "own":
            _time.sleep(0.05)
        return orig_own(*a, **kw)

    monkeypatch.setattr(_flex, "forward", flex_forward)
    monkeypatch.setattr(bs, "_forward", own_forward)
    q, k, v = rand_qkv(1, 2, 40, 40, 16, dtype=torch.float32, seed=11)
    layout = torch.tensor([[[[0, 1], [0, 1], [1, 2], [2, 4], [3, 4]]]])

    def run():
        with torch.no_grad():
            return block_sparse_attention(q, k, v, layout, block_q=8, block_k=8, scale=0.25,
                                          need_lse=False)[0]

    with flex_mode("auto"):
        first = run()
        # compile call, RACE_ROUNDS timed FlexAttention calls, own warm-up, RACE_ROUNDS own
        assert calls == ["flex"] * (1 + _flex.RACE_ROUNDS) + ["own"] * (1 + _flex.RACE_ROUNDS)
        calls.clear()
        second = run()
    assert calls == (["own"] if slow == "flex" else ["flex"])
    torch.testing.assert_close(first, second, **TOL)
    with flex_mode("off"):
        torch.testing.assert_close(run(), first, **TOL)


@pytest.mark.parametrize("slow", ["one_layout", "row_pieces"])
def test_bigbird_auto_on_cpu_races_its_flex_layout_against_its_row_pieces(monkeypatch, slow):
    """BigBird under 'auto' on CPU: the one layout on FlexAttention is raced once against the
    own path's row pieces (a block of calls each, the pieces' after an untimed call);
    later calls take the winner alone; the results agree."""
    import time as _time

    import torch._dynamo

    import effattn.mechanisms.bigbird as bb

    torch._dynamo.reset()
    monkeypatch.setattr(_flex, "_exhausted", False)
    monkeypatch.setattr(_flex, "MIN_SCORES", 0)
    monkeypatch.setattr(_flex, "_races", type(_flex._races)())
    calls = []
    for name in ("_one_layout", "_row_pieces"):
        def wrapped(*a, _orig=getattr(bb, name), _name=name, **kw):
            calls.append(_name)
            if _name.strip("_") == slow:
                _time.sleep(0.05)
            return _orig(*a, **kw)
        monkeypatch.setattr(bb, name, wrapped)
    q, k, v = rand_qkv(1, 2, 64, 64, 16, dtype=torch.float32, seed=12)

    def run():
        with torch.no_grad():
            return effattn.attention(q, k, v, "bigbird", block_size=8, n_random_blocks=1)

    with flex_mode("auto"):
        first = run()
        assert calls == (["_one_layout"] * (1 + _flex.RACE_ROUNDS)
                         + ["_row_pieces"] * (1 + _flex.RACE_ROUNDS))
        calls.clear()
        second = run()
    assert calls == (["_row_pieces"] if slow == "one_layout" else ["_one_layout"])
    torch.testing.assert_close(first, second, **TOL)
