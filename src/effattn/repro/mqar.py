"""``effattn repro mqar``: Zoology's multi-query associative recall (Arora et al. 2023) with
every causal-capable effattn method.

As in Zoology, one two-layer causal LM per method is trained on a mixture of settings
(sequence length, key-value pairs) — here one setting per step, in turn — and tested on
each setting separately.  Zoology reports exact attention at ~100 % up to length 512 with
64 pairs; the question is how far each approximation falls below it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import effattn
from effattn.nn.positional import POSITIONAL
from effattn.repro import harness
from effattn.repro.data import MixedTask, PooledTask
from effattn.repro.published import ZOOLOGY_SOURCE, zoology_mqar
from effattn.tasks import make_task
from effattn.training.config import TrainConfig

#: exact methods that compute the same function as ``full`` (run only when asked for)
EXACT_DUPLICATES = ("naive", "blockwise")
DEFAULT_SETTINGS = ((64, 4),)  # what a CPU budget learns; Zoology's range: --settings 64:4,128:8,256:16,512:64 --vocab 256 (GPU)


@dataclasses.dataclass
class MQARSettings:
    """Data, model and budget (the same for every method)."""

    settings: tuple = DEFAULT_SETTINGS
    vocab: int = 64  # Zoology: 8192; small so the CPU budget learns something (64 pairs need 256)
    power_a: float = 0.01
    train_pool: int = 40000  # distinct training sequences per setting
    test_examples: int = 200  # per setting
    dim: int = 64
    layers: int = 2
    heads: int = 2
    steps: int = 3000  # in all, shared by the settings in turn (full attention leaves the
    batch: int = 64    # plateau at 1/pairs after ~1,000 steps at N=64 and is ~90 % at 2,800)
    lr: float = 3e-3
    pos: str = "rotary"  # relative positions: the induction circuit forms far sooner
    weight_decay: float = 0.1
    warmup: int = 50
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        """``ValueError`` naming the flag for values the run cannot use."""
        for name in ("steps", "batch", "train_pool", "test_examples", "dim", "layers", "heads", "vocab"):
            v = getattr(self, name)
            if v < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected a positive int, got {v}")
        if self.pos not in POSITIONAL:
            raise ValueError(f"--pos: expected one of {POSITIONAL}, got {self.pos!r}")
        if not self.settings:
            raise ValueError("--settings: expected at least one LENGTH:PAIRS")
        for n, p in self.settings:
            if p < 1 or n < 4 * p:
                raise ValueError(f"--settings: {n}:{p} needs pairs >= 1 and length >= 4 x pairs")
            if p > self.vocab // 2 - 1:
                raise ValueError(f"--vocab: {p} pairs need a vocabulary of at least {2 * p + 2}, got {self.vocab}")


def parse_settings(text: str) -> tuple:
    """``"64:4,128:8"`` -> ``((64, 4), (128, 8))``; ``ValueError`` naming ``--settings``."""
    out = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        n, sep, p = item.partition(":")
        try:
            if not sep:
                raise ValueError
            out.append((int(n), int(p)))
        except ValueError:
            raise ValueError(f"--settings: expected LENGTH:PAIRS[,LENGTH:PAIRS...], got {item!r}") from None
    if not out:
        raise ValueError("--settings: expected at least one LENGTH:PAIRS")
    return tuple(out)


def causal_methods() -> list:
    """Every registered method that can be causal, except the exact duplicates of ``full``."""
    return [m["name"] for m in effattn.methods() if m["causal"] and m["name"] not in EXACT_DUPLICATES]


def check_methods(methods: list) -> None:
    """``ValueError`` for unknown or non-causal method names."""
    table = {m["name"]: m for m in effattn.methods()}
    for m in methods:
        if m not in table:
            raise ValueError(f"--methods: unknown method {m!r}; choose from {list(table)}")
        if not table[m]["causal"]:
            raise ValueError(f"--methods: {m} cannot be causal; MQAR needs a causal LM")


def method_options(method: str, max_len: int) -> dict:
    """Options that keep ``method`` sparse / approximate at the longest setting ``max_len``:
    blocks of ``u = max(4, max_len // 16)`` tokens, windows and hash chunks of ``2u`` (at
    N = 64: a query sees about a third of the keys), 64 random features."""
    u = max(4, max_len // 16)
    if method == "lsh":
        return {"n_hashes": 2, "chunk_len": 2 * u}
    if method == "sparse_strided":
        return {"stride": 2 * u, "block_size": u}
    if method == "sparse_fixed":
        return {"stride": 4 * u, "block_size": u, "summary": max(1, u // 2)}
    if method == "longformer":
        return {"window": 2 * u, "block_size": u}
    if method in ("bigbird", "bigbird_etc"):
        opts = {"block_size": u, "n_window_blocks": 3, "n_global_blocks": 1, "n_random_blocks": 1}
        if method == "bigbird_etc":
            opts["extra_global_tokens"] = 2
        return opts
    if method == "performer":
        return {"n_features": 64}
    return {}


def train_config(s: MQARSettings, method: str, out: Path, progress: bool) -> TrainConfig:
    """The :class:`TrainConfig` of ``method``'s run (on the mixture of settings)."""
    longest = max(n for n, _ in s.settings)
    return TrainConfig(task="mqar", task_options={}, method=method, method_options=method_options(method, longest),
                       model="lm", dim=s.dim, layers=s.layers, heads=s.heads, pos=s.pos, steps=s.steps, batch=s.batch,
                       lr=s.lr, weight_decay=s.weight_decay, warmup=min(s.warmup, max(s.steps // 5, 1)),
                       eval_every=0, eval_examples=s.batch * len(s.settings), log_every=10, seed=s.seed,
                       device=s.device, progress=progress, out=str(out))


def run(s: MQARSettings, methods: Optional[list], out_dir: Path, *, console, progress: bool = True,
        command: Optional[str] = None) -> dict:
    """Train one LM per method on the mixture, test it on every setting, write
    ``results.json``, ``report.md`` and the plot into ``out_dir``; returns the results."""
    from effattn.repro import plots, tables

    s.check()
    chosen = causal_methods() if methods is None else list(methods)
    check_methods(chosen)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    tasks = [PooledTask(make_task("mqar", seed=s.seed, length=n, vocab_size=s.vocab, num_kv_pairs=p,
                                  power_a=s.power_a), s.train_pool) for n, p in s.settings]
    mixture = MixedTask(tasks, s.batch)
    runs = []

    def snapshot(final: bool) -> dict:
        results = {
            "experiment": "mqar", "schema": harness.SCHEMA_VERSION, "date": harness.today(),
            "command": command or harness.command_line(),
            "config": {**dataclasses.asdict(s), "settings": [list(x) for x in s.settings]},
            "settings": [list(x) for x in s.settings], "methods": chosen, "runs": list(runs), "complete": final,
            "published": {"source": ZOOLOGY_SOURCE, "per_method": {m: zoology_mqar(m) for m in chosen}},
            "notes": [f"Chance accuracy is {100 / (s.vocab - s.vocab // 2):.1f} % (one of the "
                      f"{s.vocab - s.vocab // 2} value tokens).",
                      "Blocks, windows and hash chunks are sized to the longest setting (see the options "
                      "column): each query sees a fraction of the keys, so recall beyond the pattern has "
                      "to come from global tokens, random blocks or hashing."],
            "wall_time_s": time.perf_counter() - t0, "plots": [],
        }
        done = len({r["method"] for r in runs})
        if not final:
            results["notes"].append(f"Partial results: {done} of {len(chosen)} methods done.")
        results["plots"] = plots.mqar_plot(results, out_dir) if final else []
        harness.write_outputs(out_dir, results, tables.mqar_report(results))
        return results

    for i, method in enumerate(chosen):
        console.print(f"[bold]mqar[/] {i + 1}/{len(chosen)}: {method}")
        cfg = train_config(s, method, out_dir / "runs" / method, progress)
        try:
            model = harness.build(cfg, mixture)
            trained = harness.train_run(cfg, prepared=(mixture, model), echo=console.print)
        except (ValueError, TypeError, RuntimeError) as e:  # one method failing must not end the table
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            runs += [{"method": method, "length": n, "pairs": p, "status": "error", "reason": reason}
                     for n, p in s.settings]
            snapshot(final=False)
            continue
        rec = trained["record"]
        for (n, p), task in zip(s.settings, tasks):
            res = harness.evaluate_on(trained["model"], task, "test", s.test_examples, s.batch)
            runs.append({"method": method, "length": n, "pairs": p, "status": "ok",
                         "test_accuracy": res["accuracy"], "test_loss": res["loss"], "targets": res["targets"],
                         "method_options": cfg.method_options, **rec})
        console.print("  " + ", ".join(f"N={r['length']}: {100 * r['test_accuracy']:.1f}%"
                                       for r in runs if r["method"] == method and r["status"] == "ok"))
        snapshot(final=False)
    results = snapshot(final=True)
    return results
