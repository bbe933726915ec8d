"""Checkpoints: model weights as safetensors, run config as JSON, optimizer state for resuming.

Layout of a checkpoint directory::

    model.safetensors      the model's state dict
    config.json            {"config": TrainConfig fields, "task": task options, "step": int}
    optimizer.safetensors  optimizer tensors + the CPU RNG state
    optimizer.json         the optimizer's param groups and state keys
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
OPT_FILE, OPT_META_FILE = "optimizer.safetensors", "optimizer.json"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(directory, model: torch.nn.Module, optimizer, config: dict, task_options: dict,
                    step: int) -> Path:
    """Write the checkpoint files into ``directory`` (created if needed); returns it."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(d / MODEL_FILE))
    if optimizer is not None:
        osd = optimizer.state_dict()
        tensors, keys = {}, {}
        for idx, st in osd["state"].items():
            keys[str(idx)] = {}
            for name, val in st.items():
                if isinstance(val, torch.Tensor):
                    tensors[f"state.{idx}.{name}"] = val.detach().contiguous().cpu()
                    keys[str(idx)][name] = "tensor"
                else:
                    keys[str(idx)][name] = val
        tensors["rng.cpu"] = torch.get_rng_state()
        save_file(tensors, str(d / OPT_FILE))
        _atomic_write_text(d / OPT_META_FILE, json.dumps({"param_groups": osd["param_groups"], "state": keys}))
    _atomic_write_text(d / CONFIG_FILE, json.dumps(
        {"config": config, "task": task_options, "step": step}, indent=2, default=list))
    return d


def read_config(directory) -> dict:
    """The ``config.json`` of a checkpoint; ``ValueError`` if ``directory`` holds none."""
    p = Path(directory) / CONFIG_FILE
    if not p.is_file() or not (Path(directory) / MODEL_FILE).is_file():
        raise ValueError(f"--checkpoint: {directory!r} holds no checkpoint ({CONFIG_FILE} + {MODEL_FILE})")
    return json.loads(p.read_text())


def load_model_state(directory, model: torch.nn.Module, *, ignore_prefix_part: str | None = None) -> list:
    """Load weights into ``model``.  Keys containing ``ignore_prefix_part`` may be missing or
    extra (an attention method with its own parameters was swapped); returns those skipped."""
    state = load_file(str(Path(directory) / MODEL_FILE))
    own = model.state_dict()
    skipped = []
    if ignore_prefix_part:
        for k in list(state):
            if ignore_prefix_part in k and (k not in own or own[k].shape != state[k].shape):
                skipped.append(k)
                del state[k]
        missing = [k for k in own if k not in state and ignore_prefix_part in k]
        skipped += missing
        strict_keys = [k for k in own if k not in missing]
        result = model.load_state_dict(state, strict=False)
        bad = [k for k in result.missing_keys if k in strict_keys] + list(result.unexpected_keys)
        if bad:
            raise ValueError(f"--checkpoint: weights do not fit the model: {bad[:5]}")
    else:
        model.load_state_dict(state, strict=True)
    return skipped


def load_optimizer_state(directory, optimizer) -> None:
    """Restore the optimizer (and CPU RNG state) saved by :func:`save_checkpoint`."""
    d = Path(directory)
    tensors = load_file(str(d / OPT_FILE))
    meta = json.loads((d / OPT_META_FILE).read_text())
    state = {}
    for idx, names in meta["state"].items():
        state[int(idx)] = {n: (tensors[f"state.{idx}.{n}"] if v == "tensor" else v) for n, v in names.items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
