"""``effattn bench``: the command line of the benchmark (a typer group; its callback runs it).

Bad arguments print one line ``error: ...`` and exit with code 2.
"""

from __future__ import annotations

import importlib
import os
from typing import List, Optional

import typer

from effattn.cli_args import fail as _fail, split_values as _split

bench_app = typer.Typer(add_completion=False, invoke_without_command=True,
                        help="Benchmark attention methods: speed, memory, FLOPs, accuracy.")


def _lengths(values: Optional[List[str]]) -> Optional[list]:
    items = _split(values)
    if items is None:
        return None
    out = []
    for x in items:
        try:
            n = int(x)
        except ValueError:
            _fail(f"--lengths: expected positive integers, got {x!r}")
        if n < 1:
            _fail(f"--lengths: expected positive integers, got {n}")
        out.append(n)
    return out


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    config: Optional[str] = typer.Option(None, "--config", help="TOML file of a saved sweep (merged over the defaults)"),
    long: bool = typer.Option(False, "--long", help="preset: forward+backward at N = 1,048,576 (B=1, H=1, D=64) for the methods that fit (long.toml); = --preset long"),
    preset: Optional[str] = typer.Option(None, "--preset", help="packaged sweep merged over the defaults: long (long.toml) | peers (peers.toml: ours vs peers vs SDPA at N = 2,048-65,536)"),
    methods: Optional[List[str]] = typer.Option(None, "--methods", "-m", help="methods to run (comma-separated or repeated); default all"),
    lengths: Optional[List[str]] = typer.Option(None, "--lengths", "-n", help="sequence lengths (comma-separated or repeated)"),
    batch: Optional[int] = typer.Option(None, "--batch", help="batch size B"),
    heads: Optional[int] = typer.Option(None, "--heads", help="heads H"),
    dim: Optional[int] = typer.Option(None, "--dim", help="head dim D"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32 | bf16 | fp16"),
    backward: Optional[bool] = typer.Option(None, "--backward/--forward", help="time forward+backward"),
    causal: Optional[bool] = typer.Option(None, "--causal/--non-causal", help="causal attention"),
    peers: Optional[bool] = typer.Option(None, "--peers/--no-peers", help="also run peer libraries"),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="timed calls per case"),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="seconds per case"),
    max_memory: Optional[float] = typer.Option(None, "--max-memory", help="cap each case's memory growth (MB)"),
    retain_freed_memory: Optional[bool] = typer.Option(None, "--retain-freed-memory/--default-malloc", help="every case's process (ours and the peers') asks glibc to keep freed memory (effattn.retain_freed_memory): fewer page faults"),
    accuracy_lengths: Optional[List[str]] = typer.Option(None, "--accuracy-lengths", help="N for the accuracy cases"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder (default bench-results/<timestamp>/)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
):
    """Benchmark attention methods on the default (or --config) sweep; writes results.json,
    report.md and PNG plots to --out."""
    if ctx.invoked_subcommand is not None:
        return
    from effattn.bench.config import ConfigError, load_config

    try:
        overrides = {
            "methods": _split(methods), "lengths": _lengths(lengths), "batch": batch, "heads": heads,
            "dim": dim, "dtype": dtype, "backward": backward, "causal": causal, "peers": peers,
            "repeats": repeats, "timeout": timeout, "max_memory_mb": max_memory,
            "retain_freed_memory": retain_freed_memory,
            "accuracy_lengths": _lengths(accuracy_lengths), "device": device,
        }
        if long and preset not in (None, "long"):
            raise ConfigError(f"--long and --preset {preset}: choose one preset")
        cfg = load_config(config, overrides, preset="long" if long else preset)
    except ConfigError as e:
        _fail(str(e))
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            _fail("--device cuda: CUDA is not available on this machine")
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        _fail(f"--out: {out!r} exists and is not a folder")
    from rich.console import Console

    from effattn.bench.runner import default_out_dir, run_bench
    from effattn.bench.summary import summary_table

    console = Console()
    out_dir = out or default_out_dir()
    results = run_bench(cfg, out_dir, console=console, progress=not quiet)
    console.print(summary_table(results))
    console.print(f"wrote {os.path.join(out_dir, 'results.json')}, report.md and "
                  f"{len(results.get('plots', []))} plots in {results['wall_time_s']:.0f} s")


def register(app: typer.Typer) -> None:
    """Add the ``bench`` group (and its subcommands, where present) to the ``effattn`` app."""
    before = (list(bench_app.registered_commands), list(bench_app.registered_groups))
    try:
        quality = importlib.import_module("effattn.bench.quality")
        quality.register(bench_app)
        typer.main.get_command(bench_app)  # a subcommand typer cannot build fails here, not at run
    except ModuleNotFoundError as e:
        if e.name != "effattn.bench.quality":
            raise
    except Exception as e:  # noqa: BLE001 - a broken optional subcommand must not break `bench`
        bench_app.registered_commands[:], bench_app.registered_groups[:] = before
        typer.echo(f"warning: 'effattn bench quality' disabled: {type(e).__name__}: {e}", err=True)
    app.add_typer(bench_app, name="bench")
