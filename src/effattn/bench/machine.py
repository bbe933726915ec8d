"""The machine a benchmark ran on: CPU model, threads, torch version, device, matmul rate."""

from __future__ import annotations

import os
import platform
import sys

import torch

from effattn import native
from effattn.bench.measure import MATMUL_PROBE_N, matmul_rate


def cpu_model() -> str:
    """The CPU model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: str = "cpu", threads: int = 0, measure: bool = True) -> dict:
    """A dict describing this machine (``native_kernels``: ``"loaded"`` or why
    :mod:`effattn.native` is not used); ``measure=True`` adds the fp32 matmul GFLOP/s
    measured now with ``threads`` torch threads (0 = torch's default)."""
    if threads:
        torch.set_num_threads(threads)
    info = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        # built here, once, before any case's process loads it (effattn.native)
        "native_kernels": native.status(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    if measure:
        info["matmul_n"] = MATMUL_PROBE_N
        info["matmul_gflops"] = matmul_rate(MATMUL_PROBE_N, device=device)
    return info
