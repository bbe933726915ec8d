"""Measuring one case: time, peak memory and accuracy, each case in its own subprocess.

The parent calls :func:`run_isolated` with a task dict; a fresh process (forked from a
``forkserver`` that has already imported torch, so starting one is cheap) runs
:func:`time_case` or :func:`accuracy_case` and sends back a result dict.  A case that
runs past its timeout is killed and recorded ``timeout``; one that dies (the kernel's
OOM killer), raises ``MemoryError`` or an allocator failure is recorded ``oom``.

Memory: on CPU the peak resident set above the baseline taken after the inputs exist
(Linux: the ``VmHWM`` high-water mark, reset through ``/proc/self/clear_refs``; else
``getrusage`` ``ru_maxrss`` before/after), measured over the first call; on CUDA
``torch.cuda.max_memory_allocated`` above the allocation after creating the inputs.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import resource
import statistics
import time
import traceback
from typing import Optional

import torch

from effattn.allocator import release_free_heap, retain_freed_memory
from effattn.bench.cases import make_inputs
from effattn.bench.targets import NotApplicable, Target, build
from effattn.mechanisms.blocksparse import BACKEND_CALLS, clear_tile_cache
from effattn.mechanisms._scratch import release_workspaces
from effattn import result_pool

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory",
                "not enough memory", "std::bad_alloc")


# ------------------------------------------------------------------ statistics


def summarize(xs: list) -> dict:
    """``{"median", "q1", "q3", "min", "max", "n", "all"}`` of a non-empty list of floats."""
    xs = sorted(float(x) for x in xs)
    if len(xs) >= 2:
        q = statistics.quantiles(xs, n=4, method="inclusive")
        q1, q3 = q[0], q[2]
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "min": xs[0], "max": xs[-1],
            "n": len(xs), "all": xs}


def relative_errors(out: torch.Tensor, ref: torch.Tensor) -> tuple:
    """``(max, mean)`` over rows of ``||out - ref|| / ||ref||``; rows are the last dim of
    ``[B, H, N, Dv]`` tensors (computed in float64)."""
    o, r = out.detach().double().cpu(), ref.detach().double().cpu()
    num = (o - r).norm(dim=-1)
    den = r.norm(dim=-1).clamp_min(1e-30)
    rel = num / den
    if not torch.isfinite(rel).all():
        return float("inf"), float("inf")
    return float(rel.max()), float(rel.mean())


# ------------------------------------------------------------------ memory probes


def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Hand memory that malloc keeps after ``free`` back to the OS (glibc ``malloc_trim``),
    so the baseline RSS counts live memory only: blocks below the mmap threshold (e.g. a
    streamed method's chunk buffers) stay resident after the warm-up call and would
    otherwise hide inside the baseline and be reused unseen by the measured call."""
    release_free_heap()


class PeakMemory:
    """Peak memory above the moment of :meth:`start`, in bytes (CPU RSS or CUDA allocations)."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        """Take the baseline (call after the inputs exist)."""
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        self.reset_ok = False
        _release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the VmHWM high-water mark to the current RSS
            self.reset_ok = _status_kb("VmHWM") is not None
        except OSError:
            pass
        if self.reset_ok:
            self.base = _status_kb("VmRSS") * 1024
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak_above(self) -> int:
        """Bytes of the peak since :meth:`start` above the baseline (>= 0)."""
        if self.device == "cuda":
            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - self.base)
        if self.reset_ok:
            peak = _status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, peak - self.base)


def cap_address_space(extra_mb: float) -> None:
    """Limit this process's address space to its current size plus ``extra_mb`` (RLIMIT_AS)."""
    vm_kb = _status_kb("VmSize") or 0
    limit = int(vm_kb * 1024 + extra_mb * 2 ** 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# ------------------------------------------------------------------ the cases (run in the child)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_case(task: dict) -> dict:
    """Time and peak memory of ``task["target"]`` at one N (runs in the case subprocess).

    Inputs ``[batch, heads, N, dim]`` Gaussian in ``task["dtype"]``.  After ``warmup``
    untimed calls, ``repeats`` timed ones (forward under ``no_grad``, or forward + backward
    of a fixed random output gradient).  Peak memory is measured over the first call after
    the warm-up (the first call when ``warmup = 0``), so one-time costs (``torch.compile``
    of a FlexAttention dispatch, caches) count neither in time nor memory; the first call's
    time is reported on its own as ``first_call_s``.  The memory call starts from a trimmed
    heap (and with scratch a method keeps between calls, the engine's and lsh's workspaces
    and the result pool's free blocks, freed, so its peak counts it): it pays page faults steady-state calls do not — for every method, ours and
    the peers' alike — so it is never one of the timed ones (its time: ``memory_call_s``).
    Returns ``{"status": "ok", "times": [...], "peak_mem_bytes": int, "first_call_s": float,
    "memory_call_s": float, "matmul_gflops": float`` (:func:`matmul_rate` measured in the
    case's process right after its timed calls),
    "backend": "engine" | "flexattention" | both joined by "+" | None (no block-sparse call)}``.
    """
    dev, dtype, backward = task["device"], TORCH_DTYPES[task["dtype"]], task["backward"]
    B, H, N, D, Dv = task["batch"], task["heads"], task["N"], task["dim"], task["dim_v"]
    q, k, v = make_inputs("gaussian", B, H, N, D, Dv, seed=0, dtype=dtype, device=dev)
    fn = build(task["target"], N=N, heads=H, dim=D, dim_v=Dv, causal=task["causal"], seed=0,
               device=dev, dtype=dtype)
    if backward:
        for t in (q, k, v):
            t.requires_grad_(True)
        g = torch.Generator().manual_seed(1)
        grad_out = torch.randn(B, H, N, Dv, generator=g).to(device=dev, dtype=dtype)

    def call():
        if backward:
            out = fn(q, k, v)
            out.backward(grad_out)
            for t in (q, k, v):
                t.grad = None
        else:
            with torch.no_grad():
                fn(q, k, v)
        _sync(dev)

    mem = PeakMemory(dev)
    first = None
    for _ in range(task["warmup"]):
        t0 = time.perf_counter()
        call()
        first = time.perf_counter() - t0 if first is None else first
    calls_before = dict(BACKEND_CALLS)
    # scratch a method keeps between calls (the engine's and lsh's workspaces, the engine's
    # kept tiles, the result pool's free blocks) counts in its peak: freed here, it is
    # allocated again inside the
    # memory-measured call -- whose time then
    # includes faulting those pages in, as does every method's memory call after the heap
    # trim in mem.start(): a cost steady-state calls never pay, so that call is left out of
    # the timed ones (and reported as memory_call_s)
    release_workspaces()
    clear_tile_cache()
    result_pool.release()
    mem.start()
    t0 = time.perf_counter()
    call()
    memory_call = time.perf_counter() - t0
    peak = mem.peak_above()
    times = []
    while len(times) < max(1, task["repeats"]):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    used = sorted(b for b, n in BACKEND_CALLS.items() if n > calls_before.get(b, 0))
    # the machine's matmul rate in this process right after the timed calls: the shared VM
    # swings +-30 % between minutes, so a run-wide probe taken minutes earlier would move
    # the efficiency column with the minute the case happened to run in
    probe = matmul_rate(MATMUL_PROBE_N, device=dev)
    return {"status": "ok", "times": times, "peak_mem_bytes": int(peak), "matmul_gflops": probe,
            "first_call_s": memory_call if first is None else first,
            "memory_call_s": memory_call,
            # block-sparse methods: which engine backend ran the timed calls (else None)
            "backend": "+".join(used) or None,
            "memory_probe": "cuda max_memory_allocated" if dev == "cuda"
            else ("VmHWM" if getattr(mem, "reset_ok", False) else "ru_maxrss")}


def accuracy_case(task: dict) -> dict:
    """Relative error of ``task["target"]`` vs the stored exact outputs (child process).

    ``task["refs"]`` maps family -> path of a ``torch.save``d dict ``{"out": [B,H,N,Dv]
    float64}``; the inputs are regenerated from ``task["input_seed"]``.  Random targets
    run once per seed in ``task["seeds"]``.  Returns ``{"status": "ok", "families":
    {family: {"seeds": [...], "max": [...], "mean": [...]}}}``.
    """
    dev, dtype = task["device"], TORCH_DTYPES[task["dtype"]]
    B, H, N, D, Dv = task["batch"], task["heads"], task["N"], task["dim"], task["dim_v"]
    fams = {}
    for family, path in task["refs"].items():
        ref = torch.load(path)["out"]
        q, k, v = make_inputs(family, B, H, N, D, Dv, seed=task["input_seed"], dtype=dtype, device=dev)
        res = {"seeds": [], "max": [], "mean": []}
        for seed in task["seeds"]:
            fn = build(task["target"], N=N, heads=H, dim=D, dim_v=Dv, causal=task["causal"],
                       seed=seed, device=dev, dtype=dtype)
            with torch.no_grad():
                out = fn(q, k, v)
            mx, mean = relative_errors(out, ref)
            res["seeds"].append(seed)
            res["max"].append(mx)
            res["mean"].append(mean)
        fams[family] = res
    return {"status": "ok", "families": fams}


_CASES: dict = {"time": time_case, "accuracy": accuracy_case}


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or any(m in str(e).lower() for m in _OOM_MARKERS)


def _child_main(task: dict, conn) -> None:
    """Subprocess body: set threads, malloc policy and memory cap, run the case, send the
    result dict."""
    try:
        if task.get("retain_freed_memory"):  # before the case allocates anything
            retain_freed_memory()
        if task.get("threads"):
            torch.set_num_threads(task["threads"])
        if task.get("max_memory_mb"):
            cap_address_space(task["max_memory_mb"])
        res = _CASES[task["mode"]](task)
    except NotApplicable as e:
        res = {"status": "n/a", "reason": str(e)}
    except (ValueError, TypeError) as e:  # the contract's argument errors: cannot run this case
        res = {"status": "n/a", "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    except BaseException as e:  # noqa: BLE001 - every failure becomes a recorded status
        if _is_oom(e):
            res = {"status": "oom", "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
        else:
            tb = traceback.extract_tb(e.__traceback__)
            where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
            msg = str(e).splitlines()[0] if str(e) else ""
            res = {"status": "error", "reason": f"{type(e).__name__}: {msg}{where}"[:400]}
    try:
        conn.send(res)
    finally:
        conn.close()


# ------------------------------------------------------------------ the parent side

_CTX = None


def _context():
    """The multiprocessing context: a forkserver with torch and effattn preloaded (Linux),
    else spawn."""
    global _CTX
    if _CTX is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _CTX = multiprocessing.get_context("forkserver")
            _CTX.set_forkserver_preload(["torch", "effattn", "effattn.bench.measure"])
        else:
            _CTX = multiprocessing.get_context("spawn")
    return _CTX


def run_isolated(task: dict, timeout: float) -> dict:
    """Run ``task`` in a fresh subprocess; kill it after ``timeout`` seconds.

    Returns the case's result dict plus ``"wall_s"``, or ``{"status": "timeout"|"oom"|"error",
    "reason": ...}`` when the subprocess could not report.
    """
    ctx = _context()
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child_main, args=(task, child), daemon=True)
    t0 = time.perf_counter()
    p.start()
    child.close()
    res: Optional[dict] = None
    try:
        if parent.poll(timeout):
            try:
                res = parent.recv()
            except EOFError:
                res = None
        else:
            p.kill()
            p.join()
            return {"status": "timeout", "reason": f"no result after {timeout:g} s (killed)",
                    "wall_s": time.perf_counter() - t0}
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
    finally:
        parent.close()
    wall = time.perf_counter() - t0
    if res is None:
        code = p.exitcode
        if code is not None and code < 0 and -code == 9:
            return {"status": "oom", "reason": "case process killed by SIGKILL (out of memory)", "wall_s": wall}
        return {"status": "error", "reason": f"case process died with exit code {code}", "wall_s": wall}
    res["wall_s"] = wall
    return res


def run_inline(task: dict) -> dict:
    """Run ``task`` in this process (no isolation, no timeout) - for debugging."""
    class _Conn:
        def send(self, r):
            self.r = r

        def close(self):
            pass

    c = _Conn()
    _child_main(task, c)
    return c.r


#: side of the square fp32 product whose rate is "the machine's matmul rate"
MATMUL_PROBE_N = 2048


def matmul_rate(n: int = MATMUL_PROBE_N, repeats: int = 3, device: str = "cpu") -> float:
    """Measured fp32 matmul rate of this machine in GFLOP/s (best of ``repeats`` ``n x n`` products)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best / 1e9

