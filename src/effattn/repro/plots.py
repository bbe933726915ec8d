"""PNG plots of ``effattn repro`` (matplotlib Agg, as :mod:`effattn.bench.plots` sets up)."""

from __future__ import annotations

from pathlib import Path

from effattn.bench.plots import plt, series_style


def reformer_plot(results: dict, out_dir) -> list:
    """``reformer_table2.png``: accuracy per evaluation attention, one bar group per trained
    model, the published figure as a black tick on each bar.  Returns the file names."""
    train_labels, eval_labels = results["train_labels"], results["eval_labels"]
    ours = {(c["train"], c["eval"]): c.get("accuracy") for c in results["cells"]}
    pub = results["published"]["table"]
    fig, ax = plt.subplots(figsize=(9, 5))
    width = 0.8 / len(train_labels)
    for i, t in enumerate(train_labels):
        xs = [j + (i - (len(train_labels) - 1) / 2) * width for j in range(len(eval_labels))]
        ys = [ours.get((t, e)) or 0.0 for e in eval_labels]
        ax.bar(xs, ys, width, label=f"trained {t} (ours)")
        pys = [pub.get(t, {}).get(e) for e in eval_labels]
        ax.scatter([x for x, p in zip(xs, pys) if p is not None], [p for p in pys if p is not None],
                   marker="_", s=200, color="black", zorder=3, label="published" if i == 0 else None)
    ax.set_xticks(range(len(eval_labels)))
    ax.set_xticklabels([f"eval {e}" for e in eval_labels])
    ax.set_ylabel("accuracy (%) on the second copy")
    ax.set_ylim(0, 105)
    c = results["config"]
    ax.set_title(f"Duplication task, length {c['length']} (paper: 1024), {c['steps']} steps")
    ax.legend(fontsize=8, ncol=2, loc="lower left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    name = "reformer_table2.png"
    fig.savefig(Path(out_dir) / name, dpi=100)
    plt.close(fig)
    return [name]


def listops_plot(results: dict, out_dir) -> list:
    """``listops_accuracy_vs_speed.png``: test accuracy vs training tokens/s, one point per
    method (published LRA accuracy as a hollow marker at the same speed).  Returns the names."""
    rows = [r for r in results["rows"] if r.get("status") == "ok" and r.get("tokens_per_s")]
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, r in enumerate(rows):
        st = series_style(r["method"], i)
        y = 100 * r["test_accuracy"]
        ax.scatter([r["tokens_per_s"]], [y], s=40, color=st.get("color"), zorder=3)
        ax.annotate(r["method"], (r["tokens_per_s"], y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        if r.get("published") is not None:
            ax.scatter([r["tokens_per_s"]], [r["published"]], s=40, facecolors="none", edgecolors="grey")
    ax.scatter([], [], s=40, facecolors="none", edgecolors="grey", label="LRA published (length 2K)")
    ax.scatter([], [], s=40, color="C0", label="ours")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens / s (this machine)")
    ax.set_ylabel("test accuracy (%)")
    c = results["config"]
    ax.set_title(f"ListOps {c['min_length']}<N<{c['max_length']}, {c['steps']} steps: accuracy vs speed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    name = "listops_accuracy_vs_speed.png"
    fig.savefig(Path(out_dir) / name, dpi=90)
    plt.close(fig)
    return [name]


def mqar_plot(results: dict, out_dir) -> list:
    """``mqar_accuracy.png``: accuracy vs sequence length (pairs in the tick labels), one
    line per method.  Returns the file names."""
    settings = [tuple(x) for x in results["settings"]]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    plotted = False
    for i, m in enumerate(results["methods"]):
        pts = [(r["length"], 100 * r["test_accuracy"]) for r in results["runs"]
               if r["method"] == m and r.get("status", "ok") == "ok" and r.get("test_accuracy") is not None]
        if not pts:
            continue
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], **series_style(m, i))
        plotted = True
    if not plotted:
        plt.close(fig)
        return []
    ax.set_xscale("log", base=2)
    ax.set_xticks([n for n, _ in settings])
    ax.set_xticklabels([f"{n}\n{p} pairs" for n, p in settings])
    ax.set_ylim(-2, 102)
    ax.set_ylabel("accuracy (%) at query positions")
    ax.set_xlabel("sequence length")
    ax.set_title(f"MQAR, {results['config']['layers']}-layer causal LMs, {results['config']['steps']} steps each")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    name = "mqar_accuracy.png"
    fig.savefig(Path(out_dir) / name, dpi=100)
    plt.close(fig)
    return [name]
