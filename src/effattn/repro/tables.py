"""Markdown tables and reports of ``effattn repro``: ours beside the published figures.

Every builder takes the ``results.json`` dict of its experiment; a cell with no result
reads ``n/a``.
"""

from __future__ import annotations

from typing import Optional

from effattn.bench.report import fmt_bytes

NA = "n/a"


def pct(x: Optional[float], digits: int = 1) -> str:
    """A percentage as ``97.3``; ``n/a`` for None."""
    return NA if x is None else f"{x:.{digits}f}"


def fmt_s(s: Optional[float]) -> str:
    """Seconds as ``42 s`` / ``3.1 min``; ``n/a`` for None."""
    if s is None:
        return NA
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _header(cells) -> list:
    return [_row(cells), _row(["---"] * len(cells))]


# ------------------------------------------------------------------ Reformer table 2


def reformer_table(results: dict) -> str:
    """Rows: trained with; columns: evaluated with; each cell ``ours / published`` (%)."""
    train_labels, eval_labels = results["train_labels"], results["eval_labels"]
    pub = results["published"]["table"]
    ours = {(c["train"], c["eval"]): c.get("accuracy") for c in results["cells"]}
    lines = _header(["train \\ eval"] + [f"{e} (ours / paper)" for e in eval_labels])
    for t in train_labels:
        cells = [t]
        for e in eval_labels:
            p = pub.get(t, {}).get(e)
            cells.append(f"{pct(ours.get((t, e)))} / {pct(p)}")
        lines.append(_row(cells))
    return "\n".join(lines)


def reformer_runs_table(results: dict) -> str:
    """One row per trained model: steps, wall time, final train accuracy, tokens/s."""
    lines = _header(["trained with", "steps", "wall time", "final train accuracy (%)", "train tokens/s",
                     "peak memory"])
    for r in results["runs"]:
        acc = None if r.get("train_accuracy") is None else 100 * r["train_accuracy"]
        tps = NA if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.0f}"
        lines.append(_row([r["train"], r.get("steps", NA), fmt_s(r.get("wall_s")), pct(acc), tps,
                           fmt_bytes(r.get("peak_mem_bytes")) if r.get("peak_mem_bytes") is not None else NA]))
    return "\n".join(lines)


def reformer_report(results: dict) -> str:
    """The whole ``report.md`` of ``reformer-table2``."""
    c, pc = results["config"], results["paper_config"]
    out = [f"# Reformer Table 2 (duplication task) at CPU scale — {results['date']}", "",
           f"`{results['command']}`", "",
           f"- task: `0 w 0 w`, length {c['length']} (|w| = {c['length'] // 2 - 1}; paper: {pc['length']}), "
           f"symbols 1..{c['vocab'] - 1}; accuracy over the second `w` on {c['eval_examples']} test sequences",
           f"- model: {c['layers']} layer, d_model {c['dim']}, d_ff {c['dim'] * c['ff_mult']}, {c['heads']} heads, "
           f"shared-QK, learned positions; LSH chunk length {c['chunk_len']} "
           f"({max(2, -(-c['length'] // c['chunk_len']))} buckets per round), fresh random rotations on every call",
           f"- training: {c['steps']} steps, batch {c['batch']}, AdamW lr {c['lr']:g} (warmup, cosine decay), seed {c['seed']}",
           f"- wall time of the whole table: {fmt_s(results.get('wall_time_s'))}",
           f"- published: {results['published']['source']}", "",
           "## Accuracy (%), ours / published", "", reformer_table(results), "",
           "## Training runs", "", reformer_runs_table(results), ""]
    for p in results.get("plots", []):
        out += [f"![{p}]({p})", ""]
    return "\n".join(out)


# ------------------------------------------------------------------ ListOps


def listops_table(results: dict) -> str:
    """One row per method: published LRA accuracy beside ours, steps, wall time, tokens/s,
    peak memory; skipped methods say why."""
    lines = _header(["method", "LRA published (%)", "ours: test accuracy (%)", "steps", "wall time",
                     "train tokens/s", "peak memory", "options / note"])
    for r in results["rows"]:
        pub = pct(r.get("published"), 2)
        if r.get("status") != "ok":
            lines.append(_row([r["method"], pub, NA, NA, NA, NA, NA, f"{r.get('status', 'skipped')}: "
                               f"{r.get('reason', '')}".replace("|", "/")]))
            continue
        acc = None if r.get("test_accuracy") is None else 100 * r["test_accuracy"]
        tps = NA if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.0f}"
        mem = NA if r.get("peak_mem_bytes") is None else fmt_bytes(r["peak_mem_bytes"])
        opts = ", ".join(f"{k}={v}" for k, v in (r.get("method_options") or {}).items()) or "defaults"
        lines.append(_row([r["method"], pub, pct(acc), r.get("steps", NA), fmt_s(r.get("wall_s")), tps, mem,
                           opts.replace("|", "/")]))
    return "\n".join(lines)


def listops_report(results: dict) -> str:
    """The whole ``report.md`` of ``repro listops``."""
    c = results["config"]
    out = [f"# ListOps (LRA) at the `{c['preset']}` preset — {results['date']}", "",
           f"`{results['command']}`", "",
           f"- data: effattn's LRA ListOps generator, {c['min_length']} < N < {c['max_length']} tokens, "
           f"max depth {c['max_depth']}, max args {c['max_args']}, seed {c['seed']}; every method sees the "
           f"same examples; accuracy on {c['test_examples']} test examples (10 classes, chance ~10 %)",
           f"- model: encoder classifier, {c['layers']} layers, d_model {c['dim']}, mlp {c['dim'] * c['ff_mult']}, "
           f"{c['heads']} heads, CLS pooling, dropout {c['dropout']:g}",
           f"- training: {c['steps']} steps, batch {c['batch']}, AdamW lr {c['lr']:g}, weight decay "
           f"{c['weight_decay']:g}, warmup {c['warmup']}, {c['schedule']} decay, seed {c['seed']}",
           f"- wall time of the run: {fmt_s(results.get('wall_time_s'))}",
           f"- published: {results['published']['source']} (LRA: length 2K; models without an effattn "
           f"counterpart: {', '.join(results['published']['unmatched'])})", "",
           listops_table(results), ""]
    for n in results.get("notes", []):
        out += [f"> {n}", ""]
    for p in results.get("plots", []):
        out += [f"![{p}]({p})", ""]
    return "\n".join(out)


# ------------------------------------------------------------------ MQAR


def mqar_table(results: dict) -> str:
    """Rows: methods; columns: (length, pairs) settings, accuracy (%); then the published
    figure (Zoology: exact attention ~100 at every setting)."""
    settings = [tuple(x) for x in results["settings"]]
    acc = {(r["method"], r["length"], r["pairs"]): r for r in results["runs"]}
    lines = _header(["method"] + [f"N={n}, {p} pairs" for n, p in settings] + ["Zoology published (%)"])
    for m in results["methods"]:
        cells = [m]
        for n, p in settings:
            r = acc.get((m, n, p))
            if r is None:
                cells.append(NA)
            elif r.get("status", "ok") != "ok":
                cells.append(r["status"])
            else:
                cells.append(pct(None if r.get("test_accuracy") is None else 100 * r["test_accuracy"]))
        pub = results["published"]["per_method"].get(m)
        cells.append(NA if pub is None else f"~{pub:.0f}")
        lines.append(_row(cells))
    return "\n".join(lines)


def mqar_time_table(results: dict) -> str:
    """One row per method: its single training run's wall time, tokens/s and peak memory."""
    lines = _header(["method", "steps", "wall time", "train tokens/s", "peak memory", "options"])
    for m in results["methods"]:
        r = next((x for x in results["runs"] if x["method"] == m), None)
        if r is None or r.get("status", "ok") != "ok":
            why = NA if r is None else f"{r['status']}: {r.get('reason', '')}".replace("|", "/")
            lines.append(_row([m, NA, NA, NA, NA, why]))
            continue
        tps = NA if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.0f}"
        mem = NA if r.get("peak_mem_bytes") is None else fmt_bytes(r["peak_mem_bytes"])
        opts = ", ".join(f"{k}={v}" for k, v in (r.get("method_options") or {}).items()) or "defaults"
        lines.append(_row([m, r.get("steps", NA), fmt_s(r.get("wall_s")), tps, mem, opts.replace("|", "/")]))
    return "\n".join(lines)


def mqar_report(results: dict) -> str:
    """The whole ``report.md`` of ``repro mqar``."""
    c = results["config"]
    out = [f"# MQAR (Zoology multi-query associative recall) at CPU scale — {results['date']}", "",
           f"`{results['command']}`", "",
           f"- data: effattn's MQAR generator (Zoology's `multiquery_ar`), vocabulary {c['vocab']}, "
           f"power_a {c['power_a']:g}, seed {c['seed']}; accuracy over the query positions of "
           f"{c['test_examples']} test sequences",
           f"- model: causal LM, {c['layers']} layers, d_model {c['dim']}, {c['heads']} heads, {c.get('pos', 'learned')} positions",
           f"- training: one model per method on all settings in turn (one setting per step), {c['steps']} steps "
           f"in all, batch {c['batch']}, {c['train_pool']} distinct training sequences per setting, AdamW lr "
           f"{c['lr']:g}, weight decay {c['weight_decay']:g}, warmup {c['warmup']}, cosine decay",
           f"- wall time of the run: {fmt_s(results.get('wall_time_s'))}",
           f"- published: {results['published']['source']}", "",
           "## Accuracy (%)", "", mqar_table(results), "",
           "## Training time", "", mqar_time_table(results), ""]
    for n in results.get("notes", []):
        out += [f"> {n}", ""]
    for p in results.get("plots", []):
        out += [f"![{p}]({p})", ""]
    return "\n".join(out)
