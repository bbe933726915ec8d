"""``report.md``: the benchmark's results as markdown tables, from the ``results.json`` dict."""

from __future__ import annotations

from typing import Optional


def fmt_time(s: Optional[float]) -> str:
    """Seconds as ``12.3 ms`` / ``1.23 s``."""
    if s is None:
        return "—"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def fmt_bytes(b: Optional[float]) -> str:
    """Bytes as MB (MiB) with 3 significant digits."""
    return "—" if b is None else f"{b / 2 ** 20:.3g} MB"


def fmt_flops(f: Optional[float]) -> str:
    """FLOPs as GFLOP."""
    return "—" if f is None else f"{f / 1e9:.3g} G"


def fmt_err(e: Optional[float]) -> str:
    """A relative error as a percentage."""
    return "—" if e is None else f"{100 * e:.3g}%"


def method_notes(cfg, names) -> list:
    """Notes on configured settings of the methods ``names`` worth stating next to the numbers."""
    notes = []
    for name, st in sorted(cfg.method_settings.items()):
        if st.shared_qk and name in names:
            notes.append(f"{name} runs with shared query-key (k=None), as in Reformer; its accuracy "
                         "reference is exact shared-QK attention.")
    return notes


def _status_cell(c: dict) -> str:
    reason = (c.get("reason") or "").replace("|", "/")
    return f"{c['status']}: {reason}" if reason else c["status"]


def _accuracy_lookup(results: dict) -> dict:
    """``(label, N, family) -> record``."""
    return {(a["label"], a["N"], a["family"]): a for a in results["accuracy"]}


def _err_cell(acc: dict, label: str, n_acc: Optional[int], family: str) -> str:
    a = acc.get((label, n_acc, family))
    if a is None:
        return "—"
    if a["status"] != "ok":
        return a["status"]
    m = a["mean_rel_err"]
    cell = fmt_err(m["median"])
    if m["n"] > 1:
        cell += f" ({fmt_err(m['min'])}–{fmt_err(m['max'])})"
    return cell


def _probe_span(results: dict) -> str:
    rates = [c["matmul_gflops"] for c in results["cases"] if c.get("matmul_gflops")]
    if not rates:
        return "no case reported one"
    return f"{min(rates):.0f}–{max(rates):.0f} GFLOP/s over this run's cases"


def render(results: dict) -> str:
    """The whole ``report.md`` text."""
    cfg, mach = results["config"], results["machine"]
    acc = _accuracy_lookup(results)
    acc_ns = sorted({a["N"] for a in results["accuracy"]})
    lines = ["# effattn benchmark", ""]
    lines += [
        f"- machine: {mach['cpu_model']}, {mach['cpu_count']} CPUs, {mach['torch_threads']} torch threads, "
        f"device `{mach['device']}`, torch {mach['torch_version']}, Python {mach['python_version']}, "
        f"native kernels: {mach.get('native_kernels', 'not recorded')}",
        f"- measured fp32 matmul rate ({mach.get('matmul_n')}²) at the start: **{mach.get('matmul_gflops', 0):.1f} "
        "GFLOP/s**; each case's *efficiency* divides by the rate measured in its own process right "
        f"after its timed calls ({_probe_span(results)}; `results.json`: `matmul_gflops` per case)",
        f"- inputs: B={cfg['batch']}, H={cfg['heads']}, D={cfg['dim']}, Dv={cfg['dim_v'] or cfg['dim']}, "
        f"{cfg['dtype']}, {'causal' if cfg['causal'] else 'non-causal'}, "
        f"{'forward+backward' if cfg['backward'] else 'forward only (no_grad)'}",
        f"- time: median of {cfg['repeats']} calls after {cfg['warmup']} warm-up call(s), spread = "
        "interquartile range; each case in its own subprocess (timeout "
        f"{cfg['timeout']:g} s{', memory cap %g MB' % cfg['max_memory_mb'] if cfg['max_memory_mb'] else ''}"
        f"{'; glibc keeps freed memory in every case (--retain-freed-memory)' if cfg.get('retain_freed_memory') else ''})",
        "- memory: peak above the process after creating the inputs (CPU: resident-set high-water "
        "mark; CUDA: max_memory_allocated), over the first call after the warm-up (one-time "
        "compile costs are not counted; `results.json` keeps each case's `first_call_s`); scratch "
        "kept between calls (the block-sparse engine's and lsh's workspaces, the engine's kept "
        "tiles, the result pool's free blocks) is freed before it "
        "and counts; that call starts from a trimmed heap and is not one of the timed ones "
        "(`memory_call_s`)",
        "- backend: for methods on the block-sparse engine, what ran the timed calls — `engine` "
        "(effattn's own tiles) or `flexattention` (compiled torch FlexAttention, no-grad CPU / "
        "CUDA calls without lse; switch with `EFFATTN_FLEX=off|auto|on`)",
        "- FLOPs: each method's registry formula (forward"
        + (", ×3 for forward+backward" if cfg["backward"] else "") + "); peers use their matched "
        "method's formula; efficiency = achieved FLOP/s ÷ the case's measured matmul rate",
        f"- error: relative error ‖o − o_ref‖/‖o_ref‖ per query row vs exact attention (`full` in "
        f"float64), mean over rows, at N = {', '.join(map(str, acc_ns)) or '—'} "
        f"(families: {', '.join(cfg['accuracy_families'])}); random methods: median (min–max) over "
        f"seeds {cfg['accuracy_seeds']}. The timing tables show the error at the largest accuracy N "
        "≤ the row's N.",
        f"- wall time of the run: {results.get('wall_time_s') or 0:.0f} s",
        "",
    ]
    for n in results.get("notes", []):
        lines.append(f"> {n}")
    if results.get("notes"):
        lines.append("")
    # no accuracy cases (e.g. --preset peers): no error columns, rather than columns of "—"
    fams = cfg["accuracy_families"] if acc_ns else []

    def errs(label, n_acc):
        return "".join(f"{_err_cell(acc, label, n_acc, f)} | " for f in fams)

    for N in cfg["lengths"]:
        rows = [c for c in results["cases"] if c["N"] == N]
        below = [n for n in acc_ns if n <= N]
        n_acc = below[-1] if below else (acc_ns[0] if acc_ns else None)
        lines += [f"## N = {N}", "",
                  "| method | time (median) | IQR | × SDPA | peak memory | FLOPs | GFLOP/s | efficiency | "
                  + "".join(f"error {f} @N={n_acc} | " for f in fams) + "backend |",
                  "|---|---|---|---|---|---|---|---|" + "---|" * (len(fams) + 1)]
        for c in rows:
            if c["status"] != "ok":
                lines.append(f"| {c['label']} | {_status_cell(c)} | | | | {fmt_flops(c['flops'])} | | | "
                             + errs(c["label"], n_acc) + " |")
                continue
            t = c["time_s"]
            ratio = "—" if c["ratio_to_sdpa"] is None else f"{c['ratio_to_sdpa']:.2f}"
            gf = "—" if c["gflops_per_s"] is None else f"{c['gflops_per_s']:.3g}"
            eff = "—" if c["efficiency"] is None else f"{100 * c['efficiency']:.3g}%"
            lines.append(
                f"| {c['label']} | {fmt_time(t['median'])} | {fmt_time(t['q1'])}–{fmt_time(t['q3'])} | "
                f"{ratio} | {fmt_bytes(c['peak_mem_bytes'])} | {fmt_flops(c['flops'])} | {gf} | {eff} | "
                + errs(c["label"], n_acc) + f"{c.get('backend') or '—'} |")
        lines.append("")
    lines += _accuracy_section(results, acc_ns)
    lines += _recommend_section(results)
    if results.get("peer_notes"):
        lines += ["## Peers: matched settings", ""]
        for name, text in results["peer_notes"].items():
            lines.append(f"- **{name}**: {text}")
        lines.append("")
    if results.get("plots"):
        lines += ["## Plots", ""]
        for p in results["plots"]:
            lines.append(f"![{p}]({p})")
        lines.append("")
    return "\n".join(lines)


def _accuracy_section(results: dict, acc_ns: list) -> list:
    if not acc_ns:
        return []
    fams = results["config"]["accuracy_families"]
    out = ["## Accuracy", "",
           "Relative error per query row, mean over rows / max over rows (median over seeds for random methods).", "",
           "| method | N | " + "".join(f"{f} mean | {f} max | " for f in fams),
           "|---|---|" + "---|---|" * len(fams)]
    labels = list(dict.fromkeys(a["label"] for a in results["accuracy"]))
    for lab in labels:
        for N in acc_ns:
            cells = []
            for fam in fams:
                a = next((x for x in results["accuracy"] if x["label"] == lab and x["N"] == N
                          and x["family"] == fam), None)
                if a is None:
                    cells += ["—", "—"]
                elif a["status"] != "ok":
                    cells += [_status_cell(a), ""]
                else:
                    cells += [fmt_err(a["mean_rel_err"]["median"]), fmt_err(a["max_rel_err"]["median"])]
            out.append(f"| {lab} | {N} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def _recommend_section(results: dict) -> list:
    recs = results.get("recommendations") or []
    if not recs:
        return []
    if not results["accuracy"]:  # "none" in every cell would read as "no method qualifies"
        return ["## Recommendation", "",
                "Not made: this run measured no accuracy (`[accuracy] lengths` is empty), and a "
                "recommendation needs each method's error.", ""]
    cfg = results["config"]
    errs = cfg["error_thresholds"]
    out = ["## Recommendation", "",
           "Fastest method (ours or a peer) whose peak memory fits the budget and whose error "
           "(mean over rows, worst seed, at the largest accuracy N ≤ N) is under the bound; one "
           "table per input family — content-peaked (clustered) and position-peaked (local) "
           "attention are what trained models tend to have, i.i.d. Gaussian inputs give flat "
           "attention and are the hard case for approximations — and one for the worst of them.", ""]
    families = list(dict.fromkeys(r.get("family", "worst") for r in recs))
    for family in families:
        out += [f"### Inputs: {family}", "",
                "| N | memory budget | " + " | ".join(f"error < {100 * e:g}%" for e in errs) + " |",
                "|---|---|" + "---|" * len(errs)]
        for N in cfg["lengths"]:
            for b in cfg["budgets_mb"]:
                cells = []
                for e in errs:
                    r = next(x for x in recs if x.get("family", "worst") == family and x["N"] == N
                             and x["budget_mb"] == b and x["max_error"] == e)
                    d = r["detail"]
                    cells.append("none" if d is None else f"{d['label']} ({fmt_time(d['time_s'])})")
                out.append(f"| {N} | {b:g} MB | " + " | ".join(cells) + " |")
        out.append("")
    return out
