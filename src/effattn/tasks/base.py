"""What every task shares: deterministic examples, hash-disjoint splits, batching.

Example ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed, s, i, attempt])``
for ``attempt = 0, 1, ...`` until the example's content hash falls in ``s``'s share of hash
space (train 80 %, val 10 %, test 10 %).  So examples are reproducible one by one (random
access: a data-parallel rank builds only its own), and the splits cannot share an example:
identical content has an identical hash, hence one split.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Optional

import numpy as np
import torch

SPLITS = {"train": (0, 80), "val": (80, 90), "test": (90, 100)}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
MAX_ATTEMPTS = 10_000


@dataclasses.dataclass
class Example:
    """One example: ``tokens`` int64 ``[N]`` and ``target`` (an int class, or int64 ``[N]``
    per-token targets with -100 where there is nothing to predict)."""

    tokens: np.ndarray
    target: object


@dataclasses.dataclass
class Batch:
    """A collated batch: ``inputs`` long ``[B, N]``, ``targets`` long ``[B]`` (classification)
    or ``[B, N]`` (per-token, -100 = ignored), ``padding_mask`` bool ``[B, N]`` or None."""

    inputs: torch.Tensor
    targets: torch.Tensor
    padding_mask: Optional[torch.Tensor]

    def to(self, device) -> "Batch":
        pm = None if self.padding_mask is None else self.padding_mask.to(device)
        return Batch(self.inputs.to(device), self.targets.to(device), pm)


def content_hash(ex: Example) -> int:
    """A 64-bit hash of an example's tokens and target (stable across runs and platforms)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(np.ascontiguousarray(ex.tokens, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.ascontiguousarray(np.asarray(ex.target), dtype=np.int64).tobytes())
    return int.from_bytes(h.digest(), "little")


def split_of(ex: Example) -> str:
    """The split an example belongs to, by its content hash."""
    bucket = content_hash(ex) % 100
    for name, (lo, hi) in SPLITS.items():
        if lo <= bucket < hi:
            return name
    raise AssertionError(bucket)


class Task:
    """Base class.  Subclasses set ``name``, ``kind`` (``"classify"`` or ``"lm"``),
    ``vocab_size``, ``num_classes`` (classify), ``max_len`` and ``pad_id``, and implement
    :meth:`generate` (one candidate example from a numpy ``Generator``; may use ``index``)."""

    name = "task"
    kind = "classify"
    vocab_size = 0
    num_classes = 0
    max_len = 0
    pad_id = 0

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        self.seed = seed
        self._cache: dict = {}

    def options(self) -> dict:
        """The constructor options that reproduce this task (saved with checkpoints)."""
        raise NotImplementedError

    def generate(self, rng: np.random.Generator, index: int) -> Example:
        raise NotImplementedError

    def example(self, split: str, index: int) -> Example:
        """Example ``index`` (>= 0) of ``split`` (train, val, test); deterministic."""
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {list(SPLITS)}, got {split!r}")
        key = (split, index)
        if split != "train" and key in self._cache:
            return self._cache[key]
        for attempt in range(MAX_ATTEMPTS):
            rng = np.random.default_rng([self.seed, SPLIT_IDS[split], index, attempt])
            ex = self.generate(rng, index)
            if split_of(ex) == split:
                if split != "train":
                    self._cache[key] = ex
                return ex
        raise RuntimeError(f"{self.name}: found no {split} example in {MAX_ATTEMPTS} draws; "
                           "the example space is too small for disjoint splits")

    def batch(self, split: str, start: int, count: int) -> Batch:
        """Examples ``start .. start+count-1`` of ``split``, padded to the longest with ``pad_id``."""
        exs = [self.example(split, start + i) for i in range(count)]
        return self.collate(exs)

    def collate(self, exs: list) -> Batch:
        """Stack examples into a :class:`Batch` (right padding; mask only if lengths differ)."""
        n = max(len(e.tokens) for e in exs)
        inputs = torch.full((len(exs), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(exs), n, dtype=torch.bool)
        per_token = self.kind == "lm"
        targets = torch.full((len(exs), n), -100, dtype=torch.long) if per_token else \
            torch.empty(len(exs), dtype=torch.long)
        for i, e in enumerate(exs):
            L = len(e.tokens)
            inputs[i, :L] = torch.from_numpy(np.asarray(e.tokens, dtype=np.int64))
            mask[i, :L] = True
            if per_token:
                targets[i, :L] = torch.from_numpy(np.asarray(e.target, dtype=np.int64))
            else:
                targets[i] = int(e.target)
        return Batch(inputs, targets, None if bool(mask.all()) else mask)
