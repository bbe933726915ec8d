"""Optional native kernels: small C functions compiled on first use and called with ctypes.

Some passes are memory-bound chains of torch operations that one loop does in a single
read: LSH hashing's ``argmax(concat[xR, -xR])`` took 8 passes over the projections (375 of
a ~920 ms forward at N = 65,536, 1,024 buckets, B=1, H=4 on the 2-core Xeon the
performance figures come from).  :func:`concat_argmax` does it in one pass, and
:func:`hash_buckets` also writes a slice's buckets with their round offsets straight into
the bucket tensor.  :func:`lsh_hash` fuses the projections too (``lsh_hash.c``: token
blocks against packed rotation panels in cache, the argmax down the columns with a token
per lane; 17.9 instead of 25.8 ms for the whole hash at N = 16,384, B=1, H=4, 4 rounds).
:func:`lsh_chunks` runs LSH attention's sorted chunks forward in one
fused loop (``lsh_chunks.c``): rows read through the sorted positions instead of gathered
copies, scores, masks, softmax and the product with the values in a thread's cache, each
row merged into its token's result (B=1, H=4, D=64, 4 rounds, N = 16,384: the sorted
attention with its round merges took ~80 ms, the kernel ~68 of it, against ~117 for the
torch groups; ~55 ms since its matmul blocks broadcast from memory, ``vec.h``).
:func:`lsh_chunks_backward` is its backward (``lsh_chunks_backward.c``): scores and
weights recomputed from the merged lse, the five tile products in a thread's cache, key
and value gradients gathered per key chunk (the same shape: 109 ms, against ~250 for the
torch groups).  :func:`block_sparse` and :func:`block_sparse_backward`
(``block_sparse.c``) are the block-sparse engine's float32 CPU forward and backward: each
query block's scores computed transposed against key and value rows read in place (no
gathered blocks), the softmax down the columns with a query per lane, masks from positions
and distance rules, everything in a thread's cache (B=1, H=4, D=64, N = 16,384: BigBird
forward 84 -> 50 ms, forward+backward 323 -> 180 ms).  :func:`efficient` and
:func:`efficient_backward` (``efficient.c``) are Shen et al.'s efficient attention, each
block of rows read once per pass instead of a chain of torch passes over it;
:func:`queries_over_landmarks` and :func:`landmarks_over_keys` (``landmarks.c``, with their
backwards) Nystromformer's two long products, the same way, and :func:`feature_attention`
(with its backward; ``feature_attention.c``) non-causal Performer (positive features),
linear and Taylor attention, and :func:`causal_feature_attention` (``causal_features.c``)
their causal forms (``feature_maps.h``: the feature maps both share)
(``rowblocks.h``: the row-block products and the row and column softmaxes these files
share).  Each kernel here has a pure-torch twin that
gives the same result (up to float rounding), used wherever the kernel is not available:

- no C compiler (``$CC``, else ``cc`` / ``gcc`` on ``PATH``), or it failed; not Linux or
  macOS;
- ``EFFATTN_NATIVE=0`` in the environment (read once per process);
- tensors the kernel does not take (not on the CPU, not float32/float64, not contiguous).

The library is compiled once per machine into ``$EFFATTN_CACHE_DIR`` (default
``$XDG_CACHE_HOME/effattn`` or ``~/.cache/effattn``; a temporary folder when that is not
writable), named by a digest of the source, the compiler, the flags and the CPU's
features (it is built with ``-march=native``), so a changed source or another machine's
CPU never loads a stale build.  :func:`status` says whether it loaded and why not.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from effattn.result_pool import pooled_empty, pooled_empty_like

__all__ = ["available", "status", "concat_argmax", "hash_buckets", "lsh_hash", "lsh_chunks",
           "lsh_chunks_backward", "block_sparse", "block_sparse_backward", "efficient",
           "efficient_backward", "queries_over_landmarks", "queries_over_landmarks_backward",
           "landmarks_over_keys", "landmarks_over_keys_backward", "nystrom_core",
           "nystrom_core_backward", "feature_attention", "feature_attention_backward",
           "causal_feature_attention", "causal_feature_attention_backward"]

#: the kernels' sources, compiled together into one library, and the headers they share
_SOURCES = sorted(Path(__file__).parent.glob("*.c"))
_HEADERS = sorted(Path(__file__).parent.glob("*.h"))
# unrolled reductions with several accumulators: 0.75x the time per 4 MB slice of 512-wide
# rows; gnu11 for the vector extensions of lsh_chunks.c
_FLAGS = ["-O3", "-march=native", "-funroll-loops", "-fvariable-expansion-in-unroller", "-shared",
          "-fPIC", "-std=gnu11"]
_OPENMP = ["-fopenmp"]
_reason = "not loaded yet"


def _disabled() -> bool:
    return os.environ.get("EFFATTN_NATIVE", "1").strip().lower() in ("0", "off", "false", "no")


def _compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or (cc if os.path.isfile(cc) else None)
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_features() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("flags", "model name", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("EFFATTN_CACHE_DIR")
    if base is None:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = os.path.join(xdg if xdg else os.path.join(os.path.expanduser("~"), ".cache"), "effattn")
    path = Path(base)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if os.access(path, os.W_OK):
            return path
    except OSError:
        pass
    path = Path(tempfile.gettempdir()) / f"effattn-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _build(cc: str) -> Path:
    """The compiled library's path (compiled now unless a build with the same digest is
    there); raises ``RuntimeError`` with the compiler's message when it cannot build."""
    source = b"\0".join(p.name.encode() + b"\0" + p.read_bytes() for p in _SOURCES + _HEADERS)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    errors = []
    for extra in (_OPENMP, []):  # without OpenMP the kernels run on one thread
        flags = _FLAGS + extra
        digest = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(),
                                            _cpu_features().encode()])).hexdigest()[:20]
        out = _cache_dir() / f"native-{digest}.so"
        if out.exists():
            return out
        # a private name first, then an atomic rename: concurrent processes never load a
        # half-written file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            res = subprocess.run([cc, *flags, *map(str, _SOURCES), "-o", tmp, "-lm"], capture_output=True,
                                 text=True, timeout=300)
            if res.returncode == 0:
                os.replace(tmp, out)
                return out
            errors.append(res.stderr.strip()[-500:])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("compiler failed: " + " | ".join(errors))


@functools.lru_cache(maxsize=None)
def _library():
    """The loaded kernels (``ctypes.CDLL``) or None (see :func:`status`)."""
    global _reason
    if _disabled():
        _reason = "disabled by EFFATTN_NATIVE"
        return None
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        _reason = f"not built on {sys.platform}"
        return None
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler (set CC, or install cc / gcc)"
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        _reason = f"build or load failed: {err}"
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for suffix in ("f32", "f64"):
        fn = getattr(lib, f"effattn_concat_argmax_{suffix}")
        fn.argtypes = [ptr, i64, i64, ptr, ctypes.c_int]
        fn.restype = None
        fn = getattr(lib, f"effattn_hash_buckets_{suffix}")
        fn.argtypes = [ptr, i64, i64, i64, i64, ptr, i64, i64, i64, ctypes.c_int]
        fn.restype = None
    fn = lib.effattn_lsh_hash_f32
    fn.argtypes = [ptr, ptr] + [i64] * 8 + [ptr, ctypes.c_int]
    fn.restype = None
    fn = lib.effattn_lsh_chunks_f32
    fn.argtypes = ([ptr] * 6 + [i64] * 8 + [ctypes.c_float, ctypes.c_int, ctypes.c_float, ctypes.c_int]
                   + [i64, i64, ptr, ptr, ctypes.c_int, ctypes.c_int])
    fn.restype = None
    fn = lib.effattn_lsh_chunks_backward_f32
    fn.argtypes = ([ptr] * 9 + [i64] * 8 + [ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_float,
                                            ctypes.c_int] + [ptr] * 3 + [ctypes.c_int])
    fn.restype = None
    fn = lib.effattn_block_sparse_f32
    fn.argtypes = [ptr] * 10 + [ctypes.c_float, ctypes.c_float, i64, ptr, ptr, ctypes.c_int]
    fn.restype = None
    fn = lib.effattn_block_sparse_backward_f32
    fn.argtypes = ([ptr] * 13 + [ctypes.c_float] * 3 + [ptr] * 3 + [ctypes.c_int, ctypes.c_int])
    fn.restype = None
    f32, cint = ctypes.c_float, ctypes.c_int
    # the row-block kernels: (q, k, v, validity, sizes..., scale or temperature, outputs...)
    for name, sizes, outs in (("efficient_f32", 6, 4), ("efficient_backward_f32", 6, 7),
                              ("queries_over_landmarks_f32", 7, 1),
                              ("queries_over_landmarks_backward_f32", 7, 4),
                              ("landmarks_over_keys_f32", 7, 3),
                              ("landmarks_over_keys_backward_f32", 7, 7)):
        fn = getattr(lib, f"effattn_{name}")
        fn.argtypes = [ptr] * 4 + [i64] * sizes + [f32] + [ptr] * outs + [cint]
        fn.restype = None
    for name, outs in (("nystrom_core_f32", 1), ("nystrom_core_backward_f32", 4)):
        fn = getattr(lib, f"effattn_{name}")
        fn.argtypes = [ptr] * 3 + [ptr, i64] * 2 + [i64] * 5 + [f32, i64] + [ptr] * outs + [cint]
        fn.restype = None
    for name, outs in (("feature_attention_f32", 4), ("feature_attention_backward_f32", 8),
                       ("causal_feature_attention_f32", 4), ("causal_feature_attention_backward_f32", 8)):
        fn = getattr(lib, f"effattn_{name}")
        fn.argtypes = [ptr] * 5 + [cint] + [i64] * 7 + [f32] + [ptr] * outs + [cint]
        fn.restype = None
    lib.effattn_lsh_vector_width.restype = ctypes.c_int
    _reason = "loaded"
    return lib


def available() -> bool:
    """Whether the native kernels are loaded (compiling them on the first call)."""
    return _library() is not None


def status() -> str:
    """``"loaded"``, or why the native kernels are not used (after :func:`available`)."""
    _library()
    return _reason


def _serves(lib, x: torch.Tensor) -> bool:
    """Whether the kernels take ``x [..., h]``: loaded, float32/float64, contiguous, on the
    CPU, no gradient, ``0 < h < 2^31``."""
    h = x.shape[-1] if x.dim() else 0
    return (lib is not None and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.is_contiguous() and 0 < h < 2 ** 31 and not x.requires_grad)


def concat_argmax(x: torch.Tensor) -> Optional[torch.Tensor]:
    """``argmax(concat[x, -x], -1)`` of ``x [..., h]`` (float32/float64, contiguous, on the
    CPU) -> long ``[...]`` (first maximum wins; a row holding NaN gives some index in
    ``[0, 2h)``), or None where the kernel does not serve (not loaded, or such a tensor)."""
    lib = _library()
    if not _serves(lib, x):
        return None
    h = x.shape[-1]
    out = torch.empty(x.shape[:-1], dtype=torch.long)
    rows = out.numel()
    if rows:
        fn = lib.effattn_concat_argmax_f32 if x.dtype == torch.float32 else lib.effattn_concat_argmax_f64
        fn(x.data_ptr(), rows, h, out.data_ptr(), torch.get_num_threads())
    return out


def hash_buckets(x: torch.Tensor, out: torch.Tensor, per_round: int) -> bool:
    """LSH buckets of a slice of projections, written into ``out``: ``x [BH, n, R, h]``
    (as :func:`concat_argmax` takes) and long ``out [BH, R, n]`` (any strides, e.g. columns
    of the whole ``[BH, R, N]`` bucket tensor) get ``out[b, r, t] = argmax(concat[x[b, t,
    r], -x[b, t, r]]) + r * per_round``.  Returns False (``out`` untouched) where the
    kernel does not serve."""
    lib = _library()
    if (not _serves(lib, x) or x.dim() != 4 or out.dtype != torch.long or out.device.type != "cpu"
            or tuple(out.shape) != (x.shape[0], x.shape[2], x.shape[1]) or out.stride(2) != 1):
        return False
    BH, n, R, h = x.shape
    if x.numel():
        fn = lib.effattn_hash_buckets_f32 if x.dtype == torch.float32 else lib.effattn_hash_buckets_f64
        fn(x.data_ptr(), BH, n, R, h, out.data_ptr(), out.stride(0), out.stride(1), per_round,
           torch.get_num_threads())
    return True


#: bytes of one thread's block of projections in lsh_hash (a round's columns for a block of
#: tokens, kept in cache while its rows are reduced)
HASH_BLOCK_BYTES = 128 * 1024


def lsh_hash(x: torch.Tensor, rotations: torch.Tensor, per_round: int) -> Optional[torch.Tensor]:
    """LSH buckets with the projections fused (``lsh_hash.c``): ``x [B, H, N, D]`` (or any
    leading dims, flattened to ``BH``) float32, contiguous; ``rotations [D, R, h]`` or per
    head ``[H, D, R, h]`` (the last leading dim of ``x`` is the head) -> long ``[B, H, R,
    N]`` with ``argmax(concat[x_t R_r, -x_t R_r]) + r * per_round``, or None where it does not
    serve (not loaded, not float32 on the CPU, gradients wanted, ``h`` not a multiple of 4).  The projections are summed in another order than torch's matmul: a
    near-tie (two projections within float rounding) may pick the other bucket."""
    lib = _library()
    if lib is None or x.dim() < 2:
        return None
    N, D = x.shape[-2:]
    D_r, R, h = rotations.shape[-3:]
    lead = x.shape[:-2]
    per_head = rotations.dim() == 4
    vw = lib.effattn_lsh_vector_width()
    if (any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
            or (torch.is_grad_enabled() and t.requires_grad) for t in (x, rotations))
            or rotations.dim() not in (3, 4) or D_r != D or h % 4 or N >= 2 ** 31
            or (per_head and (len(lead) < 1 or lead[-1] != rotations.shape[0]))):
        return None
    BH = math.prod(lead)
    out = torch.empty(*lead, R, N, dtype=torch.long)
    rb = max(vw, min(64, HASH_BLOCK_BYTES // (4 * h)) // vw * vw)  # tokens per block
    if out.numel():
        lib.effattn_lsh_hash_f32(x.data_ptr(), rotations.data_ptr(), BH, N, D, R, h,
                                 rotations.shape[0] if per_head else 1, per_round, rb,
                                 out.data_ptr(), torch.get_num_threads())
    return out


def lsh_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
               k_pos: torch.Tensor, k_valid: Optional[torch.Tensor], *, chunk_len: int,
               before: int, after: int, qscale: float, exclude_self: bool, penalty: float,
               causal: bool, first: int, count: int, out: torch.Tensor, lse: torch.Tensor,
               merge: bool) -> bool:
    """LSH attention's sorted chunks ``first .. first + count - 1`` forward, fused
    (``lsh_chunks.c``; :func:`effattn.mechanisms.lsh._group_forward` with the round merge
    of :func:`effattn.softmax.merge_pair_` is its torch twin).

    ``q, k [B, H, n, D]``, ``v [B, H, n, Dv]`` float32 (contiguous, original order);
    ``q_pos, k_pos`` long ``[B|1, H|1, R * n]``: the original position of each sorted slot;
    ``k_valid`` bool ``[B|1, 1|H, n]`` or None.  Each query chunk ``g`` (``chunk_len`` sorted
    slots; the range must hold each token at most once, e.g. one round's chunks) attends
    the keys of chunks ``g - before .. g + after`` (cyclic over the ``R * n / chunk_len``
    chunks, at least ``1 + before + after`` of them) with scores ``qscale · q·k`` in base-2
    units, ``penalty`` subtracted at a query's own position (``exclude_self``), later keys
    masked (``causal``), invalid keys masked.  Each query's normalized output and natural
    log-sum-exp (zeros and ``-inf`` for a row with no key) go to its token's row of ``out
    [B, H, n, Dv]`` and ``lse [B, H, n]`` (float32, contiguous): written, or with
    ``merge`` merged into what is there (log-sum-exp weights).  Returns False (nothing
    written) where the kernel does not serve: not loaded, not float32 on the CPU,
    gradients wanted, ``chunk_len``, ``D`` or ``Dv`` not a multiple of the kernel's vector
    width (16 with AVX-512, else 8), or too few chunks."""
    lib = _library()
    if lib is None:
        return False
    B, H, n, D = q.shape
    Dv = v.shape[-1]
    L = q_pos.shape[-1]
    vw = lib.effattn_lsh_vector_width()
    if (any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
            for t in (q, k, v, out, lse))
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))
            or tuple(k.shape) != (B, H, n, D) or tuple(v.shape[:3]) != (B, H, n)
            or tuple(out.shape) != (B, H, n, Dv) or tuple(lse.shape) != (B, H, n)
            or chunk_len % vw or D % vw or Dv % vw or L % n or L % chunk_len
            or L // chunk_len < 1 + before + after or n >= 2 ** 31
            or not 0 <= first <= first + count <= L // chunk_len):
        return False
    qp = q_pos.expand(B, H, L).contiguous()
    kp = qp if k_pos is q_pos else k_pos.expand(B, H, L).contiguous()
    kv = None if k_valid is None else k_valid.expand(B, H, n).contiguous()
    lib.effattn_lsh_chunks_f32(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), qp.data_ptr(), kp.data_ptr(),
        None if kv is None else kv.data_ptr(), B * H, n, L // n, chunk_len, before, after, D, Dv,
        qscale, int(exclude_self), penalty, int(causal), first, count, out.data_ptr(),
        lse.data_ptr(), int(merge), torch.get_num_threads())
    return True


def lsh_chunks_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                        k_pos: torch.Tensor, k_valid: Optional[torch.Tensor], lse2: torch.Tensor,
                        delta: torch.Tensor, dout: torch.Tensor, *, chunk_len: int, before: int,
                        after: int, qscale: float, scale: float, exclude_self: bool,
                        penalty: float, causal: bool, dq: torch.Tensor, dk: torch.Tensor,
                        dv: torch.Tensor) -> bool:
    """The gradients of :func:`lsh_chunks` over every round's sorted chunks, fused
    (``lsh_chunks_backward.c``; :func:`effattn.mechanisms.lsh._group_backward` is its torch
    twin), added to ``dq, dk [B, H, n, D]`` and ``dv [B, H, n, Dv]`` (float32, contiguous).

    ``q, k, v, q_pos, k_pos, k_valid, chunk_len, before, after, qscale, exclude_self,
    penalty, causal`` as :func:`lsh_chunks` takes them (here for all ``R`` rounds at once);
    ``lse2 [B, H, n]``: the merged log-sum-exp in base-2 units (0 where a row has no key);
    ``delta [B, H, n]``: ``rowsum(dout * out)`` minus the lse's gradient; ``dout [B, H, n,
    Dv]``; ``scale``: the softmax scale.  Each (batch, head) runs on one thread, so it
    declines (returns False, nothing written) with fewer (batch, head)s than torch's
    threads, as well as where :func:`lsh_chunks` declines."""
    lib = _library()
    if lib is None:
        return False
    B, H, n, D = q.shape
    Dv = v.shape[-1]
    L = q_pos.shape[-1]
    vw = lib.effattn_lsh_vector_width()
    threads = torch.get_num_threads()
    if (any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
            for t in (q, k, v, lse2, delta, dout, dq, dk, dv))
            or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, dout)))
            or tuple(k.shape) != (B, H, n, D) or tuple(v.shape[:3]) != (B, H, n)
            or tuple(dout.shape) != (B, H, n, Dv) or tuple(lse2.shape) != (B, H, n)
            or tuple(delta.shape) != (B, H, n) or dq.shape != q.shape or dk.shape != k.shape
            or dv.shape != v.shape or B * H < threads
            or chunk_len % vw or D % vw or Dv % vw or L % n or L % chunk_len
            or L // chunk_len < 1 + before + after or n >= 2 ** 31):
        return False
    qp = q_pos.expand(B, H, L).contiguous()
    kp = qp if k_pos is q_pos else k_pos.expand(B, H, L).contiguous()
    kv = None if k_valid is None else k_valid.expand(B, H, n).contiguous()
    lib.effattn_lsh_chunks_backward_f32(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), qp.data_ptr(), kp.data_ptr(),
        None if kv is None else kv.data_ptr(), lse2.data_ptr(), delta.data_ptr(), dout.data_ptr(),
        B * H, n, L // n, chunk_len, before, after, D, Dv, qscale, scale, int(exclude_self),
        penalty, int(causal), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), threads)
    return True


#: bytes of one query block's transposed scores per online-softmax step of block_sparse
#: (a step's slots: as many key blocks as fit, kept in cache)
BLOCK_SPARSE_STEP_BYTES = 256 * 1024


def _bh_strided(x: torch.Tensor, B: int, H: int):
    """``x [B|1, H|1, ...]`` contiguous with its batch and head strides (0 where broadcast)."""
    x = x.contiguous()
    return x, (x.stride(0) if x.shape[0] > 1 else 0), (x.stride(1) if x.shape[1] > 1 else 0)


def _row_strides(x: torch.Tensor, B: int, H: int):
    """Batch and head strides of ``x [B, H, N, F]`` (0 where B or H is 1), or None when its
    rows are not contiguous."""
    if x.dim() != 4 or (x.shape[2] > 1 and x.stride(2) != x.shape[3]) or (x.shape[3] > 1 and x.stride(3) != 1):
        return None
    return (x.stride(0) if B > 1 else 0), (x.stride(1) if H > 1 else 0)


def _block_sparse_config(q, k, v, o, dq, dk, dv, stats, rows, kv_blocks, block, q_pos, k_pos,
                         k_valid, full_slots, causal, exclude_self, distance, grads):
    """The library and ``(config, kept tensors)`` of one block_sparse call, or None where the
    kernels do not serve those tensors (see :func:`block_sparse`).  ``o``: the output
    (forward) or its gradient (backward); ``stats``: per-row tensors ``[B, H, N]`` (None:
    not passed), which must be float32 and contiguous; ``rows``: the row map or None."""
    lib = _library()
    if lib is None or q.dim() != 4:
        return None
    B, H, N, D = q.shape
    if any(t is not None and (t.dtype != torch.float32 or not t.is_contiguous()
                              or t.device.type != "cpu" or tuple(t.shape) != (B, H, N))
           for t in stats):
        return None
    NQ, NK, Dv = N, k.shape[2], v.shape[-1]
    if rows is not None:  # engine rows map to rows of q, k, v (all of one length)
        if (rows.dim() != 1 or rows.dtype != torch.long or rows.device.type != "cpu"
                or NK != N or (rows.numel() and not -1 <= int(rows.min()) <= int(rows.max()) < N)):
            return None
        rows = rows.contiguous()
        NQ = NK = rows.numel()
    vw = lib.effattn_lsh_vector_width()
    row_tensors = (q, k, v, o) + ((dq, dk, dv) if grads else ())
    strides = [_row_strides(t, B, H) for t in row_tensors]
    tensors = row_tensors + (q_pos, k_pos) + tuple(t for t in (kv_blocks, k_valid, full_slots) if t is not None)
    if (None in strides or any(t.device.type != "cpu" for t in tensors)
            or any(t.dtype != torch.float32 for t in row_tensors)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in row_tensors))
            or tuple(k.shape[:2]) != (B, H) or k.shape[3] != D or v.shape[:3] != k.shape[:3]
            or tuple(o.shape) != (B, H, N, Dv)
            or (grads and (dq.shape != q.shape or dk.shape != k.shape or dv.shape != v.shape))
            or block % vw or D % vw or Dv % vw or NQ % block or NK % block
            or max(NQ, NK) >= 2 ** 31 or (grads and B * H < torch.get_num_threads())):
        return None
    nqb, nkb = NQ // block, NK // block
    lay = None
    if kv_blocks is not None:
        if kv_blocks.dim() != 4 or kv_blocks.shape[0] not in (1, B) or kv_blocks.shape[1] not in (1, H) \
                or kv_blocks.shape[2] != nqb:
            return None
        lay, lay_sb, lay_sh = _bh_strided(kv_blocks.long(), B, H)
        S = lay.shape[-1]
    else:
        lay_sb = lay_sh = 0
        S = nkb
    full, full_sb, full_sh = None, 0, 0
    if full_slots is not None and kv_blocks is not None:
        shape = torch.broadcast_shapes(full_slots.shape, kv_blocks.shape)
        full, full_sb, full_sh = _bh_strided(full_slots.to(torch.bool).expand(shape), B, H)
    qp, qp_sb, qp_sh = _bh_strided(q_pos.long(), B, H)
    kp, kp_sb, kp_sh = _bh_strided(k_pos.long(), B, H)
    if qp.shape[-1] != NQ or kp.shape[-1] != NK:
        return None
    kv, kv_sb, kv_sh = (None, 0, 0) if k_valid is None else _bh_strided(k_valid.to(torch.bool), B, H)
    band, dil, offdiag = (-1, 1, False) if distance is None else distance
    strides += [(0, 0)] * (7 - len(strides))
    cf = torch.tensor([B, H, nqb, nkb, S, block, D, Dv, lay_sb, lay_sh, full_sb, full_sh, qp_sb,
                       qp_sh, kp_sb, kp_sh, kv_sb, kv_sh, *[x for st in strides for x in st],
                       int(causal), int(exclude_self), band, dil, int(offdiag), N], dtype=torch.long)
    return lib, (cf, lay, full, qp, kp, kv, rows)


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_blocks: Optional[torch.Tensor], *, block: int, q_pos: torch.Tensor,
                 k_pos: torch.Tensor, k_valid: Optional[torch.Tensor],
                 full_slots: Optional[torch.Tensor], qscale: float, causal: bool,
                 exclude_self: bool, penalty: float, distance, out: torch.Tensor,
                 lse: Optional[torch.Tensor], rows: Optional[torch.Tensor] = None) -> bool:
    """The block-sparse engine's forward, fused (``block_sparse.c``;
    :func:`effattn.mechanisms.blocksparse._forward` is its torch twin).

    ``q [B, H, NQ, D]``, ``k [B, H, NK, D]``, ``v [B, H, NK, Dv]`` float32 (rows
    contiguous: row ranges of larger tensors are fine), ``NQ``, ``NK`` multiples of
    ``block`` (square blocks).  Query block ``g`` sees key blocks ``kv_blocks [B|1, H|1,
    NQ/block, S]`` (long, ``-1`` empty) or, with ``None``, every key block.  Positions
    ``q_pos [B|1, H|1, NQ]``, ``k_pos [B|1, H|1, NK]`` (long), ``k_valid`` bool ``[B|1, H|1,
    NK]`` or None; ``full_slots`` bool broadcastable to ``kv_blocks`` (slots needing no
    masking) or None; scores ``qscale · q·k`` in base-2 units; ``causal``; shared-QK
    ``exclude_self`` with ``penalty`` (base-2 units); ``distance = (band, dilation,
    off_diagonal)`` (:func:`effattn.masks.distance_rule`) or None.  Writes the normalized
    rows into ``out [B, H, NQ, Dv]`` (float32, rows contiguous) and the natural
    log-sum-exp into ``lse [B, H, NQ]`` (contiguous, or None: not wanted); rows with no
    allowed key get zeros and ``-inf``.

    ``rows`` long ``[L]`` (a permuted order, e.g. residue classes): the engine runs on
    ``L`` rows, engine row ``s`` being row ``rows[s]`` of ``q, k, v`` (all ``[B, H, N, .]``)
    and of ``out``, ``lse`` (``[B, H, N, Dv]``, ``[B, H, N]``: the original order); ``-1``
    marks a padding slot (read as zeros, never written: ``k_valid`` must mask it as a key).
    Positions, validity and the layout are then the engine rows' (length ``L``); rows of
    ``out`` no slot holds are left as they are.

    Returns False (nothing written) where it does not serve: not loaded, not float32 on the
    CPU, gradients wanted, ``block``, ``D`` or ``Dv`` not a multiple of the vector width (16
    with AVX-512, else 8)."""
    got = _block_sparse_config(q, k, v, out, None, None, None, (lse,), rows, kv_blocks, block, q_pos,
                               k_pos, k_valid, full_slots, causal, exclude_self, distance,
                               grads=False)
    if got is None:
        return False
    lib, (cf, lay, full, qp, kp, kv, rows) = got
    chunk = max(1, BLOCK_SPARSE_STEP_BYTES // (4 * block * block))
    if qp.shape[-1]:
        lib.effattn_block_sparse_f32(cf.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                     _ptr(lay), _ptr(full), qp.data_ptr(), kp.data_ptr(), _ptr(kv),
                                     _ptr(rows), qscale, penalty, chunk, out.data_ptr(), _ptr(lse),
                                     torch.get_num_threads())
    return True


def block_sparse_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          kv_blocks: Optional[torch.Tensor], *, block: int, q_pos: torch.Tensor,
                          k_pos: torch.Tensor, k_valid: Optional[torch.Tensor],
                          full_slots: Optional[torch.Tensor], qscale: float, scale: float,
                          causal: bool, exclude_self: bool, penalty: float, distance,
                          lse2: torch.Tensor, delta: torch.Tensor, dout: torch.Tensor,
                          dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                          add_dq: bool, rows: Optional[torch.Tensor] = None) -> bool:
    """The gradients of :func:`block_sparse` (``block_sparse.c``;
    :func:`effattn.mechanisms.blocksparse._backward` is its torch twin): added into ``dk
    [B, H, NK, D]``, ``dv [B, H, NK, Dv]`` and (``add_dq``) added into or (else) written to
    ``dq [B, H, NQ, D]`` (float32, rows contiguous).  Arguments as :func:`block_sparse`, plus
    ``lse2 [B, H, NQ]``: the log-sum-exp in base-2 units (0 where a row has no key);
    ``delta [B, H, NQ]``: ``rowsum(dout * out) - dlse``; ``dout [B, H, NQ, Dv]``; ``scale``:
    the softmax scale; ``rows`` as :func:`block_sparse` takes it (the gradients, ``dout``,
    ``lse2`` and ``delta`` then in the original order too).  Each (batch, head) runs on one
    thread: it declines (False, nothing
    written) with fewer (batch, head)s than torch's threads, as well as where
    :func:`block_sparse` declines."""
    got = _block_sparse_config(q, k, v, dout, dq, dk, dv, (lse2, delta), rows, kv_blocks, block, q_pos,
                               k_pos, k_valid, full_slots, causal, exclude_self, distance,
                               grads=True)
    if got is None:
        return False
    lib, (cf, lay, full, qp, kp, kv, rows) = got
    if qp.shape[-1]:
        lib.effattn_block_sparse_backward_f32(
            cf.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(lay), _ptr(full),
            qp.data_ptr(), kp.data_ptr(), _ptr(kv), _ptr(rows), lse2.data_ptr(), delta.data_ptr(),
            dout.data_ptr(), qscale, scale, penalty, dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
            int(add_dq), torch.get_num_threads())
    return True


def _efficient_config(q, k, v, k_valid, more=()):
    """The library and the ``[B, Nk]`` byte validity (or None) of one efficient-attention
    call, or None where the kernels do not serve these tensors (see :func:`efficient`)."""
    lib = _library()
    if lib is None or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    vw = lib.effattn_lsh_vector_width()
    tensors = (q, k, v) + tuple(more)
    if (any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            or tuple(k.shape) != (B, H, Nk, D) or tuple(v.shape[:3]) != (B, H, Nk)
            or D % vw or Dv % vw or Nq < 1 or Nk < 1 or B * H < 1 or max(Nq, Nk) >= 2 ** 31):
        return None
    kv = None
    if k_valid is not None:
        if (k_valid.dtype != torch.bool or k_valid.dim() != 2 or k_valid.shape[0] != B
                or k_valid.shape[1] < Nk or k_valid.device.type != "cpu"):
            return None
        kv = k_valid[:, :Nk].contiguous()
    return lib, kv


def efficient(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_valid: Optional[torch.Tensor],
              t: float):
    """Shen et al.'s efficient attention forward, fused (``efficient.c``;
    :func:`effattn.mechanisms.kernel._efficient_stream` is its torch twin).

    ``q [B, H, Nq, D]``, ``k [B, H, Nk, D]``, ``v [B, H, Nk, Dv]`` float32 contiguous,
    ``k_valid`` bool ``[B, >= Nk]`` (True = a real key; its first ``Nk`` columns are read)
    or None, ``t > 0`` the temperature ->
    ``(out [B, H, Nq, Dv], c [B, H, 1, D], z [B, H, 1, D], C [B, H, D, Dv])``: the output
    ``softmax_features(t q) C`` and the statistics the backward takes (``c`` the keys'
    per-feature shift ``t · max``, ``z`` the sums of their weights, ``C = sum_j e_j^T v_j /
    z``).  None where it does not serve: not loaded, not float32 contiguous on the CPU,
    gradients wanted, ``D`` or ``Dv`` not a multiple of the vector width (16 with AVX-512,
    else 8), an empty side."""
    got = _efficient_config(q, k, v, k_valid)
    if got is None:
        return None
    lib, kv = got
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    out = pooled_empty((B, H, Nq, Dv))
    c, z = pooled_empty((B, H, 1, D)), pooled_empty((B, H, 1, D))
    C = pooled_empty((B, H, D, Dv))
    lib.effattn_efficient_f32(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(kv), B * H, H, Nq, Nk,
                              D, Dv, t, out.data_ptr(), c.data_ptr(), z.data_ptr(), C.data_ptr(),
                              torch.get_num_threads())
    return out, c, z, C


def efficient_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       k_valid: Optional[torch.Tensor], t: float, c: torch.Tensor, z: torch.Tensor,
                       C: torch.Tensor, dout: torch.Tensor, need=(True, True, True)):
    """The gradients of :func:`efficient` (``efficient.c``; the backward of
    :class:`effattn.mechanisms.kernel._EfficientAttention` is its torch twin): ``c, z, C``
    as :func:`efficient` returns them, ``dout [B, H, Nq, Dv]`` -> ``(dq, dk, dv)``, fresh
    tensors (None for those ``need`` does not ask for), or None where it does not serve
    (as :func:`efficient`; the statistics too must be float32 contiguous)."""
    got = _efficient_config(q, k, v, k_valid, (c, z, C, dout))
    if got is None:
        return None
    lib, kv = got
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    if (tuple(c.shape) != (B, H, 1, D) or tuple(z.shape) != (B, H, 1, D)
            or tuple(C.shape) != (B, H, D, Dv) or tuple(dout.shape) != (B, H, Nq, Dv)):
        return None
    grads = [pooled_empty_like(x) if want else None for x, want in zip((q, k, v), need)]
    lib.effattn_efficient_backward_f32(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(kv), B * H, H, Nq, Nk, D, Dv, t, c.data_ptr(),
        z.data_ptr(), C.data_ptr(), dout.data_ptr(), *map(_ptr, grads), torch.get_num_threads())
    return tuple(grads)


def _landmarks_config(q, k, v, key_valid, short: str, more=()):
    """The library, the validity bytes and their batch stride of one landmarks call, or
    None where the kernels do not serve these tensors (see :func:`queries_over_landmarks`);
    ``short``: which side has the ``L`` landmarks ("k": queries over landmarks, "q":
    landmarks over keys)."""
    lib = _library()
    if lib is None or q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return None
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    L = Nk if short == "k" else Nq
    vw = lib.effattn_lsh_vector_width()
    tensors = (q, k, v) + tuple(more)
    if (any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() for t in tensors)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
            or tuple(k.shape) != (B, H, Nk, D) or tuple(v.shape[:3]) != (B, H, Nk)
            or D % vw or Dv % vw or L % vw or min(Nq, Nk, B * H) < 1 or max(Nq, Nk) >= 2 ** 31):
        return None
    if key_valid is None:
        return lib, None, 0
    if (key_valid.dtype != torch.bool or key_valid.device.type != "cpu" or key_valid.dim() != 4
            or key_valid.shape[0] not in (1, B) or tuple(key_valid.shape[1:]) != (1, 1, Nk)):
        return None  # per-head or per-query masks: the torch twin
    kv = key_valid.reshape(key_valid.shape[0], Nk).contiguous()
    return lib, kv, (Nk if key_valid.shape[0] > 1 else 0)


def _landmarks_call(got, name, q, k, v, short: str, scale, *tensors) -> None:
    """Calls kernel ``effattn_<name>_f32`` of landmarks.c: (q, k, v, validity, its batch
    stride, BH, H, N, L, D, Dv, scale, ``tensors``..., threads)."""
    lib, kv, kv_sb = got
    B, H = q.shape[:2]
    n, L = (q.shape[2], k.shape[2]) if short == "k" else (k.shape[2], q.shape[2])
    getattr(lib, f"effattn_{name}_f32")(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(kv), kv_sb, B * H, H, n, L, q.shape[3],
        v.shape[3], scale, *(t.data_ptr() for t in tensors), torch.get_num_threads())


def queries_over_landmarks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           key_valid: Optional[torch.Tensor], scale: float) -> Optional[torch.Tensor]:
    """``softmax(scale · q k^T) v`` for ``N`` queries over ``L`` landmark keys, fused
    (``landmarks.c``; :class:`effattn.mechanisms._landmarks._QueriesOverLandmarks` is its
    torch twin): ``q [B, H, N, D]``, ``k [B, H, L, D]``, ``v [B, H, L, Dv]`` float32
    contiguous, ``key_valid`` bool ``[B|1, 1, 1, L]`` or None -> ``out [B, H, N, Dv]`` (a
    query with no valid key: zeros).  None where it does not serve: not loaded, not
    float32 contiguous on the CPU, gradients wanted, ``L``, ``D`` or ``Dv`` not a multiple
    of the vector width (16 with AVX-512, else 8), an empty side, another mask shape."""
    got = _landmarks_config(q, k, v, key_valid, "k")
    if got is None:
        return None
    out = pooled_empty((*q.shape[:3], v.shape[-1]))
    _landmarks_call(got, "queries_over_landmarks", q, k, v, "k", scale, out)
    return out


def queries_over_landmarks_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    key_valid: Optional[torch.Tensor], scale: float,
                                    dout: torch.Tensor, dq: torch.Tensor):
    """The gradients of :func:`queries_over_landmarks` for ``dout [B, H, N, Dv]``: ``dq``
    (float32 contiguous, ``N · D`` elements a (batch, head), any shape) written, ``(dk, dv)``
    returned; None (nothing written) where it does not serve."""
    got = _landmarks_config(q, k, v, key_valid, "k", (dout,))
    if got is None or tuple(dout.shape) != (*q.shape[:3], v.shape[-1]) or dq.dtype != torch.float32 \
            or not dq.is_contiguous() or dq.numel() != q.numel():
        return None
    dk, dv = pooled_empty_like(k), pooled_empty_like(v)
    _landmarks_call(got, "queries_over_landmarks_backward", q, k, v, "k", scale, dout, dq, dk, dv)
    return dk, dv


def landmarks_over_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_valid: Optional[torch.Tensor], scale: float):
    """``softmax(scale · q k^T) v`` for ``L`` landmark queries over ``N`` keys, fused
    (``landmarks.c``; :class:`effattn.mechanisms._landmarks._LandmarksOverKeys` is its
    torch twin): ``q [B, H, L, D]``, ``k [B, H, N, D]``, ``v [B, H, N, Dv]`` float32
    contiguous, ``key_valid`` bool ``[B|1, 1, 1, N]`` or None -> ``(out [B, H, L, Dv], m, z
    [B, H, L])``: the output and each landmark's base-2 score maximum (``-inf``: no valid
    key) and weight sum, which :func:`landmarks_over_keys_backward` takes.  Nothing ``[L,
    N]`` is kept.  None where it does not serve (as :func:`queries_over_landmarks`)."""
    got = _landmarks_config(q, k, v, key_valid, "q")
    if got is None:
        return None
    out = pooled_empty((*q.shape[:3], v.shape[-1]))
    m, z = pooled_empty(q.shape[:3]), pooled_empty(q.shape[:3])
    _landmarks_call(got, "landmarks_over_keys", q, k, v, "q", scale, out, m, z)
    return out, m, z


def landmarks_over_keys_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 key_valid: Optional[torch.Tensor], scale: float, out: torch.Tensor,
                                 m: torch.Tensor, z: torch.Tensor, dout: torch.Tensor,
                                 dk: torch.Tensor):
    """The gradients of :func:`landmarks_over_keys` from its ``out, m, z`` and ``dout [B,
    H, L, Dv]``: ``dk`` (float32 contiguous, ``N · D`` elements a (batch, head), any shape)
    written, ``(dq, dv)`` returned; None (nothing written) where it does not serve."""
    got = _landmarks_config(q, k, v, key_valid, "q", (out, m, z, dout))
    B, H, L, D = q.shape
    if (got is None or tuple(dout.shape) != tuple(out.shape) or tuple(out.shape) != (B, H, L, v.shape[-1])
            or tuple(m.shape) != (B, H, L) or tuple(z.shape) != (B, H, L) or dk.dtype != torch.float32
            or not dk.is_contiguous() or dk.numel() != k.numel()):
        return None
    dq, dv = pooled_empty_like(q), pooled_empty_like(v)
    _landmarks_call(got, "landmarks_over_keys_backward", q, k, v, "q", scale, out, m, z, dout, dq, dk, dv)
    return dq, dv


def _core_config(ql, kl, k3v, k_valid, q_valid, more=()):
    """The library and the two validity rows (uint8 ``[B|1, L]`` or None) with their batch
    strides for a :func:`nystrom_core` call, or None where the kernel does not serve."""
    lib = _library()
    if lib is None or ql.dim() != 4:
        return None
    B, H, L, D = ql.shape
    Dv = k3v.shape[-1]
    vw = lib.effattn_lsh_vector_width()
    if (any(t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous()
            for t in (ql, kl, k3v) + tuple(more))
            or tuple(kl.shape) != (B, H, L, D) or tuple(k3v.shape) != (B, H, L, Dv)
            or L % vw or D % vw or Dv % vw or min(L, B * H) < 1):
        return None
    rows = []
    for m in (k_valid, q_valid):
        if m is None:
            rows += [None, 0]
            continue
        if (m.dtype != torch.bool or m.device.type != "cpu" or m.dim() != 2
                or m.shape[0] not in (1, B) or m.shape[1] != L):
            return None
        rows += [m.contiguous().view(torch.uint8), L if m.shape[0] > 1 else 0]
    return lib, rows


def nystrom_core_serves(ql, kl, k3v, k_valid, q_valid) -> bool:
    """Whether :func:`nystrom_core` runs natively for these tensors."""
    return _core_config(ql, kl, k3v, k_valid, q_valid) is not None


def nystrom_core(ql: torch.Tensor, kl: torch.Tensor, k3v: torch.Tensor,
                 k_valid: Optional[torch.Tensor], q_valid: Optional[torch.Tensor], scale: float,
                 iters: int) -> Optional[torch.Tensor]:
    """Nyströmformer's landmark part ``pinv(softmax(scale · ql kl^T)) k3v`` fused
    (``nystrom_core.c``; :func:`effattn.mechanisms.lowrank.nystrom_core` has the torch twin):
    ``ql, kl [B, H, L, D]``, ``k3v [B, H, L, Dv]`` float32 contiguous, ``k_valid`` /
    ``q_valid`` bool ``[B|1, L]`` or None (False: an empty key / query landmark: a column
    left out of the softmax / a row zeroed) -> ``w [B, H, L, Dv]``.  None where it does not
    serve: not loaded, not float32 contiguous on the CPU, ``L``, ``D`` or ``Dv`` not a
    multiple of the vector width."""
    got = _core_config(ql, kl, k3v, k_valid, q_valid)
    if got is None:
        return None
    lib, (kc, kc_sb, qr, qr_sb) = got
    B, H, L, D = ql.shape
    w = pooled_empty((B, H, L, k3v.shape[-1]))
    lib.effattn_nystrom_core_f32(ql.data_ptr(), kl.data_ptr(), k3v.data_ptr(), _ptr(kc), kc_sb, _ptr(qr),
                                 qr_sb, B * H, H, L, D, k3v.shape[-1], scale, iters, w.data_ptr(),
                                 torch.get_num_threads())
    return w


def nystrom_core_backward(ql: torch.Tensor, kl: torch.Tensor, k3v: torch.Tensor,
                          k_valid: Optional[torch.Tensor], q_valid: Optional[torch.Tensor],
                          scale: float, iters: int, dw: torch.Tensor):
    """The gradients ``(dql, dkl, dk3v)`` of :func:`nystrom_core` for ``dw [B, H, L, Dv]``
    (the forward is run again inside); None where it does not serve."""
    got = _core_config(ql, kl, k3v, k_valid, q_valid, (dw,))
    if got is None or dw.shape != k3v.shape:
        return None
    lib, (kc, kc_sb, qr, qr_sb) = got
    B, H, L, D = ql.shape
    dql, dkl, dk3v = pooled_empty_like(ql), pooled_empty_like(kl), pooled_empty_like(k3v)
    lib.effattn_nystrom_core_backward_f32(
        ql.data_ptr(), kl.data_ptr(), k3v.data_ptr(), _ptr(kc), kc_sb, _ptr(qr), qr_sb, B * H, H, L, D,
        k3v.shape[-1], scale, iters, dw.data_ptr(), dql.data_ptr(), dkl.data_ptr(), dk3v.data_ptr(),
        torch.get_num_threads())
    return dql, dkl, dk3v



#: the feature maps of :func:`feature_attention` (``feature_attention.c``'s FA_* kinds)
FEATURE_KINDS = {"favor": 0, "elu": 1, "taylor": 2}


def _features_config(kind, q, k, v, k_valid, wr, more=()):
    """The library, the key validity bytes and the feature count ``M`` of one
    :func:`feature_attention` call, or None where the kernel does not serve."""
    if kind not in FEATURE_KINDS or (wr is None) != (kind != "favor"):
        return None
    got = _efficient_config(q, k, v, k_valid, (() if wr is None else (wr,)) + tuple(more))
    if got is None:
        return None
    vw, D = got[0].effattn_lsh_vector_width(), q.shape[-1]
    if kind == "favor":
        if wr.dim() != 2 or wr.shape[1] != D or wr.shape[0] < 1 or wr.shape[0] % vw:
            return None
        return (*got, wr.shape[0])
    return (*got, D if kind == "elu" else D + vw)


def feature_attention_serves(kind: str, q, k, v, k_valid, wr=None) -> bool:
    """Whether :func:`feature_attention` (and its backward) run natively for these
    tensors, whether or not they require grad."""
    with torch.no_grad():
        return _features_config(kind, q, k, v, k_valid, wr) is not None


#: positions per block of the causal feature kernel's scan (rowblocks.h's RB)
CAUSAL_BLOCK = 64


def _feature_stats_shapes(causal: bool, B: int, H: int, Nq: int, M: int, Dv: int):
    """The shapes of what the feature kernels' forward keeps for the backward: non-causal
    ``A, z, c``; causal ``den, c`` and the states (each block of 64 positions' carried sums
    in, ``S^T`` and ``z``)."""
    if causal:
        return [(B, H, Nq), (B, H, Nq), (B, H, -(-Nq // CAUSAL_BLOCK), Dv + 1, M)]
    return [(B, H, M, Dv), (B, H, M), (B, H)]


def _run_features(causal: bool, kind, q, k, v, k_valid, wr, h, keep_states="auto"):
    """:func:`feature_attention` (``causal``: :func:`causal_feature_attention` with its
    ``keep_states``)."""
    got = _features_config(kind, q, k, v, k_valid, wr)
    if got is None:
        return None
    lib, kv, M = got
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    out = pooled_empty((B, H, Nq, Dv))
    stats = [pooled_empty(shape) for shape in _feature_stats_shapes(causal, B, H, Nq, M, Dv)]
    if keep_states == "auto":  # where they are at most twice the size of q
        keep_states = (Dv + 1) * M <= 2 * CAUSAL_BLOCK * D
    if causal and not keep_states:
        stats[-1] = None
    fn = lib.effattn_causal_feature_attention_f32 if causal else lib.effattn_feature_attention_f32
    fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(kv), _ptr(wr), FEATURE_KINDS[kind], B * H, H, Nq, Nk, D,
       Dv, M, h, out.data_ptr(), *map(_ptr, stats), torch.get_num_threads())
    return (out, *stats)


def _run_features_backward(causal: bool, kind, q, k, v, k_valid, wr, h, out, stats, dout, need):
    """:func:`feature_attention_backward` (``causal``:
    :func:`causal_feature_attention_backward`); ``stats`` the forward's statistics."""
    stats = list(stats[:-1] if causal and stats[-1] is None else stats)  # causal states not kept
    if any(t is None for t in stats):
        return None
    got = _features_config(kind, q, k, v, k_valid, wr, (out, *stats, dout))
    if got is None:
        return None
    lib, kv, M = got
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    if (tuple(out.shape) != (B, H, Nq, Dv) or tuple(dout.shape) != (B, H, Nq, Dv)
            or [tuple(t.shape) for t in stats] != _feature_stats_shapes(causal, B, H, Nq, M, Dv)[:len(stats)]):
        return None
    grads = [pooled_empty_like(x) if want else None for x, want in zip((q, k, v), need)]
    fn = (lib.effattn_causal_feature_attention_backward_f32 if causal
          else lib.effattn_feature_attention_backward_f32)
    if causal and len(stats) == 2:
        stats.append(None)
    fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), _ptr(kv), _ptr(wr), FEATURE_KINDS[kind], B * H, H, Nq, Nk, D,
       Dv, M, h, out.data_ptr(), *map(_ptr, stats), dout.data_ptr(), *map(_ptr, grads),
       torch.get_num_threads())
    return tuple(grads)


def feature_attention(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      k_valid: Optional[torch.Tensor], wr: Optional[torch.Tensor] = None,
                      h: float = 0.0):
    """Non-causal feature-map attention ``phi(q) A / phi(q) z`` (``A = sum_j psi(k_j)^T v_j``,
    ``z = sum_j psi(k_j)`` over the real keys) fused (``feature_attention.c``;
    :func:`effattn.mechanisms.kernel.streamed_feature_attention` with the kind's
    ``StreamMap`` is its torch twin).  ``kind``: ``"favor"`` (Performer's positive features of
    the logits ``wr·x - h|x|²``: ``wr [M, D]`` the projection times ``r``, ``r²`` the
    attention scale, ``h = r² / 2``), ``"elu"`` (``elu + 1``, ``M = D``) or ``"taylor"``
    (``[x / |x|, 1]``, ``M = D`` + the vector width, zero columns after the 1); ``wr`` only for
    ``"favor"``.

    ``q [B, H, Nq, D]``, ``k [B, H, Nk, D]``, ``v [B, H, Nk, Dv]`` float32 contiguous,
    ``k_valid`` bool ``[B, >= Nk]`` (True = a real key) or None ->
    ``(out [B, H, Nq, Dv], A [B, H, M, Dv], z [B, H, M], c [B, H])``: the output and what the
    backward takes (``c`` the shift of the key features, ``"favor"``'s largest key logit; 0
    for the others).  None where it does not serve: not loaded, not float32 contiguous on
    the CPU, gradients wanted, ``D``, ``Dv`` or ``M`` not a multiple of the vector width (16
    with AVX-512, else 8), an empty side."""
    return _run_features(False, kind, q, k, v, k_valid, wr, h)


def feature_attention_backward(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               k_valid: Optional[torch.Tensor], wr: Optional[torch.Tensor], h: float,
                               out: torch.Tensor, A: torch.Tensor, z: torch.Tensor, c: torch.Tensor,
                               dout: torch.Tensor, need=(True, True, True)):
    """The gradients of :func:`feature_attention` for ``dout [B, H, Nq, Dv]``, with its
    ``out, A, z, c`` -> ``(dq, dk, dv)``, fresh tensors (None for those ``need`` does not ask
    for), or None where it does not serve (as :func:`feature_attention`; those tensors too
    float32 contiguous).  The features are recomputed; ``wr`` gets no gradient."""
    return _run_features_backward(False, kind, q, k, v, k_valid, wr, h, out, (A, z, c), dout, need)


def causal_feature_attention(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             k_valid: Optional[torch.Tensor], wr: Optional[torch.Tensor] = None,
                             h: float = 0.0, keep_states="auto"):
    """Causal feature-map attention, query ``i`` over the real keys ``j <= i`` (top-left
    aligned), fused (``causal_features.c``; :func:`effattn.mechanisms.kernel.feature_map_attention`
    with ``causal=True`` on the kind's features is its torch twin): ``kind``, ``wr``, ``h`` and
    the tensors as :func:`feature_attention` -> ``(out [B, H, Nq, Dv], den [B, H, Nq],
    c [B, H, Nq], states [B, H, T, Dv + 1, M])``: the output and what the backward takes
    (each query's normalizer, 0 for a zero output row; ``"favor"``: the shift its weights are
    taken against, the largest logit of a real key up to it, ``-inf`` before the first, 0
    for the other kinds; each block of 64 positions' carried key sums in, ``S^T`` then ``z``,
    ``T = ceil(Nq / 64)``: about ``(M / 64)·N·Dv`` floats; None where not kept).
    ``keep_states``: True, False, or ``"auto"``: kept where they are at most twice the size
    of ``q`` (``M <= 2 D``: linear and Taylor attention, whose training step they make ~15 %
    faster; not Performer's 256 features, 4x the size of q, for about even time).
    None where it does not serve (as :func:`feature_attention`)."""
    return _run_features(True, kind, q, k, v, k_valid, wr, h, keep_states)


def causal_feature_attention_backward(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      k_valid: Optional[torch.Tensor], wr: Optional[torch.Tensor],
                                      h: float, out: torch.Tensor, den: torch.Tensor, c: torch.Tensor,
                                      states: torch.Tensor, dout: torch.Tensor, need=(True, True, True)):
    """The gradients of :func:`causal_feature_attention` for ``dout [B, H, Nq, Dv]``, with its
    ``out, den, c, states`` -> ``(dq, dk, dv)``, fresh tensors (None for those ``need`` does
    not ask for), or None where it does not serve.  One reverse scan recomputes the
    features, taking ``dq`` from the states; where they are None (not kept) a forward scan
    recomputes the keys' sums for ``dq`` first.  ``wr`` gets no gradient."""
    return _run_features_backward(True, kind, q, k, v, k_valid, wr, h, out, (den, c, states), dout, need)
