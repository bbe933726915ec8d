"""``effattn repro listops``: LRA's ListOps (Tay et al. 2020) with every effattn method
that can run a bidirectional encoder, on one generated data set, one model, one budget.

Presets: ``cpu`` (short sequences, a small model; the default, under an hour here) and
``paper`` (the LRA repository's ``listops/configs/base_listops_config.py``: 6 layers,
8 heads, d_model 512, mlp 2048, length < 2000, batch 32, 5000 steps, 1000 warmup steps,
weight decay 0.1; LRA's ``0.05 * linear_warmup * rsqrt_decay`` schedule peaks at
0.05 / sqrt(1000) ~ 1.6e-3 and ends at sqrt(1000 / 5000) of it, here a cosine to that
ratio).  The paper preset is selectable but meant for a GPU.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Optional

import torch

import effattn
from effattn.repro import harness
from effattn.repro.data import PooledTask
from effattn.repro.published import LRA_SOURCE, LRA_UNMATCHED, lra_listops
from effattn.tasks import make_task
from effattn.training.config import TrainConfig

#: exact methods that compute the same function as ``full`` (run only when asked for)
EXACT_DUPLICATES = ("naive", "blockwise")
#: methods that cannot run on a 1-D token sequence, with the reason
NOT_APPLICABLE = {"window2d": "needs a 2-D grid of tokens (Swin windows); ListOps is a 1-D sequence"}


@dataclasses.dataclass
class ListOpsSettings:
    """Data, model and budget of the run (the same for every method)."""

    preset: str = "cpu"
    min_length: int = 32  # effattn's "small" ListOps preset (LRA: 500 < N < 2000)
    max_length: int = 128
    max_depth: int = 10
    max_args: int = 10
    train_pool: int = 2000
    val_examples: int = 200
    test_examples: int = 1000
    dim: int = 64
    layers: int = 2
    heads: int = 4
    ff_mult: int = 2
    dropout: float = 0.1
    steps: int = 300
    batch: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        """``ValueError`` naming the flag for values the run cannot use."""
        for name in ("steps", "batch", "train_pool", "test_examples", "val_examples", "dim", "layers", "heads"):
            v = getattr(self, name)
            if v < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {v}")
        if self.max_length - self.min_length < 2:
            raise ValueError(f"--max-length: need min_length < N < max_length with room, got "
                             f"{self.min_length}, {self.max_length}")


PRESETS = {
    "cpu": {},
    "paper": dict(min_length=500, max_length=2000, train_pool=96_000, val_examples=2000, test_examples=2000,
                  dim=512, layers=6, heads=8, ff_mult=4, dropout=0.1, steps=5000, batch=32,
                  lr=0.05 / math.sqrt(1000), weight_decay=0.1, warmup=1000, schedule="cosine",
                  min_lr_ratio=math.sqrt(1000 / 5000)),
}


def settings_for(preset: str, **overrides) -> ListOpsSettings:
    """The preset's settings with the non-None ``overrides``; ``ValueError`` for an unknown preset."""
    if preset not in PRESETS:
        raise ValueError(f"--preset: expected one of {list(PRESETS)}, got {preset!r}")
    s = ListOpsSettings(preset=preset, **PRESETS[preset])
    for k, v in overrides.items():
        if v is not None:
            setattr(s, k, v)
    return s


def method_options(method: str, max_len: int) -> dict:
    """Options that keep ``method`` sparse / low-rank at sequences up to ``max_len`` tokens
    (plus the encoder's CLS token): LRA-like sizes beyond 1024 tokens (effattn's defaults:
    blocks of 64, chunks of 64, rank 256), about an eighth of the sequence below."""
    long = max_len + 1 > 1024
    if method == "lsh":
        return {"n_hashes": 2, "chunk_len": 64 if long else 16}
    if method == "sparse_strided":
        return {"stride": 128, "block_size": 64} if long else {"stride": 16, "block_size": 16}
    if method == "sparse_fixed":
        return {"stride": 128, "block_size": 64, "summary": 8} if long else {"stride": 32, "block_size": 16, "summary": 4}
    if method == "longformer":
        return {"window": 128, "block_size": 64} if long else {"window": 16, "block_size": 16}
    if method in ("bigbird", "bigbird_etc"):
        opts = {"block_size": 64 if long else 8, "n_window_blocks": 3, "n_global_blocks": 1,
                "n_random_blocks": 3 if long else 1}
        if method == "bigbird_etc":
            opts["extra_global_tokens"] = 2
        return opts
    if method == "linformer":  # E, F sized to the longest input (+ the CLS token)
        return {"k": 256 if long else 16, "max_len": max_len + 1}
    if method == "nystrom":
        return {"n_landmarks": 64 if long else 8}
    if method == "performer":
        return {"n_features": 256 if long else 64}
    return {}


def default_methods() -> list:
    """Every registered method that runs a bidirectional encoder on a 1-D sequence, except
    the exact duplicates of ``full``."""
    return [m["name"] for m in effattn.methods()
            if m["name"] not in NOT_APPLICABLE and m["name"] not in EXACT_DUPLICATES]


def check_methods(methods: list) -> None:
    """``ValueError`` for unknown or inapplicable method names."""
    known = [m["name"] for m in effattn.methods()]
    for m in methods:
        if m not in known:
            raise ValueError(f"--methods: unknown method {m!r}; choose from {known}")
        if m in NOT_APPLICABLE:
            raise ValueError(f"--methods: {m} {NOT_APPLICABLE[m]}")


def train_config(s: ListOpsSettings, method: str, out: Path, progress: bool) -> TrainConfig:
    """The :class:`TrainConfig` of ``method``'s run."""
    return TrainConfig(task="listops", task_options={"min_length": s.min_length, "max_length": s.max_length,
                                                     "max_depth": s.max_depth, "max_args": s.max_args},
                       method=method, method_options=method_options(method, s.max_length - 1),
                       model="classifier", dim=s.dim, layers=s.layers, heads=s.heads, ff_mult=s.ff_mult,
                       dropout=s.dropout, pool="cls", steps=s.steps, batch=s.batch, lr=s.lr,
                       weight_decay=s.weight_decay, warmup=min(s.warmup, max(s.steps // 5, 1)),
                       schedule=s.schedule, min_lr_ratio=s.min_lr_ratio, eval_every=0,
                       eval_examples=s.val_examples, log_every=10, seed=s.seed, device=s.device,
                       progress=progress, out=str(out))


def run(s: ListOpsSettings, methods: Optional[list], out_dir: Path, *, console, progress: bool = True,
        command: Optional[str] = None) -> dict:
    """Generate the data once, train and test every method, write ``results.json``,
    ``report.md`` and the accuracy-vs-speed plot into ``out_dir``; returns the results."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from effattn.repro import plots, tables

    s.check()
    chosen = default_methods() if methods is None else list(methods)
    check_methods(chosen)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    base = make_task("listops", seed=s.seed, min_length=s.min_length, max_length=s.max_length,
                     max_depth=s.max_depth, max_args=s.max_args)
    data = PooledTask(base, s.train_pool)
    counts = {"train": min(s.train_pool, s.steps * s.batch), "val": s.val_examples, "test": s.test_examples}
    with Progress(TextColumn("generate ListOps"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not progress) as bar:
        tid = bar.add_task("data", total=sum(counts.values()))
        data.fill(counts, lambda k: bar.advance(tid, k))
    data_s = time.perf_counter() - t0
    rows = []

    def snapshot(final: bool) -> dict:
        done = list(rows)
        if final:
            if methods is None:
                done += [{"method": m, "published": lra_listops(m), "status": "skipped",
                          "reason": "exact attention, the same function as full (select it with --methods to time it)"}
                         for m in EXACT_DUPLICATES]
            done += [{"method": m, "published": lra_listops(m), "status": "skipped", "reason": why}
                     for m, why in NOT_APPLICABLE.items()]
        results = {
            "experiment": "listops", "schema": harness.SCHEMA_VERSION, "date": harness.today(),
            "command": command or harness.command_line(), "config": dataclasses.asdict(s),
            "published": {"source": LRA_SOURCE, "unmatched": list(LRA_UNMATCHED)},
            "methods": chosen, "rows": done, "data_generation_s": data_s, "complete": final,
            "notes": [f"Data: {s.train_pool} distinct training examples cycled over {s.steps} x {s.batch} "
                      f"samples; generating them (once, shared by all methods) took {data_s:.0f} s."],
            "wall_time_s": time.perf_counter() - t0, "plots": [],
        }
        if not final:
            results["notes"].append(f"Partial results: {len(rows)} of {len(chosen)} methods done.")
        results["plots"] = plots.listops_plot(results, out_dir) if final else []
        harness.write_outputs(out_dir, results, tables.listops_report(results))
        return results

    for i, method in enumerate(chosen):
        console.print(f"[bold]listops[/] {i + 1}/{len(chosen)}: {method}")
        cfg = train_config(s, method, out_dir / "runs" / method, progress)
        row = {"method": method, "published": lra_listops(method), "method_options": cfg.method_options}
        try:
            model = harness.build(cfg, data)
            trained = harness.train_run(cfg, prepared=(data, model), echo=console.print)
            test = harness.evaluate_on(trained["model"], data, "test", s.test_examples, s.batch)
            row.update(status="ok", test_accuracy=test["accuracy"], test_loss=test["loss"], **trained["record"])
        except (ValueError, TypeError, RuntimeError) as e:  # one method failing must not end the table
            row.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        rows.append(row)
        snapshot(final=False)
    results = snapshot(final=True)
    return results
