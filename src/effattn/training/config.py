"""Training configuration: defaults, TOML files, command-line overrides, validation.

Precedence: command line > ``--config`` TOML file > the defaults of :class:`TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional

MODELS = ("auto", "classifier", "lm", "vit")
SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a training run (saved as JSON next to each checkpoint)."""

    task: str = "duplication"
    task_options: dict = dataclasses.field(default_factory=dict)
    method: str = "full"
    method_options: dict = dataclasses.field(default_factory=dict)
    shared_qk: Optional[bool] = None  # None: True for lsh (as in Reformer), else False
    model: str = "auto"  # classifier for classification tasks, lm for per-token tasks
    dim: int = 128
    layers: int = 1
    heads: int = 4
    ff_mult: int = 4
    ff_chunks: int = 1
    dropout: float = 0.0
    pos: str = "learned"
    pool: str = "cls"
    reversible: bool = False
    patch: int = 4  # vit only
    window: Optional[int] = None  # vit + window2d only
    steps: int = 300
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 50
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    eval_every: int = 100
    eval_examples: int = 256
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # 0: leave torch's default
    progress: bool = True
    out: str = "runs/effattn"

    def resolved_shared_qk(self) -> bool:
        return self.method == "lsh" if self.shared_qk is None else bool(self.shared_qk)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def parse_value(text: str) -> Any:
    """``"4"`` -> 4, ``"0.5"`` -> 0.5, ``"true"`` -> True, ``"8,8"`` -> (8, 8), else the string."""
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if "," in t:
        return tuple(parse_value(p) for p in t.split(","))
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    try:
        return json.loads(t)
    except ValueError:
        return t


def parse_options(items: Optional[list[str]], flag: str) -> dict:
    """``["n_hashes=4", "seed=0"]`` -> ``{"n_hashes": 4, "seed": 0}``; ValueError naming ``flag``."""
    out = {}
    for item in items or []:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag}: expected key=value, got {item!r}")
        out[key.strip()] = parse_value(val)
    return out


def load_toml(path: str) -> dict:
    """Read a TOML config file; keys are :class:`TrainConfig` fields (tables for the option dicts)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ValueError("--config: reading TOML needs Python >= 3.11 or the 'tomli' package") from None
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config: no such file {path!r}")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config: {path} is not valid TOML ({e})") from None
    data = {k.replace("-", "_"): v for k, v in data.items()}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--config: unknown key(s) {unknown} in {path}")
    for key in ("task_options", "method_options"):
        if key in data and not isinstance(data[key], dict):
            raise ValueError(f"--config: {key} must be a table")
    for key in ("method_options", "task_options"):  # TOML arrays -> tuples (e.g. grid)
        if key in data:
            data[key] = {k: tuple(v) if isinstance(v, list) else v for k, v in data[key].items()}
    return data


def build_config(file: Optional[str], overrides: dict) -> TrainConfig:
    """Merge defaults, the TOML ``file`` and the non-None command-line ``overrides``."""
    values = load_toml(file) if file else {}
    for key, val in overrides.items():
        if val is None:
            continue
        if key in ("task_options", "method_options"):
            values[key] = {**values.get(key, {}), **val}
        else:
            values[key] = val
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def _positive_int(name: str, v, allow_zero: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
        raise ValueError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} int, got {v!r}")


def validate(cfg: TrainConfig) -> None:
    """Check value ranges; ``ValueError`` naming the option (as its command-line flag)."""
    for name in ("dim", "layers", "heads", "ff_mult", "ff_chunks", "steps", "batch", "eval_examples",
                 "log_every", "patch"):
        _positive_int("--" + name.replace("_", "-"), getattr(cfg, name))
    for name in ("warmup", "eval_every", "save_every", "seed", "threads"):
        _positive_int("--" + name.replace("_", "-"), getattr(cfg, name), allow_zero=True)
    for name in ("lr", "clip"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"--{name}: expected a positive number, got {v!r}")
    if not 0 <= cfg.dropout < 1:
        raise ValueError(f"--dropout: expected a number in [0, 1), got {cfg.dropout!r}")
    if not 0 <= cfg.weight_decay:
        raise ValueError(f"--weight-decay: expected a non-negative number, got {cfg.weight_decay!r}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ValueError(f"--min-lr-ratio: expected a number in [0, 1], got {cfg.min_lr_ratio!r}")
    if cfg.model not in MODELS:
        raise ValueError(f"--model: expected one of {MODELS}, got {cfg.model!r}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"--schedule: expected one of {SCHEDULES}, got {cfg.schedule!r}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device: expected auto, cpu or cuda, got {cfg.device!r}")
