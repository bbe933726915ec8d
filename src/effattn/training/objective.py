"""Loss and accuracy as sums, so they can be added across batches and processes exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from effattn.nn.lm import IGNORE_INDEX


def loss_terms(logits: torch.Tensor, targets: torch.Tensor):
    """``(loss_sum, count, correct)`` of cross-entropy over non-ignored targets.

    ``logits [B, C]`` with ``targets [B]``, or ``logits [B, N, V]`` with ``targets [B, N]``
    (``-100`` = ignored).  ``loss_sum`` is differentiable (float32); ``count`` and
    ``correct`` are integer tensors.
    """
    if logits.dim() == 3:
        logits, targets = logits.flatten(0, 1), targets.flatten()
    valid = targets != IGNORE_INDEX
    loss_sum = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    correct = ((logits.argmax(-1) == targets) & valid).sum()
    return loss_sum, valid.sum(), correct
