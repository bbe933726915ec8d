"""The low-precision matmul policy: bf16 / fp16 inputs compute in float32 where their
matmuls do not pay (effattn.precision), with the dtype contract kept."""

import pytest
import torch

import effattn
from effattn import precision
from effattn.precision import low_precision_matmul, low_precision_pays, set_low_precision_matmul
from tests.helpers import rand_qkv


@pytest.mark.parametrize("method", ["full", "longformer", "lsh", "performer"])
def test_off_computes_low_precision_inputs_in_float32_and_keeps_the_dtype_contract(method):
    """With the policy off, bf16 inputs give exactly the float32 computation on the same
    values cast to bf16, lse float32, and bf16 gradients equal to the float32 ones cast."""
    q, k, v = rand_qkv(1, 2, 96, 96, 16, seed=2)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (qb, kb, vb))
    opts = {"window": 16} if method == "longformer" else {}
    lse_too = method != "performer"  # no softmax log-sum-exp
    with low_precision_matmul("off"):
        res = effattn.attention(qb, kb, vb, method, return_lse=lse_too, **opts)
    ref = effattn.attention(qf, kf, vf, method, return_lse=lse_too, **opts)
    if lse_too:
        (out, lse), (ref, ref_lse) = res, ref
        assert lse.dtype == torch.float32 and torch.equal(lse, ref_lse)
    else:
        out = res
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.bfloat16())
    go = torch.randn(out.shape).bfloat16().float()  # bf16-exact: out.float() rounds its gradient
    ga = torch.autograd.grad((out.float() * go).sum(), (qb, kb, vb))
    gb = torch.autograd.grad((ref * go).sum(), (qf, kf, vf))
    for a, b in zip(ga, gb):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.bfloat16())


def test_policy_modes_and_the_cached_cpu_probe(monkeypatch):
    """on / off answer without probing; float32 and float64 always 'pay'; auto probes the
    CPU once per dtype and caches the answer; a bad mode is refused."""
    calls = []
    monkeypatch.setattr(precision, "_rate",
                        lambda dtype, device: calls.append(dtype) or (3.0 if dtype == torch.bfloat16 else 1.0))
    monkeypatch.setattr(precision, "_probed", {})
    assert low_precision_pays(torch.float32, "cpu") and low_precision_pays(torch.float64, "cpu")
    with low_precision_matmul("off"):
        assert not low_precision_pays(torch.bfloat16, "cpu")
    with low_precision_matmul("on"):
        assert low_precision_pays(torch.bfloat16, "cpu")
    assert not calls
    with low_precision_matmul("auto"):
        assert low_precision_pays(torch.bfloat16, "cpu")  # 3x faster in the stub
        assert low_precision_pays(torch.bfloat16, "cpu")
        assert calls == [torch.bfloat16, torch.float32]  # probed once
        monkeypatch.setattr(precision, "_rate", lambda dtype, device: 1.0)
        assert not low_precision_pays(torch.float16, "cpu")  # equal rates: float32 compute
    with pytest.raises(ValueError, match="low-precision matmul mode"):
        set_low_precision_matmul("fast")
