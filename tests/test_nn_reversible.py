"""Reversible layers: exact gradients (dropout replayed) and activation memory flat in depth."""

import pytest
import torch

from effattn.nn import CausalLM, ReversibleBlock, ReversibleSequence, TransformerStack
from effattn.nn.block import AttentionBranch, FeedForwardBranch


def _rev_pair(depth, dim=8, heads=2, dropout=0.2, causal=False, method="naive"):
    def blocks():
        return [ReversibleBlock(AttentionBranch(dim, heads, method, dropout=dropout, causal=causal),
                                FeedForwardBranch(dim, mult=2, dropout=dropout)) for _ in range(depth)]

    rev = ReversibleSequence(blocks(), reversible=True).double()
    ref = ReversibleSequence(blocks(), reversible=False).double()
    ref.load_state_dict(rev.state_dict())
    return rev, ref


def _grads(model, x, pm, seed):
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x, padding_mask=pm)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("causal", [False, True])
def test_reversible_gradients_equal_standard_autograd(causal):
    rev, ref = _rev_pair(3, causal=causal)
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    pm = torch.ones(2, 7, dtype=torch.bool)
    pm[0, 5:] = False
    out_r, gx_r, gp_r = _grads(rev, x, pm, seed=3)
    out_s, gx_s, gp_s = _grads(ref, x, pm, seed=3)
    torch.testing.assert_close(out_r, out_s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx_r, gx_s, rtol=1e-9, atol=1e-10)
    assert len(gp_r) == len(gp_s) > 0
    for a, b in zip(gp_r, gp_s):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # dropout really is active (a different seed gives a different output)
    torch.manual_seed(4)
    assert not torch.allclose(rev(x, padding_mask=pm), out_r)


def test_reversible_input_without_grad_still_trains_parameters():
    rev, _ = _rev_pair(2, dropout=0.0)
    rev(torch.randn(1, 5, 8, dtype=torch.float64)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in rev.parameters()
               if p.dim() > 1)


def _saved_activation_bytes(model, x):
    """Bytes of tensors autograd saves for backward during one forward, parameters excluded."""
    params = {p.data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return total


def test_reversible_activation_memory_does_not_grow_with_depth():
    x = torch.randn(2, 16, 16, requires_grad=True)
    mem = {}
    for reversible in (False, True):
        for depth in (2, 12):
            torch.manual_seed(0)
            stack = TransformerStack(16, depth, 2, "full", reversible=reversible, dropout=0.1)
            mem[reversible, depth] = _saved_activation_bytes(stack, x)
    assert mem[True, 12] == mem[True, 2]
    assert mem[False, 12] > 4 * mem[False, 2]
    assert mem[True, 12] < mem[False, 2]


def test_reversible_causal_lm_gradients_equal_its_non_reversible_twin():
    torch.manual_seed(0)
    rev = CausalLM(11, dim=8, depth=2, heads=2, max_len=9, reversible=True, dropout=0.1).double()
    twin = CausalLM(11, dim=8, depth=2, heads=2, max_len=9, reversible=True, dropout=0.1).double()
    twin.load_state_dict(rev.state_dict())
    twin.decoder.layers.reversible = False  # same function, ordinary autograd
    tok = torch.randint(0, 11, (2, 9))
    for m in (rev, twin):
        torch.manual_seed(1)
        m.loss(tok).backward()
    for a, b in zip(rev.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-11)
