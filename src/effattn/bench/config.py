"""Benchmark configuration: the shipped defaults, TOML loading, command-line overrides, checks.

A sweep is a :class:`BenchConfig`.  :func:`load_config` reads the packaged
``default.toml``, merges a user TOML file over it, applies overrides and validates
everything, raising :class:`ConfigError` (a ``ValueError``) with a one-line message.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import math
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from typing import Any, Optional

from effattn.bench.cases import FAMILIES

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEVICES = ("cpu", "cuda")
N_PLACEHOLDER = "$N"
GRID_PLACEHOLDER = "$grid"  # (r, r) with r*r = N; a non-square N is not applicable


def resolve_option(value, n: int):
    """An option value with the placeholders ``"$N"`` (-> ``n``) and ``"$grid"`` (-> ``[r, r]``,
    ``r = sqrt(n)``) resolved; ``ValueError`` if ``n`` is not a square for ``"$grid"``."""
    if value == N_PLACEHOLDER:
        return n
    if value == GRID_PLACEHOLDER:
        r = math.isqrt(n)
        if r * r != n:
            raise ValueError(f"N={n} is not a square grid (option value \"$grid\")")
        return [r, r]
    return value


class ConfigError(ValueError):
    """A bad benchmark setting (message is one line, naming the setting)."""


@dataclasses.dataclass
class MethodSettings:
    """Per-method bench settings: ``options`` for ``effattn.get``, ``max_len``, ``shared_qk``."""

    options: dict = dataclasses.field(default_factory=dict)
    max_len: Optional[int] = None
    shared_qk: bool = False

    def resolved(self, n: int) -> dict:
        """``options`` with the placeholders resolved for sequence length ``n`` (:func:`resolve_option`)."""
        return {k: resolve_option(v, n) for k, v in self.options.items()}


@dataclasses.dataclass
class BenchConfig:
    """One benchmark sweep.  Shapes: inputs are ``[batch, heads, N, dim]`` for each N in ``lengths``."""

    methods: list = dataclasses.field(default_factory=list)  # empty = all registered
    exclude: list = dataclasses.field(default_factory=list)
    lengths: list = dataclasses.field(default_factory=lambda: [1024])
    batch: int = 1
    heads: int = 4
    dim: int = 64
    dim_v: Optional[int] = None
    dtype: str = "fp32"
    backward: bool = False
    causal: bool = False
    peers: bool = False
    repeats: int = 3
    warmup: int = 1
    timeout: float = 90.0
    max_memory_mb: float = 0.0
    threads: int = 0
    retain_freed_memory: bool = False
    device: str = "cpu"
    accuracy_lengths: list = dataclasses.field(default_factory=lambda: [1024])
    accuracy_families: list = dataclasses.field(default_factory=lambda: list(FAMILIES))
    accuracy_seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    accuracy_timeout: float = 120.0
    budgets_mb: list = dataclasses.field(default_factory=lambda: [256, 1024, 4096])
    error_thresholds: list = dataclasses.field(default_factory=lambda: [0.01, 0.05, 0.10])
    method_settings: dict = dataclasses.field(default_factory=dict)  # name -> MethodSettings
    peer_names: list = dataclasses.field(default_factory=list)

    @property
    def dv(self) -> int:
        """Value head dim (``dim_v`` or ``dim``)."""
        return self.dim_v or self.dim

    def settings(self, name: str) -> MethodSettings:
        """The :class:`MethodSettings` of method ``name`` (empty defaults if not configured)."""
        return self.method_settings.get(name, MethodSettings())

    def to_dict(self) -> dict:
        """A JSON-ready dict of every setting (stored in ``results.json``)."""
        d = dataclasses.asdict(self)
        d["method_settings"] = {k: dataclasses.asdict(v) for k, v in self.method_settings.items()}
        return d


# ------------------------------------------------------------------ reading TOML


#: packaged presets merged over ``default.toml`` (``effattn bench --long``)
PRESETS = {"long": "long.toml", "peers": "peers.toml"}


def default_toml_text(name: str = "default.toml") -> str:
    """The text of a packaged TOML (``default.toml`` or a preset's file)."""
    return importlib.resources.files("effattn.bench").joinpath(name).read_text("utf-8")


def read_toml(path: str) -> dict:
    """Parse a TOML file; :class:`ConfigError` if it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path!r}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path!r} is not valid TOML: {e}") from None


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


_BENCH_KEYS = {f.name for f in dataclasses.fields(BenchConfig)} - {
    "accuracy_lengths", "accuracy_families", "accuracy_seeds", "accuracy_timeout",
    "budgets_mb", "error_thresholds", "method_settings", "peer_names"}
_SECTIONS = {"bench", "accuracy", "recommend", "methods", "peers"}


def from_dict(raw: dict) -> BenchConfig:
    """Build a :class:`BenchConfig` from parsed TOML (sections bench/accuracy/recommend/methods/peers)."""
    unknown = set(raw) - _SECTIONS
    if unknown:
        raise ConfigError(f"config: unknown section(s) {sorted(unknown)}; expected {sorted(_SECTIONS)}")
    cfg = BenchConfig()
    bench = dict(raw.get("bench", {}))
    bad = set(bench) - _BENCH_KEYS
    if bad:
        raise ConfigError(f"config [bench]: unknown key(s) {sorted(bad)}")
    methods = bench.pop("methods", "all")
    cfg.methods = [] if methods in ("all", None, []) else _str_list("methods", methods)
    for k, v in bench.items():
        setattr(cfg, k, v)
    acc = dict(raw.get("accuracy", {}))
    for key, attr in (("lengths", "accuracy_lengths"), ("families", "accuracy_families"),
                      ("seeds", "accuracy_seeds"), ("timeout", "accuracy_timeout")):
        if key in acc:
            setattr(cfg, attr, acc.pop(key))
    if acc:
        raise ConfigError(f"config [accuracy]: unknown key(s) {sorted(acc)}")
    rec = dict(raw.get("recommend", {}))
    cfg.budgets_mb = rec.pop("budgets_mb", cfg.budgets_mb)
    cfg.error_thresholds = rec.pop("errors", cfg.error_thresholds)
    if rec:
        raise ConfigError(f"config [recommend]: unknown key(s) {sorted(rec)}")
    cfg.method_settings = {}
    for name, ms in raw.get("methods", {}).items():
        if not isinstance(ms, dict):
            raise ConfigError(f"config [methods.{name}]: expected a table")
        ms = dict(ms)
        opts = ms.pop("options", {})
        if not isinstance(opts, dict):
            raise ConfigError(f"config [methods.{name}].options: expected a table")
        st = MethodSettings(options=opts, max_len=ms.pop("max_len", None),
                            shared_qk=ms.pop("shared_qk", False))
        if ms:
            raise ConfigError(f"config [methods.{name}]: unknown key(s) {sorted(ms)}; "
                              "method options go in `options = {...}`")
        cfg.method_settings[name] = st
    peers = dict(raw.get("peers", {}))
    cfg.peer_names = _str_list("peers.names", peers.pop("names", []))
    if peers:
        raise ConfigError(f"config [peers]: unknown key(s) {sorted(peers)}")
    return cfg


def _str_list(name: str, v: Any) -> list:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{name}: expected a list of names, got {v!r}")
    return list(v)


# ------------------------------------------------------------------ validation


def _pos_int(name: str, v: Any, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ConfigError(f"{name}: expected an integer >= {minimum}, got {v!r}")
    return v


def _pos_float(name: str, v: Any, allow_zero: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} number, got {v!r}")
    return float(v)


def _int_list(name: str, v: Any) -> list:
    if not isinstance(v, list) or not v:
        raise ConfigError(f"{name}: expected a non-empty list of integers, got {v!r}")
    return [_pos_int(name, x) for x in v]


def validate(cfg: BenchConfig, registered: list) -> BenchConfig:
    """Check every field of ``cfg`` against the ``registered`` method names; returns ``cfg``."""
    cfg.lengths = sorted(set(_int_list("lengths", cfg.lengths)))
    cfg.accuracy_lengths = sorted(set(_int_list("accuracy.lengths", cfg.accuracy_lengths))) \
        if cfg.accuracy_lengths else []
    for name in ("batch", "heads", "dim", "repeats"):
        setattr(cfg, name, _pos_int(name, getattr(cfg, name)))
    if cfg.dim_v is not None:
        _pos_int("dim_v", cfg.dim_v)
    cfg.warmup = _pos_int("warmup", cfg.warmup, 0)
    cfg.threads = _pos_int("threads", cfg.threads, 0)
    cfg.timeout = _pos_float("timeout", cfg.timeout)
    cfg.accuracy_timeout = _pos_float("accuracy.timeout", cfg.accuracy_timeout)
    cfg.max_memory_mb = _pos_float("max_memory_mb", cfg.max_memory_mb or 0, allow_zero=True)
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"dtype: expected one of {list(DTYPES)}, got {cfg.dtype!r}")
    if cfg.device not in DEVICES:
        raise ConfigError(f"device: expected one of {list(DEVICES)}, got {cfg.device!r}")
    for name in ("backward", "causal", "peers", "retain_freed_memory"):
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name}: expected true or false, got {getattr(cfg, name)!r}")
    for m in list(cfg.methods) + list(cfg.exclude):
        if m not in registered:
            raise ConfigError(f"methods: unknown attention method {m!r}; choose from {', '.join(registered)}")
    fams = set(FAMILIES)
    if not isinstance(cfg.accuracy_families, list) or not cfg.accuracy_families \
            or not set(cfg.accuracy_families) <= fams:
        raise ConfigError(f"accuracy.families: expected a subset of {sorted(fams)}, got {cfg.accuracy_families!r}")
    if not isinstance(cfg.accuracy_seeds, list) or not cfg.accuracy_seeds:
        raise ConfigError(f"accuracy.seeds: expected a non-empty list of integers, got {cfg.accuracy_seeds!r}")
    cfg.accuracy_seeds = [_pos_int("accuracy.seeds", s, 0) for s in cfg.accuracy_seeds]
    cfg.budgets_mb = [_pos_float("recommend.budgets_mb", b) for b in cfg.budgets_mb]
    cfg.error_thresholds = [_pos_float("recommend.errors", e) for e in cfg.error_thresholds]
    for name, st in cfg.method_settings.items():
        if st.max_len is not None:
            _pos_int(f"methods.{name}.max_len", st.max_len)
        if not isinstance(st.shared_qk, bool):
            raise ConfigError(f"methods.{name}.shared_qk: expected true or false")
    from effattn.bench.peers import PEERS

    for p in cfg.peer_names:
        if p not in PEERS:
            raise ConfigError(f"peers.names: unknown peer {p!r}; choose from {', '.join(PEERS)}")
    return cfg


def selected_methods(cfg: BenchConfig, registered: list) -> list:
    """Methods to run in registry order; ``full`` (the SDPA baseline) is always included."""
    chosen = cfg.methods or [m for m in registered if m not in cfg.exclude]
    if "full" not in chosen:
        chosen = ["full"] + list(chosen)
    return [m for m in registered if m in chosen]


def load_config(path: Optional[str] = None, overrides: Optional[dict] = None,
                registered: Optional[list] = None, preset: Optional[str] = None) -> BenchConfig:
    """Defaults <- packaged ``preset`` (a :data:`PRESETS` name) <- TOML file at ``path`` <-
    ``overrides`` (BenchConfig field -> value), validated."""
    raw = tomllib.loads(default_toml_text())
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"preset: unknown preset {preset!r}; choose from {sorted(PRESETS)}")
        raw = _merge(raw, tomllib.loads(default_toml_text(PRESETS[preset])))
    if path is not None:
        raw = _merge(raw, read_toml(path))
    cfg = from_dict(raw)
    for k, v in (overrides or {}).items():
        if v is not None:
            setattr(cfg, k, v)
    if registered is None:
        import effattn

        registered = [m["name"] for m in effattn.methods()]
    return validate(cfg, registered)
