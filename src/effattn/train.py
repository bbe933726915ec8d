"""``effattn train`` and ``effattn eval``: train a model on a generated task, evaluate a checkpoint.

    effattn train --task duplication --method lsh --method-opt n_hashes=4 --steps 600 --out runs/dup
    torchrun --nproc_per_node 2 -m effattn train --task listops --batch 32 --out runs/listops
    effattn eval --checkpoint runs/dup/checkpoint --method lsh --method-opt n_hashes=8

Bad arguments print one line ``Error: ...`` and exit with status 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from effattn.cli_args import fail as _fail
from effattn.training.config import TrainConfig, build_config, parse_options, validate


def train_cmd(
    task: Optional[str] = typer.Option(None, help="listops, duplication, mqar or pathfinder"),
    method: Optional[str] = typer.Option(None, help="attention method (see `effattn methods`)"),
    method_opt: Optional[List[str]] = typer.Option(None, "--method-opt", help="method option key=value (repeatable)"),
    task_opt: Optional[List[str]] = typer.Option(None, "--task-opt", help="task option key=value (repeatable)"),
    length: Optional[int] = typer.Option(None, help="sequence length (task option)"),
    vocab: Optional[int] = typer.Option(None, help="vocabulary size (duplication, mqar)"),
    shared_qk: Optional[bool] = typer.Option(None, "--shared-qk/--no-shared-qk", help="Reformer shared-QK (default: on for lsh)"),
    model: Optional[str] = typer.Option(None, help="auto, classifier, lm or vit"),
    layers: Optional[int] = typer.Option(None, help="transformer layers"),
    dim: Optional[int] = typer.Option(None, help="model width d_model"),
    heads: Optional[int] = typer.Option(None, help="attention heads"),
    ff_mult: Optional[int] = typer.Option(None, help="feed-forward width multiplier"),
    ff_chunks: Optional[int] = typer.Option(None, help="feed-forward chunks (Reformer)"),
    dropout: Optional[float] = typer.Option(None, help="dropout rate"),
    pos: Optional[str] = typer.Option(None, help="learned, sinusoidal, rotary or none"),
    pool: Optional[str] = typer.Option(None, help="cls or mean (classifiers)"),
    reversible: Optional[bool] = typer.Option(None, "--reversible/--no-reversible", help="reversible layers (Reformer)"),
    patch: Optional[int] = typer.Option(None, help="ViT patch size"),
    window: Optional[int] = typer.Option(None, help="ViT window2d window size (patches)"),
    steps: Optional[int] = typer.Option(None, help="optimizer steps"),
    batch: Optional[int] = typer.Option(None, help="global batch size (split over torchrun processes)"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate"),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay"),
    warmup: Optional[int] = typer.Option(None, help="linear warmup steps"),
    schedule: Optional[str] = typer.Option(None, help="cosine, linear or constant decay after warmup"),
    clip: Optional[float] = typer.Option(None, help="gradient-norm clipping"),
    eval_every: Optional[int] = typer.Option(None, help="evaluate every N steps (0: only at the end)"),
    eval_examples: Optional[int] = typer.Option(None, help="validation examples per evaluation"),
    log_every: Optional[int] = typer.Option(None, help="log training metrics every N steps"),
    save_every: Optional[int] = typer.Option(None, help="checkpoint every N steps (0: only at the end)"),
    seed: Optional[int] = typer.Option(None, help="seed for data and initialization"),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda"),
    threads: Optional[int] = typer.Option(None, help="torch CPU threads (0: default)"),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help="show a progress bar"),
    config: Optional[str] = typer.Option(None, help="TOML file with any of these options"),
    out: Optional[str] = typer.Option(None, help="output directory (metrics.jsonl, checkpoint/)"),
    resume: bool = typer.Option(False, help="continue from OUT/checkpoint if it exists"),
) -> None:
    """Train a model on a generated long-range task with any attention method."""
    from effattn.training.loop import prepare, train

    try:
        task_options = parse_options(task_opt, "--task-opt")
        if length is not None:
            task_options["length"] = length
        if vocab is not None:
            task_options["vocab_size"] = vocab
        overrides = dict(task=task, method=method, method_options=parse_options(method_opt, "--method-opt"),
                         task_options=task_options, shared_qk=shared_qk, model=model, layers=layers,
                         dim=dim, heads=heads, ff_mult=ff_mult, ff_chunks=ff_chunks, dropout=dropout,
                         pos=pos, pool=pool, reversible=reversible, patch=patch, window=window,
                         steps=steps, batch=batch, lr=lr, weight_decay=weight_decay, warmup=warmup,
                         schedule=schedule, clip=clip, eval_every=eval_every, eval_examples=eval_examples,
                         log_every=log_every, save_every=save_every, seed=seed, device=device,
                         threads=threads, progress=progress, out=out)
        cfg = build_config(config, overrides)
        prepared = prepare(cfg)
    except (ValueError, TypeError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    result = train(cfg, resume=resume, prepared=prepared)
    if result["world"] == 1 or int(__import__("os").environ.get("RANK", "0")) == 0:
        typer.echo(json.dumps({"train": result["train"], "val": result["val"],
                               "wall_s": round(result["wall_s"], 2), "world": result["world"],
                               "out": cfg.out}))


def eval_cmd(
    checkpoint: str = typer.Option(..., help="checkpoint directory (OUT/checkpoint)"),
    method: Optional[str] = typer.Option(None, help="evaluate with this attention method instead"),
    method_opt: Optional[List[str]] = typer.Option(None, "--method-opt", help="method option key=value (repeatable)"),
    split: str = typer.Option("test", help="val or test"),
    examples: int = typer.Option(512, help="number of examples"),
    batch: int = typer.Option(32, help="batch size"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
) -> None:
    """Evaluate a checkpoint, also with another attention method or more LSH hash rounds."""
    from effattn.training.checkpoint import load_model_state, read_config
    from effattn.training.distributed import DistEnv
    from effattn.training.evaluate import evaluate
    from effattn.training.loop import prepare

    try:
        if split not in ("val", "test", "train"):
            raise ValueError(f"--split: expected val or test, got {split!r}")
        if examples < 1 or batch < 1:
            raise ValueError("--examples/--batch: expected positive ints")
        saved = read_config(checkpoint)
        cfg = TrainConfig.from_json(saved["config"])
        cfg.task_options = dict(saved.get("task", cfg.task_options))
        opts = parse_options(method_opt, "--method-opt")
        swapped = method is not None and method != cfg.method
        cfg.shared_qk = cfg.resolved_shared_qk()  # the architecture stays: shared-QK has no key projection
        if method is not None:
            if swapped:
                cfg.method_options = {}
            cfg.method = method
        cfg.method_options = {**cfg.method_options, **opts}
        cfg.device = device
        validate(cfg)
        task, model = prepare(cfg)
        skipped = load_model_state(checkpoint, model, ignore_prefix_part=".attn.attn." if swapped else None)
    except (ValueError, TypeError) as e:
        _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    env = DistEnv.setup(device)
    model.to(env.device)
    res = evaluate(model, task, split, examples, batch, env)
    res.update({"method": cfg.method, "method_options": cfg.method_options, "split": split,
                "checkpoint": str(Path(checkpoint)), "step": saved["step"]})
    if skipped:
        res["skipped_weights"] = skipped
    env.close()
    typer.echo(json.dumps(res, default=list))


def register(app: typer.Typer) -> None:
    """Add the ``train`` and ``eval`` commands to the ``effattn`` CLI."""
    app.command("train")(train_cmd)
    app.command("eval")(eval_cmd)
