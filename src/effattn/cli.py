"""The ``effattn`` command line (typer): ``methods``, and the commands each subsystem adds."""

from __future__ import annotations

import importlib

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Efficient attention: list methods, benchmark them, train and evaluate models.")

@app.callback()
def _root() -> None:
    """Efficient attention: list methods, benchmark them, train and evaluate models."""


#: subsystems that add commands: module -> function ``register(app)``
SUBCOMMANDS = ["effattn.bench.command", "effattn.train", "effattn.repro"]


@app.command("methods")
def methods_cmd(
    json_out: bool = typer.Option(False, "--json", help="print JSON instead of a table"),
    markdown: bool = typer.Option(False, "--markdown", help="print a markdown table (as in the README)"),
):
    """List every attention method: exactness, causal support, complexity, FLOPs."""
    from effattn import methods

    rows = methods()
    if json_out:
        import json

        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    if markdown:
        typer.echo("| method | family | exact | causal | time | memory | description |")
        typer.echo("|---|---|---|---|---|---|---|")
        for m in rows:
            typer.echo(f"| `{m['name']}` | {m['family']} | {'exact' if m['exact'] else 'approx'} | "
                       f"{'yes' if m['causal'] else 'no'} | {m['time']} | {m['memory']} | {m['description']} |")
        return
    table = Table(title="effattn methods")
    for col in ("name", "family", "exact", "causal", "time", "memory", "FLOPs (forward)"):
        table.add_column(col)
    for m in rows:
        table.add_row(m["name"], m["family"], "exact" if m["exact"] else "approx",
                      "yes" if m["causal"] else "no", m["time"], m["memory"], m["flops"])
    Console(width=200).print(table)


def _register_subcommands() -> None:
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:  # subsystem not built into this checkout
            if e.name != name:
                raise
            continue
        mod.register(app)


_register_subcommands()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
