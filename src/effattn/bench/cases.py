"""Input families for the benchmark: i.i.d. Gaussian and clustered (peaked attention).

Every generator returns ``q [B, H, N, D]``, ``k [B, H, N, D]``, ``v [B, H, N, Dv]``,
drawn in float32 from a seeded ``torch.Generator`` on the CPU and then cast/moved, so
the same seed gives the same inputs in every process and on every device.
"""

from __future__ import annotations

import torch

FAMILIES = ("gaussian", "clustered")


def gaussian(B: int, H: int, N: int, D: int, Dv: int, seed: int = 0):
    """i.i.d. standard normal ``q, k [B,H,N,D]``, ``v [B,H,N,Dv]``: diffuse attention."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, H, N, D, generator=g)
    v = torch.randn(B, H, N, Dv, generator=g)
    return q, k, v


def clustered(B: int, H: int, N: int, D: int, Dv: int, seed: int = 0, cluster_size: int = 32):
    """Clustered keys with each query next to one key: peaked attention.

    Keys are ``N / cluster_size`` random centres (per-coordinate variance 0.75) plus noise
    of std 0.5, in random token order; query ``i`` is a randomly chosen key plus noise of
    std 0.25.  With scale ``1/sqrt(D)`` a query scores about ``sqrt(D)`` on its own key,
    ``0.75·sqrt(D)`` on the rest of its cluster and about 0 elsewhere, so its attention
    concentrates on a few dozen keys that are scattered along the sequence.
    Shapes as :func:`gaussian`.
    """
    g = torch.Generator().manual_seed(seed)
    C = max(1, N // cluster_size)
    centres = torch.randn(B, H, C, D, generator=g) * 0.75 ** 0.5
    assign = torch.randint(0, C, (B, H, N), generator=g)
    k = torch.gather(centres, 2, assign[..., None].expand(B, H, N, D))
    k = k + 0.5 * torch.randn(B, H, N, D, generator=g)
    near = torch.randint(0, N, (B, H, N), generator=g)
    q = torch.gather(k, 2, near[..., None].expand(B, H, N, D)) + 0.25 * torch.randn(B, H, N, D, generator=g)
    v = torch.randn(B, H, N, Dv, generator=g)
    return q, k, v


def make_inputs(family: str, B: int, H: int, N: int, D: int, Dv: int, seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(q, k, v)`` of ``family`` (``"gaussian"`` or ``"clustered"``) in ``dtype`` on ``device``."""
    if family == "gaussian":
        q, k, v = gaussian(B, H, N, D, Dv, seed)
    elif family == "clustered":
        q, k, v = clustered(B, H, N, D, Dv, seed)
    else:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))
