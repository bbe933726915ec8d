"""Shared helpers of the command-line subcommands: one-line errors and list options."""

from __future__ import annotations

from typing import NoReturn, Optional, Sequence

import typer


def fail(msg: str) -> NoReturn:
    """Print ``error: msg`` (one line, no traceback) to stderr and exit with status 2."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def split_values(values: Optional[Sequence[str]]) -> Optional[list]:
    """Repeated and/or comma-separated option values as one list (None if not given):
    ``["a,b", "c"] -> ["a", "b", "c"]``."""
    if not values:
        return None
    return [x for v in values for x in v.replace(",", " ").split() if x]
