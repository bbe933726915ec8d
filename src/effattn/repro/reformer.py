"""``effattn repro reformer-table2``: Reformer's duplication-task table (Kitaev et al. 2020,
Table 2) at CPU scale.

Four one-layer causal LMs with shared-QK attention are trained on ``0 w 0 w`` — with full
attention and with LSH attention of 4, 2 and 1 hash rounds — and each is evaluated with
full attention and with LSH of 8, 4, 2 and 1 rounds (same weights: neither method has
parameters of its own).  As in Reformer (Trax draws new random rotations on every call),
the LSH rotations are redrawn for every forward pass, in training and in evaluation, from a
seeded stream (:func:`redraw_lsh_rotations`), so a model cannot adapt to one fixed hash.
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path
from typing import Optional

import torch

from effattn.api import Attention
from effattn.repro import harness
from effattn.repro.published import (REFORMER_EVAL, REFORMER_SOURCE, REFORMER_TABLE2,
                                     REFORMER_TRAIN)
from effattn.training.config import TrainConfig


@dataclasses.dataclass
class ReformerSettings:
    """The experiment's knobs; the defaults are the CPU-scale run (paper: length 1024)."""

    length: int = 256
    steps: int = 250
    batch: int = 32
    vocab: int = 128  # symbols 1..127, as in the paper
    dim: int = 256  # d_model = d_ff = 256, 4 heads, one layer, as in the paper
    heads: int = 4
    layers: int = 1
    ff_mult: int = 1
    chunk_len: int = 16  # length / chunk_len = 16 buckets per round (paper: 1024 / 64)
    lr: float = 2e-3
    warmup: int = 50
    eval_examples: int = 256
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        """``ValueError`` naming the flag for values the experiment cannot run with."""
        if self.length < 8 or self.length % 2:
            raise ValueError(f"--length: expected an even int >= 8, got {self.length}")
        for name in ("steps", "batch", "eval_examples", "chunk_len", "dim"):
            v = getattr(self, name)
            if v < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {v}")
        if self.dim % self.heads:
            raise ValueError(f"--dim: expected a multiple of the {self.heads} heads, got {self.dim}")
        if self.vocab < 3:
            raise ValueError(f"--vocab: expected an int >= 3, got {self.vocab}")


def method_of(label: str, chunk_len: int) -> tuple:
    """``"full"`` -> ``("full", {})``; ``"lsh-4"`` -> ``("lsh", {"n_hashes": 4, "chunk_len": c})``."""
    if label == "full":
        return "full", {}
    if label.startswith("lsh-"):
        return "lsh", {"n_hashes": int(label[4:]), "chunk_len": chunk_len}
    raise ValueError(f"unknown attention label {label!r}")


def redraw_lsh_rotations(model: torch.nn.Module, seed: int) -> list:
    """Make every LSH attention of ``model`` hash with fresh rotations on each call: a
    forward pre-hook sets the method's ``seed`` option from a ``random.Random(seed)``
    stream (reproducible run to run).  Returns the hook handles."""
    stream = random.Random(seed)

    def hook(module, args):
        module.options["seed"] = stream.randrange(2 ** 31)

    return [m.register_forward_pre_hook(hook) for m in model.modules()
            if isinstance(m, Attention) and m.method == "lsh"]


def train_config(s: ReformerSettings, label: str, out: Path, progress: bool) -> TrainConfig:
    """The :class:`TrainConfig` of the model trained with attention ``label``."""
    method, options = method_of(label, s.chunk_len)
    return TrainConfig(task="duplication", task_options={"length": s.length, "vocab_size": s.vocab},
                       method=method, method_options=options, shared_qk=True, dim=s.dim,
                       layers=s.layers, heads=s.heads, ff_mult=s.ff_mult, steps=s.steps,
                       batch=s.batch, lr=s.lr, warmup=min(s.warmup, max(s.steps // 5, 1)),
                       eval_every=0, eval_examples=min(s.eval_examples, 128), log_every=10,
                       seed=s.seed, device=s.device, progress=progress, out=str(out))


def run(s: ReformerSettings, out_dir: Path, *, console, progress: bool = True,
        command: Optional[str] = None) -> dict:
    """Train the four models, fill the 4 x 5 grid, write ``results.json``, ``report.md`` and
    the plot into ``out_dir``; returns the results dict."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from effattn.repro import plots, tables

    s.check()
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    runs, cells = [], []
    for i, train_label in enumerate(REFORMER_TRAIN):
        console.print(f"[bold]reformer-table2[/] {i + 1}/{len(REFORMER_TRAIN)}: training with {train_label}")
        cfg = train_config(s, train_label, out_dir / "runs" / train_label, progress)
        trained = harness.train_run(cfg, before_train=lambda m: redraw_lsh_rotations(m, s.seed + 1000 * i),
                                    echo=console.print)
        rec = {"train": train_label, **trained["record"]}
        runs.append(rec)
        with Progress(TextColumn(f"eval {train_label}-trained"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console,
                      disable=not progress, transient=False) as bar:
            task_id = bar.add_task("eval", total=len(REFORMER_EVAL), info="")
            for j, eval_label in enumerate(REFORMER_EVAL):
                method, options = method_of(eval_label, s.chunk_len)
                model = harness.with_method(cfg, trained["task"], trained["model"], method, options)
                redraw_lsh_rotations(model, s.seed + 10_000 + 100 * i + j)
                te = time.perf_counter()
                res = harness.evaluate_on(model, trained["task"], "test", s.eval_examples, s.batch)
                cells.append({"train": train_label, "eval": eval_label, "accuracy": 100 * res["accuracy"],
                              "loss": res["loss"], "examples": res["examples"], "targets": res["targets"],
                              "eval_s": time.perf_counter() - te})
                bar.update(task_id, advance=1, info=f"{eval_label}: {100 * res['accuracy']:.1f}%")
    results = {
        "experiment": "reformer-table2", "schema": harness.SCHEMA_VERSION, "date": harness.today(),
        "command": command or harness.command_line(), "config": dataclasses.asdict(s),
        "paper_config": {"length": 1024, "vocab": 128, "dim": 256, "ff": 256, "heads": 4, "layers": 1,
                         "shared_qk": True},
        "published": {"source": REFORMER_SOURCE, "table": REFORMER_TABLE2},
        "train_labels": list(REFORMER_TRAIN), "eval_labels": list(REFORMER_EVAL),
        "runs": runs, "cells": cells,
    }
    results["wall_time_s"] = time.perf_counter() - t0
    results["plots"] = plots.reformer_plot(results, out_dir)
    harness.write_outputs(out_dir, results, tables.reformer_report(results))
    return results
