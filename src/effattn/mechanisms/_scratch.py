"""Named scratch buffers reused across the chunks (or calls) of a streamed computation.

A fresh multi-MB tensor is page-faulted in every time it is allocated, and glibc hands
freed blocks back to the system once the free space at the top of its heap passes its
trim threshold (a few MB unless a larger block was freed before): measured on the 2-core
VM, ~1.2-1.5 us a 4 KB page, i.e. about 0.3 ms a MB — several times a pass over memory
that is already mapped.  A loop whose chunks each allocate a few MB of temporaries can
pay that on every chunk; writing the large per-chunk results into a :class:`Workspace`
instead touches the same memory every time.

The same holds between calls: the block-sparse engine's and LSH's per-group buffers
(tens of MB) are kept per thread on the CPU (:func:`kept_workspace`) — measured at N =
16,384, 4 heads, training: sparse_strided 227 vs 260 ms, longformer 246 vs 254 ms, the
page faults of every step's fresh buffers gone — and :func:`release_workspaces` frees
them.  Other devices get a fresh workspace per call: their caching allocators already
hand the same memory back, and kept buffers there would hold device memory.
"""

from __future__ import annotations

import math
import threading

import torch


class Workspace:
    """Named scratch buffers: ``get(name, shape, like)`` hands out the same memory for
    every request of ``name`` (grown when too small).  What it hands out is overwritten
    by the next request of the same name; callers copy results out before then."""

    def __init__(self):
        self._bufs = {}

    def get(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        """An uninitialized contiguous tensor ``shape`` with ``like``'s dtype and device,
        carved from the buffer ``name`` (grown when too small): the same memory as the
        last request of ``name``."""
        n = math.prod(shape)
        key = (name, like.dtype, like.device)
        b = self._bufs.get(key)
        if b is None or b.numel() < n:
            self._bufs.pop(key, None)  # free the old one before allocating its successor
            # a buffer first made under torch.inference_mode would be an inference tensor,
            # which no later call outside it may write into
            with torch.inference_mode(False):
                b = self._bufs[key] = torch.empty(n, dtype=like.dtype, device=like.device)
        return b[:n].view(shape)

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())


_KEPT = threading.local()


def kept_workspace(owner: str, device: torch.device) -> Workspace:
    """The calling thread's :class:`Workspace` for ``owner`` (e.g. ``"lsh"``), kept between
    calls when ``device`` is the CPU (created on first use; :func:`release_workspaces` frees
    it); a fresh one per call elsewhere.  What it hands out must not escape the call (a
    later call overwrites it): callers copy results into tensors of their own."""
    if torch.device(device).type != "cpu":
        return Workspace()
    kept = getattr(_KEPT, "by_owner", None)
    if kept is None:
        kept = _KEPT.by_owner = {}
    ws = kept.get(owner)
    if ws is None:
        ws = kept[owner] = Workspace()
    return ws


def kept_bytes() -> int:
    """Bytes the calling thread's kept workspaces hold."""
    return sum(ws.nbytes() for ws in getattr(_KEPT, "by_owner", {}).values())


def release_workspaces() -> int:
    """Free every workspace the calling thread keeps (:func:`kept_workspace`); returns the
    bytes released.  The next call allocates its buffers again."""
    held = kept_bytes()
    _KEPT.by_owner = {}
    return held
