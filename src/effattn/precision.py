"""Whether low-precision (bf16 / fp16) inputs run low-precision matmuls.

Attention on bf16 inputs pays conversions around its float32 softmax statistics; that is
worth it only where the device multiplies bf16 faster than float32.  CPUs differ: on one
2-core AMD EPYC VM a bf16 ``2048 x 2048`` matmul ran about 3x the float32 rate, on a
2-core Intel Xeon VM (AVX512-BF16, no AMX) at about half of it (169 vs 312 GFLOP/s, and
longformer's bf16 training step took 1.7x its float32 one).  :func:`effattn.attention`
therefore asks :func:`low_precision_pays`: where low-precision matmuls do not pay, the
method runs on float32 copies of ``q, k, v`` and the output is cast back (``lse`` is
float32 either way; gradients flow back in the inputs' dtypes).

The answer is, per (device type, dtype): ``"on"`` / ``"off"`` when set by
:func:`set_low_precision_matmul` or the environment variable
``EFFATTN_LOW_PRECISION_MATMUL``; else (``"auto"``) yes on CUDA, and on CPU a one-time
probe (a few ms): attention-tile-shaped batched products in both dtypes, low precision
chosen when it is at least :data:`PAYS_RATIO` times as fast.  Learned-parameter modules
(their weights share the inputs' dtype) always compute in the inputs' dtype.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Dict, Tuple

import torch

MODES = ("auto", "on", "off")
#: low-precision matmuls are used (``auto`` on CPU) when at least this much faster
PAYS_RATIO = 1.1
#: the probe's products: ``[PROBE_BATCH, 64, 64] @ [.., 64, 512]`` and ``[.., 64, 512] @
#: [.., 512, 64]`` — a score tile and its probabilities times values
PROBE_BATCH = 32

_mode = os.environ.get("EFFATTN_LOW_PRECISION_MATMUL", "auto")
_probed: Dict[Tuple[str, torch.dtype], bool] = {}


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"low-precision matmul mode: expected one of {MODES}, got {mode!r}")
    return mode


def set_low_precision_matmul(mode: str) -> None:
    """Set the policy: ``"auto"`` (probe the device), ``"on"`` (always run bf16 / fp16
    inputs in their dtype), ``"off"`` (always compute them in float32)."""
    global _mode
    _mode = _check_mode(mode)


@contextlib.contextmanager
def low_precision_matmul(mode: str):
    """Context manager: :func:`set_low_precision_matmul` for the block, restored after."""
    global _mode
    old, _mode = _mode, _check_mode(mode)
    try:
        yield
    finally:
        _mode = old


def _rate(dtype: torch.dtype, device: torch.device) -> float:
    """Multiply-adds per second of the probe's two tile products in ``dtype`` (best of 3)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(PROBE_BATCH, 64, 64, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(PROBE_BATCH, 64, 512, generator=g).to(device=device, dtype=dtype)
    c = torch.empty(PROBE_BATCH, 64, 512, device=device, dtype=dtype)
    d = torch.empty(PROBE_BATCH, 64, 64, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(4):
        t0 = time.perf_counter()
        torch.bmm(a, b, out=c)
        torch.bmm(c, b.transpose(1, 2), out=d)
        best = min(best, time.perf_counter() - t0)
    return 2 * PROBE_BATCH * 64 * 64 * 512 / max(best, 1e-9)


def low_precision_pays(dtype: torch.dtype, device) -> bool:
    """Whether inputs of ``dtype`` (bf16 / fp16) run their matmuls in ``dtype`` on
    ``device`` under the current policy (see the module docstring); always True for
    float32 and float64."""
    if dtype not in (torch.bfloat16, torch.float16):
        return True
    if _mode != "auto":
        return _mode == "on"
    device = torch.device(device)
    if device.type != "cpu":
        return True
    key = (device.type, dtype)
    if key not in _probed:
        _probed[key] = _rate(dtype, device) >= PAYS_RATIO * _rate(torch.float32, device)
    return _probed[key]
