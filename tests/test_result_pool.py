"""The result pool (effattn.result_pool): memory behind the native kernels' large CPU
results is reused once no tensor uses it, and never while one does."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from hypothesis import given, strategies as st

from effattn import native, result_pool as rp

MB = 1 << 20


@pytest.fixture(autouse=True)
def _fresh_pool():
    old = rp.set_limit(256 * MB)
    rp.release()
    yield
    rp.set_limit(old)
    rp.release()


def _span(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return s.data_ptr(), s.data_ptr() + s.nbytes()


def test_memory_is_reused_once_the_last_view_is_gone():
    a = rp.pooled_empty((MB,))  # 4 MiB
    ptr = a.data_ptr()
    view = a[1:]
    del a
    b = rp.pooled_empty((MB,))
    assert b.data_ptr() != ptr  # a view still holds it
    assert rp.held_bytes() == 0
    del view
    assert rp.held_bytes() == 4 * MB
    c = rp.pooled_empty((4, MB // 4))  # same size class, another shape
    assert c.data_ptr() == ptr and rp.held_bytes() == 0
    assert c.shape == (4, MB // 4) and c.is_contiguous() and c.dtype == torch.float32


@given(st.lists(st.tuples(st.booleans(), st.integers(1, 5), st.integers(0, 7)), min_size=1,
                max_size=30))
def test_live_results_never_share_memory(ops):
    """Any sequence of requests and frees: live tensors' memory is disjoint and keeps what
    was written to it; what the pool holds stays within its limit."""
    rp.set_limit(12 * MB)
    live = []
    for alloc, size_mb, which in ops:
        if alloc or not live:
            t = rp.pooled_empty((size_mb * MB // 4 + 3,))
            t.fill_(float(len(live) + 1) + 0.5 * size_mb)
            live.append((t, t[0].item()))
        else:
            live.pop(which % len(live))
        spans = sorted(_span(t) for t, _ in live)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert all(bool((t == val).all()) for t, val in live)
        assert rp.held_bytes() <= 12 * MB


def test_a_pooled_tensor_is_the_only_owner_of_its_storage():
    """Not a view of another tensor: autograd adds a second gradient into a tensor in place
    only when nothing else holds its storage (a view's base would: Nystromformer's
    training step at 65K then paid two 64 MB copies and their page faults)."""
    t = rp.pooled_empty((4, MB // 4))
    plain = torch.empty(4, MB // 4)
    assert t._base is None
    assert (torch._C._storage_Use_Count(t.untyped_storage()._cdata)
            == torch._C._storage_Use_Count(plain.untyped_storage()._cdata))


def test_limit_drops_the_oldest_and_zero_switches_the_pool_off():
    rp.set_limit(10 * MB)
    ts = [rp.pooled_empty((MB,)) for _ in range(4)]  # 4 x 4 MiB
    ptrs = [t.data_ptr() for t in ts]
    while ts:
        del ts[0]  # freed in order
    assert rp.held_bytes() == 8 * MB  # the first two freed were dropped
    again = [rp.pooled_empty((MB,)) for _ in range(2)]
    assert {t.data_ptr() for t in again} == set(ptrs[2:])
    rp.set_limit(0)
    plain = rp.pooled_empty((MB,))
    assert plain.untyped_storage().resizable()  # torch.empty
    del again
    assert rp.held_bytes() == 0
    with pytest.raises(ValueError):
        rp.set_limit(-1)


def test_release_hands_back_every_free_block():
    ts = [rp.pooled_empty((MB,)) for _ in range(3)]
    keep = ts.pop()
    del ts
    assert rp.release() == 8 * MB and rp.held_bytes() == 0
    assert keep.fill_(1).sum().item() == MB  # a live one is untouched


def test_small_and_non_cpu_requests_are_plain():
    small = rp.pooled_empty((MB // 4 - 1,))
    assert small.untyped_storage().resizable()
    meta = rp.pooled_empty((MB,), device="meta")
    assert meta.device.type == "meta"
    zeros = rp.pooled_zeros((3, MB), torch.float64)
    assert zeros.dtype == torch.float64 and not zeros.any()
    like = rp.pooled_empty_like(zeros)
    assert like.shape == zeros.shape and like.dtype == torch.float64


def test_a_pooled_tensor_behaves_as_any_other():
    a = rp.pooled_empty((256, 1024)).normal_()
    buf = io.BytesIO()
    torch.save(a, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), a)
    x = a.clone().requires_grad_()
    leaf = rp.pooled_empty((256, 1024)).copy_(a).requires_grad_()
    (leaf * 3).sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(a, 3.0))
    shared = rp.pooled_empty((256, 1024)).copy_(a).share_memory_()
    assert shared.is_shared() and torch.equal(shared, x.detach())
    assert float(a.numpy().sum()) == pytest.approx(float(a.sum()), rel=1e-4)
    with pytest.raises(RuntimeError, match="not resizable"):
        a.resize_(512, 1024)


def test_threads_requesting_and_freeing_at_once():
    errors = []

    def work(tid):
        try:
            for i in range(40):
                t = rp.pooled_empty((MB // 2 + tid,))
                t.fill_(tid * 1000 + i)
                if not bool((t == tid * 1000 + i).all()):
                    errors.append((tid, i))
                del t
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(tid,)) for tid in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    assert rp.held_bytes() <= rp.limit()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
def test_a_child_forked_while_another_thread_holds_the_lock_can_use_the_pool():
    import os

    release, holding = threading.Event(), threading.Event()

    def hold():
        with rp._lock:
            holding.set()
            release.wait(10)

    th = threading.Thread(target=hold)
    th.start()
    holding.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: the pool must neither deadlock nor fail
        try:
            t = rp.pooled_empty((MB,))
            ptr = t.data_ptr()
            del t
            ok = rp.pooled_empty((MB,)).data_ptr() == ptr
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    release.set()
    th.join()
    import signal
    import time

    deadline = time.monotonic() + 30
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:  # deadlocked on the parent's held lock
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on the pool's lock")
        time.sleep(0.05)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_default_limit_from_the_environment(monkeypatch):
    monkeypatch.setenv("EFFATTN_RESULT_POOL_MB", "64")
    assert rp._default_limit() == 64 * MB
    monkeypatch.setenv("EFFATTN_RESULT_POOL_MB", "0")
    assert rp._default_limit() == 0
    for bad in ("lots", "-1"):
        monkeypatch.setenv("EFFATTN_RESULT_POOL_MB", bad)
        with pytest.raises(ValueError, match="EFFATTN_RESULT_POOL_MB"):
            rp._default_limit()
    monkeypatch.delenv("EFFATTN_RESULT_POOL_MB")
    assert 0 < rp._default_limit() <= 1 << 30


@pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.status()}")
@pytest.mark.parametrize("method", ["efficient", "linear", "longformer", "lsh"])
def test_kernel_results_come_from_the_pool(method):
    """A kernel's output lands in the memory of the last one freed, with the same values
    as on fresh memory; gradients too."""
    import effattn

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 1024, 64, generator=g) for _ in range(3))
    opts = {"lsh": dict(seed=0)}.get(method, {})
    rp.set_limit(0)
    ref = effattn.attention(q, k, v, method, **opts)
    rp.set_limit(256 * MB)
    first = effattn.attention(q, k, v, method, **opts)
    ptr = first.data_ptr()
    first.fill_(float("nan"))
    del first
    again = effattn.attention(q, k, v, method, **opts)
    assert again.data_ptr() == ptr
    torch.testing.assert_close(again, ref, rtol=0, atol=0)
    xs = [t.clone().requires_grad_() for t in (q, k, v)]
    effattn.attention(*xs, method, **opts).sum().backward()
    grads = [x.grad.clone() for x in xs]
    ptrs = {x.grad.data_ptr() for x in xs}
    for x in xs:
        x.grad = None
    effattn.attention(*xs, method, **opts).sum().backward()
    assert {x.grad.data_ptr() for x in xs} & ptrs
    for x, gr in zip(xs, grads):
        torch.testing.assert_close(x.grad, gr, rtol=0, atol=0)
