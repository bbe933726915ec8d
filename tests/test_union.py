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
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-10)
    g = torch.Generator().manual_seed(seed + 1)
    go, gl = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(lse.shape, generator=g, dtype=lse.dtype)
    ga = torch.autograd.grad((out * go).sum() + (finite_lse(lse) * gl).sum(), (q, k, v))
    gb = torch.autograd.grad((ref * go).sum() + (finite_lse(ref_lse) * gl).sum(), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


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
