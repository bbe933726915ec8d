"""Scratch buffers kept between calls (``mechanisms/_scratch.py``): the engine's and LSH's
per-group buffers live on per thread on the CPU, so no result may alias them, threads may
not share them, and ``release_workspaces`` frees them."""

import threading

import pytest
import torch

import effattn
from effattn.mechanisms._scratch import (Workspace, kept_bytes, kept_workspace,
                                         release_workspaces)

# (method, shared_qk, options): the engine's band, row-piece and union paths, and LSH
CASES = [
    ("lsh", True, dict(n_hashes=2, chunk_len=16)),
    ("longformer", False, dict(window=32, block_size=16)),
    ("bigbird", False, dict(block_size=16)),
    ("sparse_strided", False, dict(block_size=16)),
    ("sparse_fixed", False, dict(block_size=16)),
]


def _call(method, shared, opts, q, k, v):
    return effattn.attention(q, None if shared else k, v, method, **opts)


@pytest.mark.parametrize("method,shared,opts", CASES, ids=[c[0] for c in CASES])
def test_results_never_alias_the_kept_workspace(monkeypatch, method, shared, opts):
    """A result (output or gradient) that aliased a kept buffer would change under the
    next call: outputs and gradients of one call stay equal after calls of other shapes.
    (LSH's torch groups and the engine's torch tiles here: the native kernels keep no
    workspace.)"""
    from effattn.mechanisms import blocksparse, lsh

    monkeypatch.setattr(lsh, "USE_NATIVE_CHUNKS", False)
    monkeypatch.setattr(blocksparse, "USE_NATIVE", False)
    release_workspaces()
    g = torch.Generator().manual_seed(0)
    q1, k1, v1 = (torch.randn(2, 2, 256, 16, generator=g) for _ in range(3))
    q2, k2, v2 = (torch.randn(1, 3, 384, 16, generator=g) for _ in range(3))
    with torch.no_grad():
        out1 = _call(method, shared, opts, q1, k1, v1)
    kept = out1.clone()
    x1 = [t.clone().requires_grad_(True) for t in (q1, k1, v1)]
    _call(method, shared, opts, *x1).sum().backward()
    grads = [t.grad.clone() for t in x1 if t.grad is not None]
    with torch.no_grad():
        _call(method, shared, opts, q2, k2, v2)
    x2 = [t.clone().requires_grad_(True) for t in (q2, k2, v2)]
    _call(method, shared, opts, *x2).square().sum().backward()
    assert torch.equal(out1, kept)
    assert all(torch.equal(t.grad, g_) for t, g_ in zip([t for t in x1 if t.grad is not None], grads))
    assert kept_bytes() > 0
    assert release_workspaces() > 0
    assert release_workspaces() == 0 and kept_bytes() == 0


def test_threads_keep_workspaces_of_their_own():
    """Two threads running the engine at once get the results each gets alone (their
    workspaces their own; the tiles and biases both cut and keep at once shared)."""
    import effattn.mechanisms.blocksparse as bs

    g = torch.Generator().manual_seed(1)
    inputs = [[torch.randn(1, 2, 512, 16, generator=g) for _ in range(3)] for _ in range(2)]
    opts = dict(window=32, block_size=16)
    alone = []
    for q, k, v in inputs:
        x = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = effattn.attention(*x, "longformer", **opts)
        out.square().sum().backward()
        alone.append([out.detach()] + [t.grad for t in x])
    together = [None, None]
    start = threading.Barrier(2)
    bs.clear_tile_cache()

    def run(i):
        start.wait()
        for _ in range(5):
            x = [t.clone().requires_grad_(True) for t in inputs[i]]
            out = effattn.attention(*x, "longformer", **opts)
            out.square().sum().backward()
        together[i] = [out.detach()] + [t.grad for t in x]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_kept_only_on_the_cpu():
    """The CPU workspace is the same object call after call; other devices (their caching
    allocators already reuse memory) get a fresh one per call."""
    cpu = kept_workspace("test", torch.device("cpu"))
    assert kept_workspace("test", "cpu") is cpu and kept_workspace("other", "cpu") is not cpu
    meta = kept_workspace("test", torch.device("meta"))
    assert isinstance(meta, Workspace) and kept_workspace("test", "meta") is not meta
    release_workspaces()
    assert kept_workspace("test", "cpu") is not cpu
    release_workspaces()


@pytest.mark.parametrize("flex", ["off", "on"])
@pytest.mark.parametrize("method,shared,opts", CASES, ids=[c[0] for c in CASES])
def test_state_kept_under_inference_mode_serves_later_calls(method, shared, opts, flex, monkeypatch):
    """Scratch buffers, tiles, biases and layouts first made inside ``torch.inference_mode``
    (a serving loop) are inference tensors unless made outside it; a later training call
    writing into them failed ("Inplace update to inference tensor outside InferenceMode").
    Calls alternating between the two modes (and FlexAttention's block tables, with it on)
    agree."""
    from effattn.mechanisms import _flex
    import effattn.mechanisms.blocksparse as bs

    release_workspaces()
    bs.clear_tile_cache()
    monkeypatch.setattr(_flex, "MIN_SCORES", 0)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=g) for _ in range(3))
    with _flex.flex_mode(flex):
        with torch.inference_mode():
            first = _call(method, shared, opts, q, k, v)
        x = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = _call(method, shared, opts, *x)
        out.sum().backward()
        with torch.inference_mode():
            again = _call(method, shared, opts, q, k, v)
    torch.testing.assert_close(out.detach(), first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, first, atol=1e-5, rtol=1e-5)
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in x[:1] + x[2:])
