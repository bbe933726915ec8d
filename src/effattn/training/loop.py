"""The training loop: AdamW, warmup + decay, clipping, periodic evaluation, metrics,
checkpoints, resuming, and DistributedDataParallel under ``torchrun``.

Data: global step ``s`` uses train examples ``s*batch .. s*batch+batch-1``; rank ``r`` of
``w`` takes its contiguous ``batch/w`` of them.  The loss each rank backpropagates is its
loss *sum* divided by the global number of targets, times ``w`` (DDP averages gradients),
so the update equals the single-process update on the whole global batch.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from effattn.tasks import make_task
from effattn.training.checkpoint import (load_model_state, load_optimizer_state, read_config,
                                         save_checkpoint)
from effattn.training.config import TrainConfig
from effattn.training.distributed import DistEnv
from effattn.training.evaluate import evaluate
from effattn.training.models import build_model
from effattn.training.objective import loss_terms
from effattn.training.progress import ProgressBar

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step`` (0-based): linear warmup, then cosine/linear decay to
    ``min_lr_ratio * lr`` at the last step, or constant."""
    if cfg.warmup and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(cfg.steps - cfg.warmup, 1)
    t = min(max(step - cfg.warmup, 0) / span, 1.0)
    decay = 0.5 * (1 + math.cos(math.pi * t)) if cfg.schedule == "cosine" else 1 - t
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay)


def prepare(cfg: TrainConfig):
    """Build (and so validate) the task and model; ``ValueError``/``TypeError`` on bad options."""
    task = make_task(cfg.task, seed=cfg.seed, **cfg.task_options)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task)
    return task, model


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings' 1-d parameters."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.98))


def train(cfg: TrainConfig, *, resume: bool = False, prepared=None, echo=print) -> dict:
    """Run training as configured; returns the final metrics.  Writes ``metrics.jsonl`` and
    ``checkpoint/`` under ``cfg.out`` (process 0 only)."""
    env = DistEnv.setup(cfg.device)
    try:
        result = _train(cfg, env, resume, prepared, echo)
    except BaseException:
        env.close(sync=False)
        raise
    env.close()
    return result


def _train(cfg: TrainConfig, env: DistEnv, resume: bool, prepared, echo) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    ckpt = out / CHECKPOINT_DIR
    task, model = prepared if prepared is not None else prepare(cfg)
    model.to(env.device)
    opt = make_optimizer(model, cfg)
    offset, local = env.shard(cfg.batch)
    start = 0
    if resume and (ckpt / "config.json").is_file():
        saved = read_config(ckpt)
        load_model_state(ckpt, model)
        load_optimizer_state(ckpt, opt)
        start = int(saved["step"])
    else:
        torch.manual_seed(cfg.seed + 1)
    if env.world > 1:
        torch.manual_seed(torch.initial_seed() + env.rank)  # distinct dropout per rank
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_json(), indent=2, default=list))
    net = DistributedDataParallel(model) if env.world > 1 else model
    metrics_f = open(out / METRICS_FILE, "a") if env.is_main else None

    def log(rec: dict) -> None:
        if metrics_f is not None:
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()

    bar = ProgressBar(cfg.steps, start, enabled=env.is_main and cfg.progress)
    window = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, count, correct, tokens
    t_window = time.perf_counter()
    t0 = time.perf_counter()
    last_train, last_eval = {}, {}
    model.train()
    try:
        for step in range(start, cfg.steps):
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            b = task.batch("train", step * cfg.batch + offset, local).to(env.device)
            loss_sum, count, correct = loss_terms(net(b.inputs, b.padding_mask), b.targets)
            global_count = env.all_sum(count.double()).clamp_min(1.0)
            loss = loss_sum / global_count * env.world
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            tokens = b.inputs.numel() if b.padding_mask is None else int(b.padding_mask.sum())
            window += torch.stack([loss_sum.detach().double(), count.double(), correct.double(),
                                   torch.tensor(float(tokens), dtype=torch.float64, device=env.device)])
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:
                w = env.all_sum(window)
                dt = time.perf_counter() - t_window
                last_train = {"step": done, "split": "train", "loss": w[0].item() / max(w[1].item(), 1),
                              "accuracy": w[2].item() / max(w[1].item(), 1), "lr": lr,
                              "grad_norm": float(grad_norm), "tokens_per_s": w[3].item() / max(dt, 1e-9),
                              "elapsed_s": time.perf_counter() - t0}
                log(last_train)
                bar.update(done, last_train)
                window.zero_()
                t_window = time.perf_counter()
            else:
                bar.update(done)
            if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps:
                res = evaluate(model, task, "val", cfg.eval_examples, cfg.batch, env)
                last_eval = {"step": done, "split": "val", "loss": res["loss"], "accuracy": res["accuracy"],
                             "elapsed_s": time.perf_counter() - t0}
                log(last_eval)
                bar.note(f"step {done}: val loss {res['loss']:.4f}, val accuracy {res['accuracy']:.4f}")
            if env.is_main and ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps):
                save_checkpoint(ckpt, model, opt, cfg.to_json(), task.options(), done)
    finally:
        bar.close()
        if metrics_f is not None:
            metrics_f.close()
    return {"train": last_train, "val": last_eval, "steps": cfg.steps, "start_step": start,
            "wall_s": time.perf_counter() - t0, "world": env.world}
