"""Reformer's duplication (copy) task: sequences ``0 w 0 w``.

``w`` has ``length/2 - 1`` symbols drawn uniformly from ``1..vocab_size-1``.  A causal LM
reads the sequence; only the second copy of ``w`` is scored (the first half is random
and unpredictable), so accuracy 1.0 means the model copies perfectly across
``length/2`` positions.
"""

from __future__ import annotations

import numpy as np

from effattn.tasks.base import Example, Task


class Duplication(Task):
    """``tokens [length]``; per-token targets: position ``i`` predicts token ``i+1`` for the
    positions whose next token lies in the second ``w``; -100 elsewhere."""

    name = "duplication"
    kind = "lm"

    def __init__(self, seed: int = 0, *, length: int = 128, vocab_size: int = 32):
        super().__init__(seed)
        if isinstance(length, bool) or not isinstance(length, int) or length < 4 or length % 2:
            raise ValueError(f"length: expected an even int >= 4, got {length!r}")
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
            raise ValueError(f"vocab_size: expected an int >= 2, got {vocab_size!r}")
        self.length, self.vocab_size, self.max_len = length, vocab_size, length

    def options(self) -> dict:
        return {"length": self.length, "vocab_size": self.vocab_size}

    def generate(self, rng: np.random.Generator, index: int) -> Example:
        half = self.length // 2
        w = rng.integers(1, self.vocab_size, size=half - 1)
        tokens = np.concatenate([[0], w, [0], w]).astype(np.int64)
        target = np.full(self.length, -100, dtype=np.int64)
        target[half:-1] = tokens[half + 1:]
        return Example(tokens, target)
