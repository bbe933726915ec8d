"""A pool of the memory behind the large CPU tensors the native kernels return.

PyTorch has no caching allocator on the CPU: every output or gradient is fresh memory from
malloc, and glibc serves blocks above its mmap threshold (at most 32 MiB; lower until a
large block has been freed once) with fresh ``mmap`` pages, faulted in on first touch and
handed back to the system when freed.  At N = 65,536 (B=1, H=4, D=64) one output is 64 MiB:
on the 2-core VM the performance figures come from, efficient attention's forward took 41
ms of which ~15 were the 16,389 page faults of its output, and its training step 135 ms
with 65,556 faults (out, dq, dk, dv), 74 ms without them.

:func:`pooled_empty` hands out a tensor whose memory comes from this pool; when the last
reference to that memory goes (the tensor and every view of it), the block goes back to the
pool and the next request of the same size class reuses it, with its pages still mapped.
Only the native kernels' results (outputs, gradients, kept states: >= :data:`MIN_BYTES`)
use it; everything else allocates as usual.  Free blocks are held up to :func:`limit`
bytes (the oldest dropped first; ``EFFATTN_RESULT_POOL_MB`` sets the default, 0 switches
the pool off), and :func:`release` hands them all back now.  Other devices have caching
allocators of their own and never use the pool.

A pooled tensor is an ordinary CPU tensor whose storage cannot be resized (as one from
:func:`torch.frombuffer`): ``resize_`` to a larger size raises.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import math
import os
import threading

import torch

__all__ = ["pooled_empty", "pooled_empty_like", "pooled_zeros", "limit", "set_limit", "held_bytes", "release", "MIN_BYTES"]

#: requests below this many bytes are plain ``torch.empty`` (malloc reuses small blocks)
MIN_BYTES = 1 << 20
_CLASS = 1 << 16  # size classes: multiples of 64 KiB


def _default_limit() -> int:
    env = os.environ.get("EFFATTN_RESULT_POOL_MB")
    if env is not None and env.strip() != "":
        try:
            mb = float(env)
        except ValueError:
            raise ValueError(f"EFFATTN_RESULT_POOL_MB: expected a number of MiB, got {env!r}")
        if mb < 0:
            raise ValueError(f"EFFATTN_RESULT_POOL_MB: expected >= 0, got {env!r}")
        return int(mb * (1 << 20))
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return min(1 << 30, ram // 8)


_lock = threading.Lock()
_free: dict[int, list] = {}            # size class -> backing uint8 tensors, oldest first
_order: collections.deque = collections.deque()  # (size class, backing) in the order freed
_pending: collections.deque = collections.deque()  # blocks freed while the lock was held
_held = 0
_limit = _default_limit()


def _after_fork_in_child() -> None:
    """A fresh lock in a forked child: another thread of the parent may have held it."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _returned(block) -> None:
    """``__del__`` of a block: the last tensor on its memory is gone."""
    back = block.__dict__.get("back")
    if back is None:
        return
    _pending.append(back)
    if _lock.acquire(blocking=False):  # a collection inside the pool's own lock: left pending
        try:
            _drain()
        finally:
            _lock.release()


@functools.lru_cache(maxsize=512)
def _block_type(nbytes: int) -> type:
    """A ctypes byte array of ``nbytes`` whose instances return their backing on deletion."""
    return type(f"_PooledBlock{nbytes}", (ctypes.Array,),
                {"_type_": ctypes.c_char, "_length_": nbytes, "__del__": _returned})


def _drain() -> None:
    """Move the pending returns into the free lists and drop the oldest past the limit
    (call with the lock held)."""
    global _held
    while _pending:
        back = _pending.popleft()
        n = back.numel()
        if n > _limit:
            continue
        _free.setdefault(n, []).append(back)
        _order.append((n, back))
        _held += n
    while _held > _limit and _order:
        n, back = _order.popleft()
        if _remove_identical(_free.get(n, ()), back):
            _held -= n


def _remove_identical(seq, back) -> bool:
    """Delete ``back`` itself (not an equal tensor) from the list or deque ``seq``."""
    for i, b in enumerate(seq):
        if (b[1] if isinstance(b, tuple) else b) is back:
            del seq[i]
            return True
    return False


def _take(n: int):
    """A backing block of ``n`` bytes: the pool's most recently freed one, else fresh."""
    global _held
    with _lock:
        _drain()
        lst = _free.get(n)
        if lst:
            back = lst.pop()
            _held -= n
            _remove_identical(_order, back)
            return back
    with torch.inference_mode(False):
        return torch.empty(n, dtype=torch.uint8)


def pooled_empty(shape, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """An uninitialized contiguous tensor ``shape`` of ``dtype`` on ``device``.  On the CPU
    its memory comes from the pool when it is at least :data:`MIN_BYTES` and the pool is on
    and goes back to it when the last tensor on it is freed; elsewhere (and below that)
    it is ``torch.empty``."""
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    nbytes = numel * _itemsize(dtype)
    if nbytes < MIN_BYTES or _limit <= 0 or torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    n = -(-nbytes // _CLASS) * _CLASS
    back = _take(n)
    block = _block_type(n).from_address(back.data_ptr())
    block.back = back
    # frombuffer's own tensor reshaped in place: a view of it (its base holding a second
    # reference to the storage) or a tensor set_ on its storage object (kept alive with
    # it) would make autograd add another gradient into a copy instead of into this one
    return torch.frombuffer(block, dtype=dtype, count=numel).resize_(shape)


def pooled_empty_like(x: torch.Tensor) -> torch.Tensor:
    """:func:`pooled_empty` with ``x``'s shape, dtype and device (contiguous)."""
    return pooled_empty(x.shape, x.dtype, x.device)


def pooled_zeros(shape, dtype: torch.dtype = torch.float32, device="cpu") -> torch.Tensor:
    """:func:`pooled_empty` filled with zeros."""
    return pooled_empty(shape, dtype, device).zero_()


@functools.lru_cache(maxsize=None)
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def limit() -> int:
    """Bytes of free blocks the pool may hold."""
    return _limit


def set_limit(nbytes: int) -> int:
    """Hold at most ``nbytes`` of free blocks (0: the pool is off, every request is plain
    ``torch.empty``); drops the oldest past it now.  Returns the previous limit."""
    global _limit
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes: expected a non-negative int, got {nbytes!r}")
    with _lock:
        old, _limit = _limit, nbytes
        _drain()
    return old


def held_bytes() -> int:
    """Bytes of free blocks held now (memory no live tensor uses)."""
    with _lock:
        _drain()
        return _held


def release() -> int:
    """Hand every free block back (to malloc, which returns large ones to the system);
    returns the bytes released.  Live pooled tensors are untouched."""
    global _held
    with _lock:
        _drain()
        held = _held
        _free.clear()
        _order.clear()
        _held = 0
    return held
