"""What every ``effattn repro`` experiment does: train a model with the ``effattn train``
loop and measure it, evaluate it (also with another attention method), write the files.

Training goes through :func:`effattn.training.loop.train` (its rich progress bar, its
``metrics.jsonl`` and checkpoint under the run's folder); this module only adds the
measurements the tables need (wall time, training tokens/s, peak memory).
"""

from __future__ import annotations

import datetime
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from effattn.bench.measure import PeakMemory
from effattn.training.config import TrainConfig, validate
from effattn.training.distributed import DistEnv
from effattn.training.evaluate import evaluate
from effattn.training.loop import METRICS_FILE, prepare, train
from effattn.training.models import build_model

SCHEMA_VERSION = 1


def command_line(argv: Optional[list] = None) -> str:
    """The command as typed, ``effattn repro ...`` (program name without its path)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return "effattn repro"
    prog = Path(argv[0]).name
    if prog in ("__main__.py", "python", "python3", "-m"):
        prog = "effattn"
    return " ".join([prog] + [shlex.quote(a) for a in argv[1:]])


def today() -> str:
    """Today's date, ISO format."""
    return datetime.date.today().isoformat()


def train_tokens_per_s(metrics_path: Path) -> Optional[float]:
    """Training tokens per second over the whole run, from ``metrics.jsonl``: each train
    record's rate times its window's length (difference of ``elapsed_s``), summed, divided
    by the summed window lengths.  None without records."""
    if not metrics_path.is_file():
        return None
    tokens = seconds = 0.0
    prev = 0.0
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") != "train":
            continue
        dt = max(rec["elapsed_s"] - prev, 0.0)
        prev = rec["elapsed_s"]
        tokens += rec["tokens_per_s"] * dt
        seconds += dt
    return tokens / seconds if seconds > 0 else None


def warm_up(model: torch.nn.Module, task, batch: int, device: str) -> None:
    """One forward and backward pass on a validation batch, gradients dropped and RNG state
    kept, so one-time allocations (kernels, thread pools) are not counted in the first run's
    peak memory.  The weights do not change."""
    b = task.batch("val", 0, batch)
    model.to(device)
    with torch.random.fork_rng(devices=[]):
        logits = model(b.inputs.to(device), None if b.padding_mask is None else b.padding_mask.to(device))
        logits.float().sum().backward()
    model.zero_grad(set_to_none=True)


def train_run(cfg: TrainConfig, *, prepared=None, before_train: Optional[Callable] = None,
              echo: Callable = print) -> dict:
    """Train ``cfg`` (its ``out`` folder is emptied first) and return
    ``{"model", "task", "record"}``; ``record`` holds the final train/val metrics, the wall
    time, the training tokens/s and the peak memory above the start (CPU resident set
    high-water mark or CUDA allocations).  ``before_train(model)`` may add hooks."""
    out = Path(cfg.out)
    if out.exists():
        shutil.rmtree(out)
    validate(cfg)
    task, model = prepared if prepared is not None else prepare(cfg)
    if before_train is not None:
        before_train(model)
    device = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    warm_up(model, task, cfg.batch, device)
    mem = PeakMemory(device)
    mem.start()
    t0 = time.perf_counter()
    res = train(cfg, prepared=(task, model), echo=echo)
    wall = time.perf_counter() - t0
    record = {
        "steps": res["steps"], "wall_s": wall,
        "train_accuracy": res["train"].get("accuracy"), "train_loss": res["train"].get("loss"),
        "val_accuracy": res["val"].get("accuracy"), "val_loss": res["val"].get("loss"),
        "tokens_per_s": train_tokens_per_s(out / METRICS_FILE),
        "peak_mem_bytes": mem.peak_above(),
        "params": sum(p.numel() for p in model.parameters()),
    }
    return {"model": model, "task": task, "record": record}


def build(cfg: TrainConfig, task) -> torch.nn.Module:
    """The model ``cfg`` describes for ``task``, initialized from ``cfg.seed`` (as
    :func:`effattn.training.loop.prepare` does)."""
    torch.manual_seed(cfg.seed)
    return build_model(cfg, task)


def with_method(cfg: TrainConfig, task, trained: torch.nn.Module, method: str, options: dict) -> torch.nn.Module:
    """A copy of ``trained`` whose attention is ``method`` with ``options`` (same weights;
    the architecture, shared-QK included, stays as trained).  Only for methods without
    weights of their own."""
    swapped = TrainConfig.from_json(cfg.to_json())
    swapped.shared_qk = cfg.resolved_shared_qk()
    swapped.method, swapped.method_options = method, dict(options)
    model = build_model(swapped, task)
    model.load_state_dict(trained.state_dict(), strict=True)
    return model.to(next(trained.parameters()).device)


def evaluate_on(model: torch.nn.Module, task, split: str, examples: int, batch: int) -> dict:
    """Loss and accuracy of ``model`` on the first ``examples`` of ``split`` (one process)."""
    env = DistEnv(0, 1, next(model.parameters()).device)
    return evaluate(model, task, split, examples, batch, env)


def finite(o):
    """``o`` with NaN/inf floats replaced by None (strict JSON)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite(v) for v in o]
    return o


def write_outputs(out_dir: Path, results: dict, report: str) -> None:
    """Write ``results.json`` and ``report.md`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(finite(results), indent=2, default=str))
    (out_dir / "report.md").write_text(report)
