"""Multi-query associative recall (Zoology, Arora et al. 2023).

A sequence starts with ``num_kv_pairs`` key-value pairs ``k1 v1 k2 v2 ...`` (keys from the
lower half of the vocabulary ``1..V/2-1``, values from the upper half ``V/2..V-1``, each
without repetition), followed by the keys again as queries, in random order, at gaps drawn
from a power law ``p(g) ∝ g^(power_a - 1)`` (so most queries come soon after the
context, some far).  Other positions hold random tokens.  The label at a query's position is
its value; every other position is ignored (-100).
"""

from __future__ import annotations

import numpy as np

from effattn.tasks.base import Example, Task


class MQAR(Task):
    """Zoology's ``multiquery_ar`` one example at a time: ``tokens [length]``, per-token targets."""

    name = "mqar"
    kind = "lm"

    def __init__(self, seed: int = 0, *, length: int = 128, vocab_size: int = 256,
                 num_kv_pairs: int = 8, power_a: float = 0.01, random_non_queries: bool = True):
        super().__init__(seed)
        for name, v in (("length", length), ("vocab_size", vocab_size), ("num_kv_pairs", num_kv_pairs)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if not 0 < power_a <= 1:
            raise ValueError(f"power_a: expected a float in (0, 1], got {power_a!r}")
        if num_kv_pairs > vocab_size // 2 - 1:
            raise ValueError(f"num_kv_pairs: {num_kv_pairs} keys need vocab_size >= {2 * num_kv_pairs + 2}")
        space = (length - 2 * num_kv_pairs) // 2
        if space < num_kv_pairs:
            raise ValueError(f"length: {length} leaves room for {max(space, 0)} queries, "
                             f"need num_kv_pairs={num_kv_pairs}; use length >= {4 * num_kv_pairs}")
        self.length, self.vocab_size, self.max_len = length, vocab_size, length
        self.num_kv_pairs, self.power_a, self.random_non_queries = num_kv_pairs, power_a, random_non_queries

    def options(self) -> dict:
        return {"length": self.length, "vocab_size": self.vocab_size, "num_kv_pairs": self.num_kv_pairs,
                "power_a": self.power_a, "random_non_queries": self.random_non_queries}

    def generate(self, rng: np.random.Generator, index: int) -> Example:
        n, V, D = self.length, self.vocab_size, self.num_kv_pairs
        half = V // 2
        keys = rng.choice(np.arange(1, half), size=D, replace=False)
        values = rng.choice(np.arange(half, V), size=D, replace=False)
        context = 2 * D
        space = (n - context) // 2
        p = self.power_a * np.arange(1, space + 1) ** (self.power_a - 1)
        gaps = rng.choice(space, size=D, replace=False, p=p / p.sum())
        tokens = np.zeros(n, dtype=np.int64)
        tokens[0:context:2], tokens[1:context:2] = keys, values
        query_pos = context + 2 * gaps
        tokens[query_pos] = keys
        if self.random_non_queries:
            free = np.ones(n, dtype=bool)
            free[:context] = False
            free[query_pos] = False
            tokens[free] = rng.integers(V, size=int(free.sum()))
        target = np.full(n, -100, dtype=np.int64)
        target[query_pos] = values
        return Example(tokens, target)
