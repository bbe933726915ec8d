"""Long-range tasks, generated (no downloads) and deterministic given a seed.

``make_task(name, seed=0, **options)`` builds one; ``TASKS`` lists them.  Every task gives
``example(split, index)`` and ``batch(split, start, count)``; the train/val/test splits are
disjoint by construction (see :mod:`effattn.tasks.base`).
"""

from effattn.tasks.base import SPLITS, Batch, Example, Task, content_hash, split_of
from effattn.tasks.duplication import Duplication
from effattn.tasks.listops import ListOps
from effattn.tasks.mqar import MQAR
from effattn.tasks.pathfinder import Pathfinder

TASKS = {"listops": ListOps, "duplication": Duplication, "mqar": MQAR, "pathfinder": Pathfinder}


def make_task(name: str, seed: int = 0, **options) -> Task:
    """The task ``name`` with its options; ``ValueError`` for an unknown name,
    ``TypeError`` for an unknown option."""
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; choose one of {sorted(TASKS)}")
    try:
        return TASKS[name](seed, **options)
    except TypeError as e:
        if "unexpected keyword" in str(e):
            raise TypeError(f"task {name!r}: {e}") from None
        raise


__all__ = ["TASKS", "make_task", "Task", "Batch", "Example", "SPLITS", "content_hash", "split_of",
           "ListOps", "Duplication", "MQAR", "Pathfinder"]
