"""The summary table printed at the end of ``effattn bench`` (rich)."""

from __future__ import annotations

from rich.table import Table

from effattn.bench.report import fmt_bytes, fmt_err, fmt_time
from effattn.bench.runner import error_for


def summary_table(results: dict) -> Table:
    """One row per target: median time, ratio to SDPA and peak memory at each N, and its error."""
    lengths = results["config"]["lengths"]
    table = Table(title="effattn bench: median time (× SDPA, peak memory) per N; error = worst mean row error")
    table.add_column("method")
    for N in lengths:
        table.add_column(f"N={N}")
    table.add_column("error")
    labels = list(dict.fromkeys(c["label"] for c in results["cases"]))
    for lab in labels:
        cells = []
        for N in lengths:
            c = next((x for x in results["cases"] if x["label"] == lab and x["N"] == N), None)
            if c is None:
                cells.append("")
            elif c["status"] != "ok":
                cells.append(c["status"])
            else:
                r = c["ratio_to_sdpa"]
                cells.append(f"{fmt_time(c['time_s']['median'])} (×{r:.2f}, {fmt_bytes(c['peak_mem_bytes'])})"
                             if r is not None else fmt_time(c["time_s"]["median"]))
        err, n_acc = error_for(results["accuracy"], lab, max(lengths))
        cells.append("—" if err is None else f"{fmt_err(err)} @N={n_acc}")
        table.add_row(lab, *cells)
    return table
