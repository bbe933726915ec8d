"""Build the model a :class:`~effattn.training.config.TrainConfig` describes for a task."""

from __future__ import annotations

import torch
from torch import nn

from effattn.nn import CausalLM, EncoderClassifier, ViT
from effattn.tasks import Task


class PixelViT(nn.Module):
    """A :class:`~effattn.nn.ViT` reading pixel-token sequences ``[B, S*S]`` (values 0..255)
    as ``[B, 1, S, S]`` images; ``forward(tokens, padding_mask=None) -> [B, classes]``."""

    def __init__(self, side: int, num_classes: int, **vit_kwargs):
        super().__init__()
        self.side = side
        self.vit = ViT(side, num_classes=num_classes, in_channels=1, **vit_kwargs)

    def forward(self, tokens: torch.Tensor, padding_mask=None) -> torch.Tensor:
        if padding_mask is not None and not bool(padding_mask.all()):
            raise ValueError("padding_mask: a ViT reads whole images; padded pixels are not supported")
        img = tokens.view(tokens.shape[0], 1, self.side, self.side).float() / 255.0
        return self.vit(img)


def model_kind(cfg, task: Task) -> str:
    """``classifier``, ``lm`` or ``vit`` for this config and task."""
    if cfg.model == "auto":
        return "lm" if task.kind == "lm" else "classifier"
    if cfg.model == "lm" and task.kind != "lm":
        raise ValueError(f"--model: task {task.name!r} is a classification task; use classifier or vit")
    if cfg.model in ("classifier", "vit") and task.kind != "classify":
        raise ValueError(f"--model: task {task.name!r} has per-token targets; use lm")
    if cfg.model == "vit" and task.name != "pathfinder":
        raise ValueError(f"--model: vit needs an image task (pathfinder), got {task.name!r}")
    return cfg.model


def build_model(cfg, task: Task) -> nn.Module:
    """The model for ``task``: ``forward(inputs [B, N], padding_mask) -> logits``
    (``[B, classes]`` for classification, ``[B, N, vocab]`` for per-token tasks)."""
    kind = model_kind(cfg, task)
    common = dict(dim=cfg.dim, depth=cfg.layers, heads=cfg.heads, method=cfg.method,
                  dropout=cfg.dropout, reversible=cfg.reversible, ff_mult=cfg.ff_mult,
                  ff_chunks=cfg.ff_chunks, shared_qk=cfg.resolved_shared_qk())
    if kind == "vit":  # ViT sets window2d's per-layer options itself
        return PixelViT(task.size, task.num_classes, patch_size=cfg.patch, window=cfg.window,
                        **common, **cfg.method_options)
    # per layer, so a method option named like a model argument (linformer's max_len)
    # reaches the attention instead of clashing with the model's own
    common["layer_options"] = [dict(cfg.method_options) for _ in range(cfg.layers)]
    if kind == "lm":
        return CausalLM(task.vocab_size, max_len=task.max_len, pos=cfg.pos, **common)
    if kind == "classifier":
        return EncoderClassifier(task.vocab_size, task.num_classes, max_len=task.max_len,
                                 pos=cfg.pos, pool=cfg.pool, **common)
    raise AssertionError(kind)
