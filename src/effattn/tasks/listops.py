"""ListOps (Long Range Arena): evaluate a nested list expression, 10-way classification.

The generator follows LRA's ``listops.py``: operators ``[MIN``, ``[MAX``, ``[MED`` (median,
truncated to an int) and ``[SM`` (sum mod 10) over values 0-9; a node below ``max_depth``
is a leaf with probability 0.75, else an operator with 2..``max_args`` arguments; trees are
redrawn until ``min_length < length < max_length`` where length counts values, operators
and closing brackets (parentheses are not tokens).
Example: ``[MAX 2 9 [MIN 4 7 ] 0 ]`` evaluates to 9.
"""

from __future__ import annotations

import numpy as np

from effattn.tasks.base import Example, Task

OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
END = "]"
LEAF_PROBABILITY = 0.75
#: token ids: 0 = padding, 1..10 = values 0..9, then operators, then the closing bracket
VOCAB = ["<pad>"] + [str(v) for v in range(10)] + list(OPERATORS) + [END]
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
PRESETS = {"lra": (500, 2000), "medium": (100, 500), "small": (32, 128), "tiny": (8, 40)}


def evaluate(tree) -> int:
    """Value of a tree: an int, or ``(op, [subtrees])``."""
    if isinstance(tree, (int, np.integer)):
        return int(tree)
    op, args = tree
    vals = [evaluate(a) for a in args]
    if op == "[MIN":
        return min(vals)
    if op == "[MAX":
        return max(vals)
    if op == "[MED":
        return int(np.median(vals))
    if op == "[SM":
        return sum(vals) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def to_tokens(tree) -> list:
    """Token strings of a tree, e.g. ``['[MAX', '2', '9', ']']``."""
    if isinstance(tree, (int, np.integer)):
        return [str(int(tree))]
    op, args = tree
    out = [op]
    for a in args:
        out += to_tokens(a)
    return out + [END]


def parse(tokens) -> object:
    """Inverse of :func:`to_tokens`: a list of token strings (or one space-separated string)
    to a tree.  ``ValueError`` on malformed input."""
    toks = tokens.split() if isinstance(tokens, str) else list(tokens)
    pos = 0

    def node():
        nonlocal pos
        if pos >= len(toks):
            raise ValueError("listops: unexpected end of expression")
        t = toks[pos]
        pos += 1
        if t in OPERATORS:
            args = []
            while pos < len(toks) and toks[pos] != END:
                args.append(node())
            if pos >= len(toks):
                raise ValueError("listops: missing ']'")
            pos += 1
            if not args:
                raise ValueError(f"listops: operator {t} without arguments")
            return (t, args)
        if t.isdigit() and len(t) == 1:
            return int(t)
        raise ValueError(f"listops: unexpected token {t!r}")

    tree = node()
    if pos != len(toks):
        raise ValueError("listops: trailing tokens after the expression")
    return tree


def encode(tokens: list) -> np.ndarray:
    """Token strings -> ids (int64 ``[N]``)."""
    return np.array([TOKEN_ID[t] for t in tokens], dtype=np.int64)


def decode(ids) -> list:
    """Ids -> token strings, padding dropped."""
    return [VOCAB[int(i)] for i in ids if int(i) != 0]


def generate_tree(rng: np.random.Generator, depth: int, max_depth: int, max_args: int):
    """LRA's ``generate_tree``: returns ``(tree, length)``."""
    r = rng.random() if depth < max_depth else 1.0
    if r > 1.0 - LEAF_PROBABILITY:
        return int(rng.integers(10)), 1
    n = int(rng.integers(2, max_args + 1))
    args, length = [], 2
    for _ in range(n):
        sub, sub_len = generate_tree(rng, depth + 1, max_depth, max_args)
        args.append(sub)
        length += sub_len
    return (OPERATORS[int(rng.integers(len(OPERATORS)))], args), length


class ListOps(Task):
    """ListOps with ``min_length < N < max_length`` tokens (default the ``small`` preset;
    ``preset="lra"`` is LRA's 500 < N < 2000)."""

    name = "listops"
    kind = "classify"
    num_classes = 10
    vocab_size = len(VOCAB)

    def __init__(self, seed: int = 0, *, preset: str | None = None, min_length: int | None = None,
                 max_length: int | None = None, length: int | None = None,
                 max_depth: int = 10, max_args: int = 10):
        super().__init__(seed)
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"preset: expected one of {list(PRESETS)}, got {preset!r}")
        lo, hi = PRESETS[preset or "small"]
        if length is not None:  # --length L: sequences shorter than L, longer than L/4
            hi, lo = length, length // 4
        lo = lo if min_length is None else min_length
        hi = hi if max_length is None else max_length
        for name, v in (("min_length", lo), ("max_length", hi), ("max_depth", max_depth), ("max_args", max_args)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {v!r}")
        if hi - lo < 2 or hi < 3:
            raise ValueError(f"max_length: need min_length < N < max_length with room, got {lo}, {hi}")
        if max_args < 2:
            raise ValueError(f"max_args: expected >= 2, got {max_args}")
        self.min_length, self.max_length = lo, hi
        self.max_depth, self.max_args = max_depth, max_args
        self.max_len = hi - 1

    def options(self) -> dict:
        return {"min_length": self.min_length, "max_length": self.max_length,
                "max_depth": self.max_depth, "max_args": self.max_args}

    def generate(self, rng: np.random.Generator, index: int) -> Example:
        while True:
            tree, length = generate_tree(rng, 1, self.max_depth, self.max_args)
            if self.min_length < length < self.max_length:
                return Example(encode(to_tokens(tree)), evaluate(tree))
