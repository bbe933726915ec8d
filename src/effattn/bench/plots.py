"""PNG plots of a benchmark (matplotlib, Agg backend): time, peak memory and error vs N."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(records: list, key) -> dict:
    """``label -> ([N...], [value...])`` over records with ``status == "ok"`` and a value."""
    out: dict = {}
    for r in records:
        if r["status"] != "ok":
            continue
        y = key(r)
        if y is None or y <= 0:
            continue
        xs, ys = out.setdefault(r["label"], ([], []))
        xs.append(r["N"])
        ys.append(y)
    return out


_COLORS = [plt.get_cmap("tab10")(i) for i in range(10)]
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def series_style(label: str, index: int) -> dict:
    """Line style of the ``index``-th series: SDPA thick black; every other series its own
    (colour, marker) pair — colours cycle, the marker changes each cycle; peers dashed."""
    if label == "full":
        return {"color": "black", "linewidth": 2.5, "marker": "o", "label": "full (SDPA)"}
    style = {"color": _COLORS[index % len(_COLORS)],
             "marker": _MARKERS[(index // len(_COLORS)) % len(_MARKERS)], "label": label}
    if label.startswith("peer:"):
        style["linestyle"] = "--"
    return style


def _plot(series: dict, path: str, title: str, ylabel: str) -> bool:
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    others = [label for label in series if label != "full"]
    for label, (xs, ys) in series.items():
        pts = sorted(zip(xs, ys))
        index = others.index(label) if label in others else 0
        ax.plot([p[0] for p in pts], [p[1] for p in pts], **series_style(label, index))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length N")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(results: dict, out_dir: str) -> list:
    """Write ``time_vs_n.png``, ``memory_vs_n.png`` and ``error_vs_n.png`` (those with data);
    returns their file names."""
    cfg = results["config"]
    what = "forward+backward" if cfg["backward"] else "forward"
    shape = f"B={cfg['batch']}, H={cfg['heads']}, D={cfg['dim']}, {cfg['dtype']}"
    written = []
    if _plot(_series(results["cases"], lambda r: r["time_s"]["median"]),
             os.path.join(out_dir, "time_vs_n.png"), f"{what} time vs N ({shape})", "time (s), median"):
        written.append("time_vs_n.png")
    if _plot(_series(results["cases"], lambda r: r["peak_mem_bytes"] / 2 ** 20),
             os.path.join(out_dir, "memory_vs_n.png"), f"peak memory above inputs vs N ({shape})",
             "peak memory (MB)"):
        written.append("memory_vs_n.png")
    for fam in cfg["accuracy_families"]:
        recs = [a for a in results["accuracy"] if a["family"] == fam]
        name = f"error_vs_n_{fam}.png"
        if _plot(_series(recs, lambda r: r["mean_rel_err"]["median"]), os.path.join(out_dir, name),
                 f"relative error vs exact attention, {fam} inputs ({shape})",
                 "relative error (mean over rows)"):
            written.append(name)
    return written
