"""``effattn repro``: reproduce the literature's quality tables at CPU scale (a typer group).

    effattn repro reformer-table2 [--length L] [--steps S] [--out DIR]
    effattn repro listops [--preset cpu|paper] [--methods a,b] [--out DIR]
    effattn repro mqar [--settings 64:4,128:8] [--methods a,b] [--out DIR]

Each writes ``report.md`` (ours beside the published figures), ``results.json`` and PNG
plots to ``--out`` (default ``runs/repro/<experiment>/``).  Bad arguments print one line
``error: ...`` and exit with code 2.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import List, Optional

import typer

from effattn.cli_args import fail as _fail, split_values as _split

repro_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Reproduce published quality tables (Reformer, LRA ListOps, Zoology MQAR) at CPU scale.")

DEFAULT_OUT = os.path.join("runs", "repro")


def command_text(ctx: typer.Context) -> str:
    """The command as ``effattn repro NAME`` plus the options given (those not at their
    default), for the top of the report."""
    parts = ["effattn", "repro", ctx.info_name or ""]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if v is None or v == p.default or v in ((), []) or not p.opts:
            continue
        if isinstance(v, bool):
            if v:
                parts.append(p.opts[0])
            elif p.secondary_opts:
                parts.append(p.secondary_opts[0])
            continue
        if isinstance(v, (list, tuple)):
            v = ",".join(str(x) for x in v)
        parts += [p.opts[0], shlex.quote(str(v))]
    return " ".join(parts)


def _out_dir(out: Optional[str], name: str) -> Path:
    path = Path(out) if out else Path(DEFAULT_OUT) / name
    if path.exists() and not path.is_dir():
        _fail(f"--out: {str(path)!r} exists and is not a folder")
    return path


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        _fail(f"--device: expected auto, cpu or cuda, got {device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _fail("--device cuda: CUDA is not available on this machine")


def _console(quiet: bool):
    from rich.console import Console

    return Console(stderr=True, quiet=False), not quiet


def _finish(console, results: dict, out: Path) -> None:
    console.print(f"wrote {out / 'report.md'}, results.json and {len(results.get('plots', []))} plot(s) "
                  f"in {results['wall_time_s']:.0f} s")


@repro_app.command("reformer-table2")
def reformer_cmd(
    ctx: typer.Context,
    length: int = typer.Option(256, help="sequence length (paper: 1024)"),
    steps: int = typer.Option(250, help="training steps of each of the four models"),
    batch: int = typer.Option(32, help="batch size"),
    chunk_len: int = typer.Option(16, help="LSH chunk length (length / chunk_len buckets per round)"),
    dim: int = typer.Option(256, help="d_model = d_ff (paper: 256)"),
    eval_examples: int = typer.Option(256, help="test sequences per evaluation"),
    seed: int = typer.Option(0, help="seed of data, initialization and hashes"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    out: Optional[str] = typer.Option(None, help="output folder (default runs/repro/reformer-table2/)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Reformer Table 2: duplication task, 4 trained x 5 evaluated attentions, beside the paper."""
    from effattn.repro.reformer import ReformerSettings, run

    _check_device(device)
    settings = ReformerSettings(length=length, steps=steps, batch=batch, chunk_len=chunk_len, dim=dim,
                                eval_examples=eval_examples, seed=seed, device=device)
    try:
        settings.check()
    except ValueError as e:
        _fail(str(e))
    path = _out_dir(out, "reformer-table2")
    console, progress = _console(quiet)
    results = run(settings, path, console=console, progress=progress, command=command_text(ctx))
    _finish(console, results, path)


@repro_app.command("listops")
def listops_cmd(
    ctx: typer.Context,
    preset: str = typer.Option("cpu", help="cpu (short sequences, small model) or paper (LRA's configuration)"),
    methods: Optional[List[str]] = typer.Option(None, "--methods", "-m", help="methods (comma-separated or repeated); default every applicable one"),
    steps: Optional[int] = typer.Option(None, help="training steps per method (overrides the preset)"),
    batch: Optional[int] = typer.Option(None, help="batch size"),
    min_length: Optional[int] = typer.Option(None, help="sequences longer than this"),
    max_length: Optional[int] = typer.Option(None, help="sequences shorter than this"),
    train_pool: Optional[int] = typer.Option(None, help="distinct training examples (cycled)"),
    test_examples: Optional[int] = typer.Option(None, help="test examples"),
    val_examples: Optional[int] = typer.Option(None, help="validation examples (end of training)"),
    dim: Optional[int] = typer.Option(None, help="d_model"),
    layers: Optional[int] = typer.Option(None, help="encoder layers"),
    heads: Optional[int] = typer.Option(None, help="attention heads"),
    seed: Optional[int] = typer.Option(None, help="seed of data and initialization"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    out: Optional[str] = typer.Option(None, help="output folder (default runs/repro/listops-<preset>/)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """LRA ListOps with every applicable method: accuracy, time, tokens/s, memory beside LRA's."""
    from effattn.repro.listops import check_methods, run, settings_for

    _check_device(device)
    chosen = _split(methods)
    try:
        settings = settings_for(preset, steps=steps, batch=batch, min_length=min_length, max_length=max_length,
                                train_pool=train_pool, test_examples=test_examples, val_examples=val_examples,
                                dim=dim, layers=layers, heads=heads, seed=seed, device=device)
        settings.check()
        if chosen is not None:
            check_methods(chosen)
    except ValueError as e:
        _fail(str(e))
    path = _out_dir(out, f"listops-{preset}")
    console, progress = _console(quiet)
    results = run(settings, chosen, path, console=console, progress=progress, command=command_text(ctx))
    _finish(console, results, path)


@repro_app.command("mqar")
def mqar_cmd(
    ctx: typer.Context,
    methods: Optional[List[str]] = typer.Option(None, "--methods", "-m", help="causal methods (comma-separated or repeated); default every one"),
    settings: Optional[str] = typer.Option(None, "--settings", help="LENGTH:PAIRS list, default 64:4 (Zoology's range: 64:4,128:8,256:16,512:64 with --vocab 256)"),
    steps: Optional[int] = typer.Option(None, help="training steps per method (the settings take turns)"),
    batch: Optional[int] = typer.Option(None, help="batch size"),
    train_pool: Optional[int] = typer.Option(None, help="distinct training sequences per setting"),
    test_examples: Optional[int] = typer.Option(None, help="test sequences per setting"),
    vocab: Optional[int] = typer.Option(None, help="vocabulary size"),
    dim: Optional[int] = typer.Option(None, help="d_model"),
    layers: Optional[int] = typer.Option(None, help="layers"),
    heads: Optional[int] = typer.Option(None, help="attention heads"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate"),
    pos: Optional[str] = typer.Option(None, help="positions: rotary (default), learned, sinusoidal or none"),
    seed: Optional[int] = typer.Option(None, help="seed of data and initialization"),
    device: str = typer.Option("auto", help="auto, cpu or cuda"),
    out: Optional[str] = typer.Option(None, help="output folder (default runs/repro/mqar/)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bars"),
):
    """Zoology MQAR: a two-layer causal LM per causal method, accuracy per length and pairs."""
    from effattn.repro.mqar import MQARSettings, check_methods, parse_settings, run

    _check_device(device)
    chosen = _split(methods)
    s = MQARSettings(device=device)
    try:
        if settings is not None:
            s.settings = parse_settings(settings)
        for k, v in dict(steps=steps, batch=batch, train_pool=train_pool, test_examples=test_examples,
                         vocab=vocab, dim=dim, layers=layers, heads=heads, lr=lr, pos=pos, seed=seed).items():
            if v is not None:
                setattr(s, k, v)
        if lr is not None and not lr > 0:
            raise ValueError(f"--lr: expected a positive number, got {lr}")
        s.check()
        if chosen is not None:
            check_methods(chosen)
    except ValueError as e:
        _fail(str(e))
    path = _out_dir(out, "mqar")
    console, progress = _console(quiet)
    results = run(s, chosen, path, console=console, progress=progress, command=command_text(ctx))
    _finish(console, results, path)


def register(app: typer.Typer) -> None:
    """Add the ``repro`` group to the ``effattn`` app."""
    app.add_typer(repro_app, name="repro")
