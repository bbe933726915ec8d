"""Input families for the benchmark: flat, clustered and local attention.

Every generator returns ``q [B, H, N, D]``, ``k [B, H, N, D]``, ``v [B, H, N, Dv]``,
drawn in float32 from a seeded ``torch.Generator`` on the CPU and then cast/moved, so
the same seed gives the same inputs in every process and on every device.

- ``gaussian``: i.i.d. standard normal — flat attention, the hard case for every
  approximation (the exact output is close to the mean of all values).
- ``clustered``: content-based peaked attention — keys in clusters, each query next to its
  own key, values alike within a cluster.  What hashing (LSH) is designed for; a fixed
  sparse pattern only sees the cluster members that happen to fall inside it.
- ``local``: position-based peaked attention — each query attends to its neighbours in the
  sequence.  What windows (Longformer, BigBird, Sparse Transformer) are designed for.

The two peaked families give the logits ``q·k/sqrt(D)`` a range of about ``sharpness``
(default 24) between a query's best keys and unrelated ones (whose logits have standard
deviation about ``sharpness/sqrt(D)``), so at N = 16,384 over 99 % of the attention
stays on the structure.  Keys have norm ``sqrt(D)`` (RMS 1), the same as the RMS-normalized
queries that shared-QK attention (Reformer) uses as keys, so a method run with ``k=None``
sees the same structure.
"""

from __future__ import annotations

import math

import torch

FAMILIES = ("gaussian", "clustered", "local")


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def gaussian(B: int, H: int, N: int, D: int, Dv: int, seed: int = 0):
    """i.i.d. standard normal ``q, k [B,H,N,D]``, ``v [B,H,N,Dv]``: diffuse attention."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, H, N, D, generator=g)
    v = torch.randn(B, H, N, Dv, generator=g)
    return q, k, v


def clustered(B: int, H: int, N: int, D: int, Dv: int, seed: int = 0, cluster_size: int = 32,
              sharpness: float = 24.0, spread: float = 0.3, value_noise: float = 0.5):
    """Clustered keys, each query next to its own key: content-based peaked attention.

    ``N / cluster_size`` random unit centres; token ``j`` of cluster ``m`` has the key
    direction ``unit(c_m + spread·ξ/sqrt(D))`` (cosine about 0.92 to its cluster mates,
    about 0 ± 1/sqrt(D) to the rest), key ``sqrt(D)·direction`` and query
    ``sharpness·unit(direction + spread/2·ξ'/sqrt(D))``; the clusters are scattered along
    the sequence.  Values share their cluster's mean (``v = sqrt(1-n²)·μ_m + n·ξ''``,
    ``n = value_noise``), as in trained models, where keys and values project the same
    hidden state.  Shapes as :func:`gaussian`.
    """
    g = torch.Generator().manual_seed(seed)
    C = max(1, N // cluster_size)
    centres = _unit(torch.randn(B, H, C, D, generator=g))
    value_means = torch.randn(B, H, C, Dv, generator=g)
    assign = torch.randint(0, C, (B, H, N), generator=g)[..., None]
    dirs = torch.gather(centres, 2, assign.expand(B, H, N, D))
    dirs = _unit(dirs + spread / math.sqrt(D) * torch.randn(B, H, N, D, generator=g))
    k = math.sqrt(D) * dirs
    q = sharpness * _unit(dirs + spread / 2 / math.sqrt(D) * torch.randn(B, H, N, D, generator=g))
    v = (math.sqrt(1 - value_noise ** 2) * torch.gather(value_means, 2, assign.expand(B, H, N, Dv))
         + value_noise * torch.randn(B, H, N, Dv, generator=g))
    return q, k, v


def local(B: int, H: int, N: int, D: int, Dv: int, seed: int = 0, sharpness: float = 24.0,
          spread: float = 0.3, min_period: float = 16.0, max_period: float = 1024.0):
    """Position-based peaked attention: ``q_i·k_j`` decays with ``|i - j|``.

    Token ``i``'s direction is ``unit(p_i + spread·ξ/sqrt(D))`` with ``p_i`` the sinusoidal
    code of position ``i`` (``D/2`` periods from ``min_period`` to ``max_period``,
    geometric), so ``p_i·p_j`` is 1 at ``i = j`` and falls off over a few dozen tokens;
    key ``sqrt(D)·direction``, query ``sharpness·direction`` (own noise); values i.i.d.
    standard normal.  Shapes as :func:`gaussian`.
    """
    if D < 2:
        raise ValueError(f"local inputs need dim >= 2, got {D}")
    g = torch.Generator().manual_seed(seed)
    F = D // 2
    periods = torch.logspace(math.log10(min_period), math.log10(max_period), F)
    angles = torch.arange(N, dtype=torch.float32)[:, None] * (2 * math.pi / periods)
    code = torch.cat([angles.cos(), angles.sin()] + ([torch.zeros(N, 1)] if D % 2 else []), -1)
    code = (code / math.sqrt(F)).expand(B, H, N, D)
    k = math.sqrt(D) * _unit(code + spread / math.sqrt(D) * torch.randn(B, H, N, D, generator=g))
    q = sharpness * _unit(code + spread / math.sqrt(D) * torch.randn(B, H, N, D, generator=g))
    v = torch.randn(B, H, N, Dv, generator=g)
    return q, k, v


_GENERATORS = {"gaussian": gaussian, "clustered": clustered, "local": local}


def make_inputs(family: str, B: int, H: int, N: int, D: int, Dv: int, seed: int = 0,
                dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """``(q, k, v)`` of ``family`` (one of :data:`FAMILIES`) in ``dtype`` on ``device``."""
    if family not in _GENERATORS:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    q, k, v = _GENERATORS[family](B, H, N, D, Dv, seed)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))
