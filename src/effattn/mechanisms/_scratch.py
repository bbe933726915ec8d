"""Named scratch buffers reused across the chunks (or calls) of a streamed computation.

A fresh multi-MB tensor is page-faulted in every time it is allocated, and glibc hands
freed blocks back to the system once the free space at the top of its heap passes its
trim threshold (a few MB unless a larger block was freed before): measured on the 2-core
VM, ~1.2-1.5 us a 4 KB page, i.e. about 0.3 ms a MB — several times a pass over memory
that is already mapped.  A loop whose chunks each allocate a few MB of temporaries can
pay that on every chunk; writing the large per-chunk results into a :class:`Workspace`
instead touches the same memory every time.
"""

from __future__ import annotations

import math

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
            b = self._bufs[key] = torch.empty(n, dtype=like.dtype, device=like.device)
        return b[:n].view(shape)

    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._bufs.values())
