"""Evaluation of a model on a task split, sharded over data-parallel processes."""

from __future__ import annotations

import torch

from effattn.tasks import Task
from effattn.training.distributed import DistEnv
from effattn.training.objective import loss_terms


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, split: str, examples: int, batch: int,
             env: DistEnv) -> dict:
    """Mean loss and accuracy over examples ``0..examples-1`` of ``split``.

    Each process scores every ``world``-th batch; sums are added across processes, so the
    result does not depend on the number of processes.  Returns
    ``{"loss", "accuracy", "examples", "targets"}``.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)
    starts = list(range(0, examples, batch))
    for i, start in enumerate(starts):
        if i % env.world != env.rank:
            continue
        b = task.batch(split, start, min(batch, examples - start)).to(env.device)
        loss_sum, count, correct = loss_terms(model(b.inputs, b.padding_mask), b.targets)
        totals += torch.stack([loss_sum.double(), count.double(), correct.double()])
    totals = env.all_sum(totals)
    model.train(was_training)
    n = max(totals[1].item(), 1.0)
    return {"loss": totals[0].item() / n, "accuracy": totals[2].item() / n, "examples": examples,
            "targets": int(totals[1].item())}
