"""The short-side softmax products behind Nyströmformer (mechanisms/_landmarks.py): with
their hand-written backward they equal autograd through the dense formula — outputs and
every input's gradient, in many query chunks, with masked keys and rows that have no key
at all (zeros, never NaN) — pass gradcheck, and calls without gradients (SDPA) agree."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

import effattn.mechanisms._landmarks as lm
from effattn.mechanisms._landmarks import landmarks_over_keys, queries_over_landmarks


def dense_reference(q, k, v, key_valid, scale):
    """softmax over valid keys, rows without one -> 0 (autograd through torch ops)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_valid is not None:
        s = s.masked_fill(~key_valid, float("-inf"))
    p = torch.softmax(s, -1)
    return torch.matmul(p.nan_to_num(0.0), v)


def inputs(seed, B, H, Nq, Nk, D, Dv, masked, empty_row, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Nq, D, generator=g, dtype=dtype) * 2).requires_grad_()
    k = torch.randn(B, H, Nk, D, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(B, H, Nk, Dv, generator=g, dtype=dtype).requires_grad_()
    kv = None
    if masked:
        kv = torch.rand(B, 1, 1, Nk, generator=g) < 0.7
        kv[:, :, :, 0] = True
        if empty_row:
            kv[-1] = False  # the last batch row has no key at all
    return q, k, v, kv


def grads(fn, q, k, v, kv, scale, seed):
    out = fn(q, k, v, kv, scale)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=out.dtype)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), go)
    return out, gq, gk, gv


@settings(deadline=None, max_examples=30)
@given(B=st.integers(1, 2), H=st.integers(1, 3), Nq=st.integers(1, 40), L=st.integers(1, 9),
       D=st.integers(1, 6), Dv=st.integers(1, 5), masked=st.booleans(), empty=st.booleans(),
       chunk=st.sampled_from([1, 7, 64, 1 << 20]), seed=st.integers(0, 9999))
def test_queries_over_landmarks_equal_autograd(B, H, Nq, L, D, Dv, masked, empty, chunk, seed):
    q, k, v, kv = inputs(seed, B, H, Nq, L, D, Dv, masked, empty)
    saved = lm.CHUNK_SCORES
    lm.CHUNK_SCORES = chunk  # 1 score per chunk: one query row each
    try:
        ours = grads(queries_over_landmarks, q, k, v, kv, 0.7, seed)
    finally:
        lm.CHUNK_SCORES = saved
    ref = grads(dense_reference, q, k, v, kv, 0.7, seed)
    for a, b in zip(ours, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if masked and empty:
        assert (ours[0][-1] == 0).all()


@settings(deadline=None, max_examples=30)
@given(B=st.integers(1, 2), H=st.integers(1, 3), L=st.integers(1, 9), Nk=st.integers(1, 40),
       D=st.integers(1, 6), Dv=st.integers(1, 5), masked=st.booleans(), empty=st.booleans(),
       seed=st.integers(0, 9999))
def test_landmarks_over_keys_equal_autograd(B, H, L, Nk, D, Dv, masked, empty, seed):
    q, k, v, kv = inputs(seed, B, H, L, Nk, D, Dv, masked, empty)
    ours = grads(landmarks_over_keys, q, k, v, kv, 0.7, seed)
    ref = grads(dense_reference, q, k, v, kv, 0.7, seed)
    for a, b in zip(ours, ref):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fn", [queries_over_landmarks, landmarks_over_keys])
def test_gradcheck_and_no_grad_path_agree(fn, monkeypatch):
    monkeypatch.setattr(lm, "CHUNK_SCORES", 8)
    q, k, v, kv = inputs(3, 2, 2, 6, 5, 3, 2, masked=True, empty_row=True)
    assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c, kv, 0.5), (q, k, v))
    with torch.no_grad():  # SDPA's path: same values, rows without a key zero
        torch.testing.assert_close(fn(q, k, v, kv, 0.5), fn(q, k, v, kv, 0.5).detach())
        torch.testing.assert_close(fn(q, k, v, kv, 0.5), dense_reference(q, k, v, kv, 0.5))
    qf, kf, vf = (x.detach().float() for x in (q, k, v))
    with torch.no_grad():
        sdpa = fn(qf, kf, vf, kv, 0.5)
    torch.testing.assert_close(sdpa, fn(qf.requires_grad_(), kf, vf, kv, 0.5).detach(),
                               rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    q = torch.randn(1, 1, 4, 3)
    with pytest.raises(ValueError, match="bool"):
        queries_over_landmarks(q, q, q, torch.ones(1, 1, 1, 4), 1.0)
    with pytest.raises(ValueError, match="do not match"):
        landmarks_over_keys(q, q, torch.randn(1, 1, 5, 3), None, 1.0)
    with pytest.raises(ValueError, match="4-D|\\[B, H, N, D\\]"):
        queries_over_landmarks(q[0], q, q, None, 1.0)


@pytest.mark.parametrize("split", ["q", "k"])
def test_split_sequence_input_same_values_and_gradients(split):
    """The long input as a [B, H, S, N/S, D] segment view (what Nyströmformer's landmark
    means read) gives the flat input's output, and its gradient — plus another use of the
    same view, as autograd adds them — equals the flat computation's."""
    fn = queries_over_landmarks if split == "q" else landmarks_over_keys
    Nq, Nk = (12, 5) if split == "q" else (5, 12)
    q, k, v, kv = inputs(5, 2, 3, Nq, Nk, 4, 3, masked=True, empty_row=False)
    go = torch.randn(2, 3, Nq, 3, dtype=torch.float64)
    long = q if split == "q" else k

    def run(view):
        x = long.unflatten(2, (4, 3)) if view else long
        args = (x, k, v) if split == "q" else (q, x, v)
        out = fn(*args, kv, 0.8)
        extra = (x.sum(-2) if view else x.unflatten(2, (4, 3)).sum(-2)).pow(2).sum()
        return (out, *torch.autograd.grad((out * go).sum() + extra, (q, k, v)))

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
