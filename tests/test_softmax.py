"""Softmax statistics shared by every mechanism: the partial-result merge."""

import torch
from hypothesis import given, strategies as st

from effattn.softmax import (exp_, merge_pair_, merge_partials, output_delta, softmax_lse_,
                             softmax_weights_)


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


@given(shape=st.tuples(st.integers(1, 5), st.integers(1, 4)), seed=st.integers(0, 1000),
       empty=st.floats(0, 1))
def test_merge_pair_in_place_equals_merge_partials(shape, seed, empty):
    """The in-place two-part merge gives merge_partials' result, empty parts included
    (rows empty in both stay 0 / -inf, no NaN)."""
    g = torch.Generator().manual_seed(seed)
    outs = torch.randn(2, *shape, 3, generator=g, dtype=torch.float64)
    lses = torch.randn(2, *shape, generator=g, dtype=torch.float64) * 20
    gone = torch.rand(2, *shape, generator=g) < empty
    lses[gone] = float("-inf")
    outs[gone] = 0.0
    ref_o, ref_l = merge_partials(outs, lses)
    a_o, a_l = outs[0].clone(), lses[0].clone()
    got_o, got_l = merge_pair_(a_o, a_l, outs[1], lses[1])
    assert got_o is a_o and got_l is a_l
    torch.testing.assert_close(got_o, ref_o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(got_l, ref_l, atol=1e-12, rtol=1e-12)


@given(rows=st.integers(1, 6), cols=st.integers(1, 7), seed=st.integers(0, 1000),
       masked=st.floats(0, 1), big=st.sampled_from([1.0, 1e4]))
def test_in_place_softmax_equals_torch_softmax_and_logsumexp(rows, cols, seed, masked, big):
    """softmax_lse_ (the tiles' softmax) is torch.softmax and torch.logsumexp on every
    row, including large scores and rows with some or all keys masked (-inf): a fully
    masked row gives probabilities 0 and lse -inf, never NaN."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, cols, generator=g, dtype=torch.float64) * big
    s[torch.rand(rows, cols, generator=g) < masked] = float("-inf")
    probs, lse = softmax_lse_(s.clone())
    ref_l = torch.logsumexp(s, -1)
    ref_p = torch.softmax(s, -1).nan_to_num(nan=0.0)  # torch: NaN on fully masked rows
    torch.testing.assert_close(probs, ref_p, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, ref_l, atol=1e-9, rtol=1e-12)
    assert not probs.isnan().any() and not lse.isnan().any()


@given(rows=st.integers(1, 5), cols=st.integers(1, 9), seed=st.integers(0, 1000),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fast_exp_matches_exp_in_place_with_a_broadcast_shift(rows, cols, seed, dtype):
    """exp_ (exp2 with a scaled argument for float32) is exp to within 1e-6 relative on
    softmax's argument range, maps -inf to 0, writes in place and differentiates as exp."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(rows, cols, generator=g, dtype=torch.float64) * 12 - 10).to(dtype)
    x[0, 0] = float("-inf")
    shift = torch.rand(rows, 1, generator=g, dtype=torch.float64).to(dtype)
    ref = torch.exp((x - shift).double())  # the subtraction rounds alike in both
    y = x.clone()
    out = exp_(y, shift)
    assert out.data_ptr() == y.data_ptr() and out.dtype == dtype
    assert out[0, 0] == 0
    rel = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(out.double(), ref, rtol=rel, atol=0)
    xg = x.detach().clone().requires_grad_(True)
    exp_(xg * 1.0, shift).sum().backward()
    torch.testing.assert_close(xg.grad.double(), ref, rtol=2 * rel, atol=0)


def test_exp_gradients_fused_and_through_a_shift_that_requires_grad():
    """exp_'s one-pass backward (grad * result) passes gradcheck; a shift that requires grad
    is differentiated too (through the composed operations)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    shift = torch.randn(3, 1, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: exp_(a * 1.0, shift), (x,))
    s = shift.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: exp_(a * 1.0, b), (x, s))
    y = exp_(x.detach().float() * 1.0)  # no grad: plain in-place values
    assert not y.requires_grad


@given(rows=st.integers(1, 5), cols=st.integers(1, 9), seed=st.integers(0, 1000),
       offset=st.sampled_from([0.0, -1e5, 3e4]), masked=st.floats(0, 1))
def test_unnormalized_weights_times_inverse_sums_are_the_softmax_in_float32(
        rows, cols, seed, offset, masked):
    """softmax_weights_: weights * inv is the softmax and lse the logsumexp in float32,
    also around large scores (a shared-QK self pair sits near -1e5: the row maximum must
    weigh exactly 1, not the 1.003 of forming the exponent as x log2 e - m log2 e); fully
    masked rows give weights 0, inv 1 and lse -inf."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(rows, cols, generator=g, dtype=torch.float64) * 3 + offset).float()
    s[torch.rand(rows, cols, generator=g) < masked] = float("-inf")
    w, lse, inv = softmax_weights_(s.clone())
    ref = torch.softmax(s.double(), -1).nan_to_num(nan=0.0)
    torch.testing.assert_close((w * inv).double(), ref, atol=2e-6, rtol=2e-6)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s.double(), -1), atol=1e-2, rtol=1e-6)
    assert w.amax(-1)[~torch.isneginf(lse)].eq(1).all()  # the maximum weighs exactly 1
    assert inv.shape == (rows, 1) and (inv[torch.isneginf(lse)] == 1).all()


@given(rows=st.integers(1, 5), cols=st.integers(1, 9), split=st.integers(1, 8),
       seed=st.integers(0, 1000), masked=st.floats(0, 1))
def test_base2_scores_give_the_natural_softmax_and_lse(rows, cols, split, seed, masked):
    """Scores in base-2 units (log2 e times the scores: the engine's queries carry the
    factor) give the same weights, natural lse and online-softmax result as natural
    scores, fully masked rows included."""
    from effattn.softmax import LOG2_E, online_finish, online_init, online_update

    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, cols, generator=g, dtype=torch.float64) * 4
    s[torch.rand(rows, cols, generator=g) < masked] = float("-inf")
    v = torch.randn(cols, 3, generator=g, dtype=torch.float64)
    w, lse, inv = softmax_weights_(s.clone())
    w2, lse2, inv2 = softmax_weights_(s * LOG2_E, base2=True)
    torch.testing.assert_close(w2 * inv2, w * inv, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse2, lse, atol=1e-12, rtol=1e-12)
    for base2 in (False, True):
        state = online_init((rows,), 3, torch.float64, "cpu")
        x = s * LOG2_E if base2 else s.clone()
        for c in range(0, cols, split):
            state = online_update(*state, x[:, c:c + split].clone(), v[c:c + split], base2=base2)
        out, l = online_finish(*state, base2=base2)
        torch.testing.assert_close(out, (w * inv) @ v, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(l, lse, atol=1e-12, rtol=1e-12)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(2, 40), st.integers(0, 20),
       st.integers(1, 20), st.booleans(), st.integers(0, 2**31 - 1))
def test_output_delta_on_rows_of_a_larger_tensor(B, H, N, a, n, with_dlse, seed):
    """D = rowsum(dO * O) - dlse, on any row range of larger tensors (a union part's rows:
    leading dimensions that do not flatten) as on contiguous copies, in float64 exactly as
    the elementwise sum."""
    g = torch.Generator().manual_seed(seed)
    a = min(a, N - 1)
    b = min(N, a + n)
    dout, out = (torch.randn(B, H, N, 8, generator=g, dtype=torch.float64) for _ in range(2))
    dlse = torch.randn(B, H, N, generator=g, dtype=torch.float64) if with_dlse else None
    rows = slice(a, b)
    got = output_delta(dout[:, :, rows], out[:, :, rows], None if dlse is None else dlse[:, :, rows])
    want = (dout[:, :, rows] * out[:, :, rows]).sum(-1)
    if dlse is not None:
        want = want - dlse[:, :, rows]
    assert got.shape == (B, H, b - a)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(output_delta(dout[:, :, rows].contiguous(), out[:, :, rows].contiguous(),
                                            None if dlse is None else dlse[:, :, rows]), got,
                               rtol=1e-12, atol=1e-12)
