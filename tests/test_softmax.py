"""Softmax statistics shared by every mechanism: the partial-result merge."""

import torch
from hypothesis import given, strategies as st

from effattn.softmax import merge_partials


@given(parts=st.integers(1, 4), n=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_merge_equals_softmax_over_the_union_of_key_sets(parts, n, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, parts * 3, generator=g, dtype=torch.float64)
    v = torch.randn(parts * 3, 2, generator=g, dtype=torch.float64)
    outs, lses = [], []
    for p in range(parts):
        sp = s[:, 3 * p:3 * p + 3]
        outs.append(torch.softmax(sp, -1) @ v[3 * p:3 * p + 3])
        lses.append(torch.logsumexp(sp, -1))
    out, lse = merge_partials(torch.stack(outs), torch.stack(lses))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


def test_rows_empty_in_every_part_merge_to_zero_with_finite_gradients():
    outs = torch.randn(3, 4, 2, dtype=torch.float64)
    lses = torch.randn(3, 4, dtype=torch.float64)
    outs[:, 1] = 0.0
    lses[:, 1] = float("-inf")      # row 1: no key in any part
    lses[1, 2] = float("-inf")      # row 2: empty in one part only
    outs.requires_grad_(True)
    lses.requires_grad_(True)
    out, lse = merge_partials(outs, lses)
    assert torch.equal(out[1], torch.zeros(2, dtype=torch.float64))
    assert torch.isneginf(lse[1]) and torch.isfinite(lse[[0, 2, 3]]).all()
    (out.sum() + lse[[0, 2, 3]].sum()).backward()
    assert torch.isfinite(outs.grad).all() and torch.isfinite(lses.grad).all()
    assert torch.equal(lses.grad[:, 1], torch.zeros(3, dtype=torch.float64))
    assert lses.grad[1, 2] == 0
