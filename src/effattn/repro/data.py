"""A fixed pool of generated examples shared by every method of an experiment.

:class:`PooledTask` wraps an :mod:`effattn.tasks` task: training example ``i`` is the base
task's training example ``i % pool`` (so a long run cycles over ``pool`` examples, in
epochs), and every example is generated once and kept, so all methods train and test on
exactly the same data without paying for the generator again (ListOps' rejection sampler
costs tens of milliseconds per example).
"""

from __future__ import annotations

from typing import Callable, Optional

from effattn.tasks import Batch, Task


class PooledTask:
    """The task ``base`` with a training pool of ``pool`` examples and cached val/test
    examples; everything else (``name``, ``kind``, ``vocab_size``, ``max_len``,
    ``options()``, ...) is the base task's."""

    def __init__(self, base: Task, pool: int):
        if pool < 1:
            raise ValueError(f"pool: expected a positive int, got {pool}")
        self.base, self.pool = base, pool
        self._examples: dict = {}

    def __getattr__(self, name):
        return getattr(self.base, name)

    def example(self, split: str, index: int):
        """Example ``index`` of ``split`` (training indices wrap around the pool)."""
        if split == "train":
            index %= self.pool
        key = (split, index)
        ex = self._examples.get(key)
        if ex is None:
            ex = self._examples[key] = self.base.example(split, index)
        return ex

    def batch(self, split: str, start: int, count: int) -> Batch:
        """Examples ``start .. start+count-1`` of ``split``, collated as the base task does."""
        return self.base.collate([self.example(split, start + i) for i in range(count)])

    def fill(self, counts: dict, advance: Optional[Callable[[int], None]] = None) -> None:
        """Generate the first ``counts[split]`` examples of each split now (``advance(1)``
        after each, for a progress bar)."""
        for split, n in counts.items():
            for i in range(n):
                self.example(split, i)
                if advance is not None:
                    advance(1)


class MixedTask:
    """Training on several tasks of one kind at once, one task per step (Zoology trains MQAR
    on a mixture of lengths): the batch of global step ``s`` (``start = s * batch``) comes
    from ``tasks[s % len(tasks)]``, each task's own examples in order, so every batch has
    one sequence length and no padding.  ``max_len``/``vocab_size`` are the largest."""

    def __init__(self, tasks: list, batch: int):
        if not tasks:
            raise ValueError("tasks: expected at least one task")
        if len({t.kind for t in tasks}) != 1:
            raise ValueError("tasks: expected tasks of one kind")
        self.tasks, self.batch_size = list(tasks), batch
        self.name = "mixture"
        self.kind = tasks[0].kind
        self.pad_id = tasks[0].pad_id
        self.vocab_size = max(t.vocab_size for t in tasks)
        self.num_classes = max(t.num_classes for t in tasks)
        self.max_len = max(t.max_len for t in tasks)

    def options(self) -> dict:
        """The mixed tasks' options (saved with checkpoints)."""
        return {"mixture": [t.options() for t in self.tasks], "batch": self.batch_size}

    def batch(self, split: str, start: int, count: int) -> Batch:
        """The batch at ``start`` (a multiple of the batch size in the training loop)."""
        k = len(self.tasks)
        step, offset = divmod(start, self.batch_size)
        return self.tasks[step % k].batch(split, (step // k) * self.batch_size + offset, count)
