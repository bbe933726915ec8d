"""Block-sparse inference against compiled FlexAttention with the same pattern.

``python -m effattn.bench.flexcmp [--lengths 16384 65536] [--methods ...] [--repeats 3]``
prints one markdown row per (method, N): our forward under ``no_grad`` with the default
dispatch (``auto``: FlexAttention where it serves, see :mod:`effattn.mechanisms._flex`),
our own engine path (dispatch ``off``), and ``torch.compile``d ``flex_attention`` given
the method's pattern in original token order (a ``BlockMask`` from ``create_block_mask``,
or for BigBird its block pattern as full blocks).  Times are medians after one warm-up
call; the one-time costs (compile, block-mask build) are the ``first`` columns.
Inputs: B=1, H=4, D=64, float32, 2 threads unless told otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo

import effattn
from effattn.mechanisms import _flex
from effattn.mechanisms._flex import flex_mode

#: the bench's default options of each method (default.toml)
OPTIONS = {"longformer": {"window": 256}, "bigbird": {"block_size": 64},
           "sparse_strided": {}, "sparse_fixed": {}}


def flex_pattern(method: str, N: int, H: int, device: str):
    """FlexAttention ``BlockMask`` of ``method``'s pattern (its bench options) at length ``N``."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

    if method == "longformer":
        w = OPTIONS[method]["window"]
        return create_block_mask(lambda b, h, i, j: (i - j).abs() <= w, None, None, N, N,
                                 device=device, _compile=True)
    if method == "sparse_strided":
        return create_block_mask(lambda b, h, i, j: ((i - j).abs() < 128) | ((i - j) % 128 == 0),
                                 None, None, N, N, device=device, _compile=True)
    if method == "sparse_fixed":
        return create_block_mask(lambda b, h, i, j: (i // 128 == j // 128) | (j % 128 >= 120),
                                 None, None, N, N, device=device, _compile=True)
    if method == "bigbird":
        from effattn.mechanisms.bigbird import bigbird_block_pattern, global_block_mask

        bs = OPTIONS[method]["block_size"]
        nb = -(-N // bs)
        pat, _ = bigbird_block_pattern(nb, H, n_window_blocks=3, n_global_blocks=1,
                                       n_random_blocks=3, seed=0, causal=False)
        pat = pat | global_block_mask(nb, 1, False)[None, :, None]  # global rows see all
        order = torch.sort((~pat).to(torch.int8), dim=-1, stable=True).indices
        full_idx = order.to(torch.int32)[None].contiguous()
        full_num = pat.sum(-1).to(torch.int32)[None]
        zero = torch.zeros_like(full_num)
        return BlockMask.from_kv_blocks(zero, torch.zeros_like(full_idx), full_num, full_idx,
                                        BLOCK_SIZE=bs, seq_lengths=(N, N), compute_q_blocks=False)
    raise ValueError(f"method: no FlexAttention pattern for {method!r}")


def _times(fn, repeats: int):
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return first, statistics.median(ts)


def compare(method: str, N: int, H: int = 4, D: int = 64, repeats: int = 3) -> dict:
    """Seconds ``{ours, ours_first, own, flex, flex_first}`` of one (method, N) case."""
    from torch.nn.attention.flex_attention import flex_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
    flex = torch.compile(flex_attention, dynamic=False)
    res = {}
    with torch.no_grad():
        res["ours_first"], res["ours"] = _times(
            lambda: effattn.attention(q, k, v, method, **OPTIONS[method]), repeats)
        with flex_mode("off"):
            _, res["own"] = _times(lambda: effattn.attention(q, k, v, method, **OPTIONS[method]),
                                   repeats)
        t0 = time.perf_counter()
        bm = flex_pattern(method, N, H, "cpu")
        build = time.perf_counter() - t0
        first, res["flex"] = _times(lambda: flex(q, k, v, block_mask=bm), repeats)
        res["flex_first"] = build + first
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--methods", nargs="+", default=list(OPTIONS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B=1 H=4 D=64 fp32, no_grad")
    print("| method | N | ours (auto) s | ours/flex | own path s | flex s | ours first call s | flex first call s |")
    print("|---|---|---|---|---|---|---|---|")
    for m in a.methods:
        for n in a.lengths:
            # a fresh dynamo per case: every case compiles anew, so no case runs past dynamo's
            # recompile limit (where torch's eager FlexAttention materializes N x N scores)
            torch._dynamo.reset()
            _flex._exhausted = False
            r = compare(m, n, repeats=a.repeats)
            print(f"| {m} | {n} | {r['ours']:.3f} | {r['ours'] / r['flex']:.2f} | {r['own']:.3f} | "
                  f"{r['flex']:.3f} | {r['ours_first']:.1f} | {r['flex_first']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
