"""Layers and models: multi-head attention over methods, positional encodings, chunked FFN,
padding-aware classifier, causal LM over every causal method, ViT and its Swin wiring."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import effattn
from effattn.nn import (CausalLM, ChunkedFeedForward, EncoderClassifier, FeedForward,
                        LearnedPositional, MultiheadAttention, Rotary, TransformerBlock, ViT,
                        next_token_targets, sinusoidal_table, swin_layer_options)
from effattn.nn.lm import IGNORE_INDEX


def _copy(dst, src):
    dst.load_state_dict(src.state_dict())
    return dst


def test_mha_full_matches_naive_float64_and_padding_invariance():
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    pm = torch.ones(2, 9, dtype=torch.bool)
    pm[1, 6:] = False
    full = MultiheadAttention(16, 4, "full").double()
    naive = _copy(MultiheadAttention(16, 4, "naive").double(), full)
    torch.testing.assert_close(full(x, pm), naive(x, pm), rtol=1e-10, atol=1e-10)
    # padded positions' content never reaches real positions
    x2 = x.clone()
    x2[1, 6:] = torch.randn(3, 16, dtype=torch.float64) * 100
    torch.testing.assert_close(full(x2, pm)[1, :6], full(x, pm)[1, :6], rtol=1e-10, atol=1e-10)


def test_mha_causal_no_leak_and_zero_gradient_to_future():
    mha = MultiheadAttention(16, 2, "full", causal=True).double()
    x = torch.randn(1, 10, 16, dtype=torch.float64, requires_grad=True)
    out = mha(x)
    out[0, 4].sum().backward()
    assert torch.all(x.grad[0, 5:] == 0)
    assert x.grad[0, :5].abs().sum() > 0


def test_mha_shared_qk_has_no_key_projection_and_matches_contract():
    mha = MultiheadAttention(16, 4, "naive", shared_qk=True).double()
    assert mha.to_k is None
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    q = mha._heads(mha.to_q(x))
    v = mha._heads(mha.to_v(x))
    ref = effattn.attention(q, None, v, "naive")
    expect = mha.to_out(ref.transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(mha(x), expect)


def test_mha_passes_method_options_and_rejects_unknown():
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    full = MultiheadAttention(16, 2, "full").double()
    blk = _copy(MultiheadAttention(16, 2, "blockwise", block_q=4, block_k=3).double(), full)
    torch.testing.assert_close(blk(x), full(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(TypeError, match="unknown option"):
        MultiheadAttention(16, 2, "full", bogus=1)
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(15, 2)


def test_mha_gradcheck_float64():
    mha = MultiheadAttention(8, 2, "full", rotary=True).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    pm = torch.tensor([[True, True, True, False, True]])
    assert torch.autograd.gradcheck(lambda t: mha(t, pm), (x,))


def test_rotary_scores_depend_only_on_relative_position():
    rot = Rotary(8)
    q = torch.randn(1, 1, 1, 8, dtype=torch.float64).expand(1, 1, 20, 8)
    k = torch.randn(1, 1, 1, 8, dtype=torch.float64).expand(1, 1, 20, 8)
    s = rot(q) @ rot(k).transpose(-1, -2)  # [1,1,20,20]
    for d in (-3, 0, 5):
        diag = torch.diagonal(s[0, 0], offset=d)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag))
    torch.testing.assert_close(rot(q).norm(dim=-1), q.norm(dim=-1))  # a rotation
    with pytest.raises(ValueError, match="even"):
        Rotary(7)


def test_sinusoidal_table_values_and_learned_table_bound():
    t = sinusoidal_table(50, 6)
    torch.testing.assert_close(t[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    assert math.isclose(t[3, 0].item(), math.sin(3.0), rel_tol=1e-6)
    assert math.isclose(t[7, 3].item(), math.cos(7.0 * 10000 ** (-2 / 6)), rel_tol=1e-6)
    with pytest.raises(ValueError, match="max_len"):
        LearnedPositional(4, 8)(torch.zeros(1, 5, 8))


class _MaxNumel(TorchDispatchMode):
    """Largest tensor produced by any op (a deterministic peak-size proxy)."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.max = max(self.max, t.numel())
        return out


def test_chunked_feedforward_same_result_smaller_peak():
    plain = FeedForward(8, mult=4).double()
    chunked = ChunkedFeedForward(8, mult=4, chunks=4).double()
    chunked.ff.load_state_dict(plain.state_dict())
    x = torch.randn(2, 32, 8, dtype=torch.float64)
    torch.testing.assert_close(chunked(x), plain(x))
    peaks = []
    for mod in (plain, chunked):
        with torch.no_grad(), _MaxNumel() as m:
            mod(x)
        peaks.append(m.max)
    assert peaks[0] == 2 * 32 * 32  # the [B, N, 4*dim] hidden tensor
    assert peaks[1] == 2 * 32 * 8  # a chunk's hidden is smaller than the [B, N, dim] output
    with pytest.raises(ValueError, match="chunks"):
        ChunkedFeedForward(8, chunks=0)


def test_transformer_block_gradcheck_float64():
    blk = TransformerBlock(8, 2, "naive", causal=True, ff_mult=2).double()
    x = torch.randn(1, 4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(blk, (x,))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_classifier_ignores_padding_content_and_amount(pool):
    model = EncoderClassifier(12, 3, dim=16, depth=2, heads=2, max_len=32, pool=pool).double().eval()
    tokens = torch.randint(1, 12, (2, 10))
    pm = torch.ones(2, 10, dtype=torch.bool)
    pm[0, 7:] = False
    ref = model(tokens, pm)
    t2 = tokens.clone()
    t2[0, 7:] = 5
    torch.testing.assert_close(model(t2, pm), ref)
    # more padding at the end changes nothing either
    t3 = torch.cat([tokens, torch.zeros(2, 4, dtype=torch.long)], 1)
    pm3 = torch.cat([pm, torch.zeros(2, 4, dtype=torch.bool)], 1)
    torch.testing.assert_close(model(t3, pm3), ref)
    assert ref.shape == (2, 3)


def test_next_token_targets_respects_padding():
    tok = torch.tensor([[5, 6, 7, 0]])
    pm = torch.tensor([[True, True, True, False]])
    assert next_token_targets(tok).tolist() == [[6, 7, 0, IGNORE_INDEX]]
    assert next_token_targets(tok, pm).tolist() == [[6, 7, IGNORE_INDEX, IGNORE_INDEX]]


def test_causal_lm_does_not_look_ahead():
    lm = CausalLM(20, dim=16, depth=2, heads=2, max_len=16, pos="rotary").double().eval()
    a = torch.randint(0, 20, (1, 12))
    b = a.clone()
    b[0, 7:] = torch.randint(0, 20, (5,))
    torch.testing.assert_close(lm(a)[0, :7], lm(b)[0, :7])


def _causal_methods():
    return [m["name"] for m in effattn.methods() if m["causal"]]


# small blocks so that N=24 exercises each approximate method's own structure
SMALL = {"lsh": dict(chunk_len=8, n_hashes=2), "sparse_fixed": dict(stride=8, block_size=4, summary=2),
         "sparse_strided": dict(stride=8, block_size=4), "longformer": dict(window=8, block_size=4),
         "bigbird": dict(block_size=4, n_window_blocks=3, n_random_blocks=1),
         "bigbird_etc": dict(block_size=4, n_window_blocks=3, n_random_blocks=1),
         "performer": dict(n_features=16, chunk=8), "linear": dict(chunk=8), "taylor": dict(chunk=8),
         "blockwise": dict(block_q=8, block_k=8)}


def test_causal_lm_trains_with_every_causal_method():
    names = _causal_methods()
    assert {"full", "naive", "blockwise"} <= set(names)
    tokens = torch.randint(1, 16, (2, 24))
    pm = torch.ones(2, 24, dtype=torch.bool)
    pm[1, 20:] = False
    for name in names:
        opts = {k: v for k, v in SMALL.get(name, {}).items() if k in effattn.api.spec(name).options}
        lm = CausalLM(16, dim=16, depth=1, heads=2, method=name, max_len=24, **opts)
        loss = lm.loss(tokens, pm)
        loss.backward()
        assert torch.isfinite(loss), name
        grads = [p.grad for p in lm.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), name


def test_vit_shapes_and_errors():
    vit = ViT(16, 4, 5, in_channels=3, dim=16, depth=2, heads=2)
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert vit.positions.shape == (1, 17, 16)  # 16 patches + class token
    with pytest.raises(ValueError, match="images"):
        vit(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="divisible"):
        ViT(15, 4, 5)
    with pytest.raises(ValueError, match="window"):
        ViT(16, 4, 5, window=2)


def test_swin_layer_options_alternate_shift():
    opts = swin_layer_options(4, (8, 8), 4)
    assert [o["shift"] for o in opts] == [(0, 0), 2, (0, 0), 2]
    assert all(o["grid"] == (8, 8) and o["window"] == 4 for o in opts)


def test_vit_window2d_stage_runs_and_is_local():
    vit = ViT(16, 2, 3, in_channels=1, dim=16, depth=2, heads=2, method="window2d", window=4).double()
    assert vit.cls is None and vit.pool == "mean"
    shifts = [layer.attn_branch.attn.method_options["shift"] for layer in vit.encoder.layers]
    assert shifts == [(0, 0), 2]
    out = vit(torch.randn(2, 1, 16, 16, dtype=torch.float64))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    # one unshifted window2d layer: a patch's output depends only on patches of its window
    mha = vit.encoder.layers[0].attn_branch.attn
    x = torch.randn(1, 64, 16, dtype=torch.float64, requires_grad=True)
    mha(x)[0, 0].sum().backward()
    touched = (x.grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist()
    assert touched == [r * 8 + c for r in range(4) for c in range(4)]


def test_patch_merging_groups_2x2_neighbours():
    from effattn.nn import PatchMerging

    pm = PatchMerging(1)
    pm.norm, pm.proj = torch.nn.Identity(), torch.nn.Identity()
    x = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid, row-major
    assert pm(x, (4, 4))[0].tolist() == [[0, 4, 1, 5], [2, 6, 3, 7], [8, 12, 9, 13], [10, 14, 11, 15]]


def test_swin_hierarchy_halves_grid_doubles_width():
    vit = ViT(32, 2, 3, in_channels=1, dim=8, heads=1, method="window2d", window=4, stages=(2, 2, 2))
    assert vit.encoder.grids == [(16, 16), (8, 8), (4, 4)]
    assert [s.layers[0].attn_branch.attn.heads for s in vit.encoder.stages] == [1, 2, 4]
    assert vit.head.in_features == 32
    out = vit(torch.randn(2, 1, 32, 32))
    out.sum().backward()
    assert out.shape == (2, 3) and all(p.grad is not None for p in vit.parameters())
    with pytest.raises(ValueError, match="stages"):
        ViT(16, 4, 3, method="window2d", window=2, stages=(1, 1, 1, 1))
