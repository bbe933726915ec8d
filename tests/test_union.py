"""Union attention (:mod:`effattn.mechanisms._union`): one autograd node over several
engine parts, whose backward runs each part's engine backward with the union's own
``out``/``lse``, must equal autograd through the stacked merge of the parts alone —
outputs, lse and gradients (lse in the loss too), padding slots, reordered tokens and
gathered key subsets included."""

import torch
from hypothesis import given, settings, strategies as st

from effattn.mechanisms._layout import band_layout, merge_parts
from effattn.mechanisms._union import EnginePart, permuted_part, union_attention
from effattn.mechanisms.blocksparse import BACKEND_CALLS
from tests.helpers import finite_lse, rand_qkv, random_padding


def _parts(N, block, causal, pm, perm_seed, n_keys):
    kv = None if pm is None else pm[:, None]
    band = EnginePart(band_layout(N, block, block, block, 0 if causal else block, "cpu")[None, None],
                      dict(block_q=block, block_k=block, scale=0.5, causal=causal, k_valid=kv))
    # a random reordering with padding slots (positions >= N), as residue classes have
    g = torch.Generator().manual_seed(perm_seed)
    L = -(-(N + 3) // block) * block
    pos = torch.cat([torch.randperm(N, generator=g), N + torch.arange(L - N)])
    pos = pos[torch.randperm(L, generator=g)]
    nb = L // block
    layout = torch.arange(nb).view(1, 1, nb, 1).flip(2)  # each slot block sees another one
    perm = permuted_part(N, pos, layout, block, padding_mask=pm, scale=0.5, causal=causal,
                         exclude_self=False)
    keys = torch.randperm(N, generator=g)[:n_keys].sort().values
    kv_sub = None if pm is None else pm[:, keys][:, None]
    subset = EnginePart(None, dict(block_q=block, block_k=min(block, n_keys), scale=0.5,
                                   causal=causal, k_pos=keys[None, None], k_valid=kv_sub), keys=keys)
    return [band, perm, subset]


def _assert_same_with_grads(out, lse, ref, ref_lse, inputs, seed):
    """Outputs and lse equal, and so are the gradients of a random loss on both."""
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-10)
    g = torch.Generator().manual_seed(seed + 1)
    go, gl = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    ga = torch.autograd.grad((out * go).sum() + (finite_lse(lse) * gl).sum(), inputs)
    gb = torch.autograd.grad((ref * go).sum() + (finite_lse(ref_lse) * gl).sum(), inputs)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


@settings(deadline=None, max_examples=40)
@given(N=st.integers(2, 40), block=st.sampled_from([1, 2, 4, 8]), causal=st.booleans(),
       pad=st.booleans(), n_keys=st.integers(1, 6), seed=st.integers(0, 99))
def test_union_equals_autograd_through_the_merge_of_its_parts(N, block, causal, pad, n_keys, seed):
    q, k, v = rand_qkv(2, 2, N, D=4, Dv=3, seed=seed, grad=True)
    pm = random_padding(2, N, seed=seed) if pad else None
    parts = _parts(N, block, causal, pm, seed, min(n_keys, N))
    before = BACKEND_CALLS["engine"]
    out, lse = union_attention(q, k, v, parts)
    assert BACKEND_CALLS["engine"] == before + 1  # reported as the engine's work
    ref, ref_lse = merge_parts(*[p.attend(q, k, v) for p in parts])
    _assert_same_with_grads(out, lse, ref, ref_lse, (q, k, v), seed)


def test_union_gradcheck():
    q, k, v = rand_qkv(1, 2, 9, D=3, seed=3, grad=True)
    parts = _parts(9, 2, True, random_padding(1, 9, seed=3), 3, 3)

    def f(q, k, v):
        o, l = union_attention(q, k, v, parts)
        return o, finite_lse(l)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_union_only_lse_used_and_bf16_inputs():
    """A loss on lse alone (no output gradient) and bf16 inputs (gradients come back in
    bf16, statistics in float32)."""
    q, k, v = rand_qkv(1, 1, 12, D=4, seed=2, grad=True)
    parts = _parts(12, 4, False, None, 2, 3)
    _, lse = union_attention(q, k, v, parts)
    _, ref = merge_parts(*[p.attend(q, k, v) for p in parts])
    ga = torch.autograd.grad(lse.sum(), (q, k, v))
    gb = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    qb, kb, vb = (t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v))
    out, lse = union_attention(qb, kb, vb, parts)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    out.float().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 and torch.isfinite(t.grad).all() for t in (qb, kb, vb))


def _embed(o, l, a, N):
    """A part's rows ``a:a+r`` placed in full-length (out, lse): zeros / -inf elsewhere."""
    B, H, r = l.shape
    zo = o.new_zeros(B, H, N, o.shape[-1])
    zl = l.new_full((B, H, N), float("-inf"))
    return (torch.cat([zo[:, :, :a], o, zo[:, :, a + r:]], 2),
            torch.cat([zl[:, :, :a], l, zl[:, :, a + r:]], 2))


@settings(deadline=None, max_examples=40)
@given(N=st.integers(2, 40), block=st.sampled_from([1, 2, 4]), causal=st.booleans(), pad=st.booleans(),
       cuts=st.lists(st.integers(0, 40), min_size=6, max_size=6), seed=st.integers(0, 99))
def test_union_of_query_row_pieces(N, block, causal, pad, cuts, seed):
    """Parts on query-row ranges and key prefixes (``q_rows``, ``k_stop``, as BigBird's
    global and other rows): rows covered once are copied, rows covered twice merged, rows
    no part covers give 0 and -inf; outputs, lse and gradients equal autograd through
    each part alone placed in its rows and merged."""
    q, k, v = rand_qkv(2, 2, N, D=4, Dv=3, seed=seed, grad=True)
    pm = random_padding(2, N, seed=seed) if pad else None
    c = [x % (N + 1) for x in cuts]
    (a1, b1), (a2, b2), (a3, b3) = (sorted(c[i:i + 2]) for i in (0, 2, 4))
    a2 = a2 // block * block  # the layout part's rows start on a block
    b2 = max(b2, a2 + 1) if a2 < N else N
    parts = []
    opts = dict(block_q=block, block_k=block, scale=0.5, causal=causal)
    for a, b, ks in ((a1, b1, max(1, c[5])), (a3, b3, N)):  # dense, over a key prefix
        if b > a:
            kv = None if pm is None else pm[:, None, :ks]
            parts.append(EnginePart(None, dict(opts, q_pos=torch.arange(a, b)[None, None], k_valid=kv),
                                    q_rows=(a, b), k_stop=ks))
    if b2 > a2:  # a block layout: each query block sees key blocks 0 and its own index
        nqb, nkb = -(-(b2 - a2) // block), -(-N // block)
        own = (a2 // block + torch.arange(nqb)).clamp(max=nkb - 1)
        layout = torch.stack([torch.zeros(nqb, dtype=torch.long), own], -1)
        layout[:, 1][own == 0] = -1  # block 0 listed once
        kv = None if pm is None else pm[:, None]
        parts.append(EnginePart(layout[None, None], dict(opts, q_pos=torch.arange(a2, b2)[None, None],
                                                         k_valid=kv), q_rows=(a2, b2)))
    if not parts:
        return
    out, lse = union_attention(q, k, v, parts)
    ref, ref_lse = merge_parts(*[_embed(*p.attend(q, k, v), p.q_rows[0], N) for p in parts])
    _assert_same_with_grads(out, lse, ref, ref_lse, (q, k, v), seed)
