"""Running a sweep: every (target, N) timing case and every accuracy case, then the
derived figures (ratio to SDPA, achieved fraction of the matmul rate, recommendations),
``results.json``, ``report.md`` and the plots.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
import time
from typing import Optional

import torch

from effattn.bench import report as report_mod
from effattn.bench.cases import make_inputs
from effattn.bench.config import BenchConfig, selected_methods
from effattn.bench.machine import machine_info
from effattn.bench.measure import TORCH_DTYPES, run_isolated, summarize
from effattn.bench.targets import NotApplicable, Target, check_applicable, flops, method_target

SCHEMA = "effattn-bench/1"
BASELINE = "full"
#: with --backward, FLOPs of forward+backward are estimated as this multiple of forward
BACKWARD_FLOP_FACTOR = 3.0
#: the input seed of the accuracy cases (random methods vary their own seed)
ACCURACY_INPUT_SEED = 1234


def default_out_dir() -> str:
    """``bench-results/<timestamp>/`` under the current directory."""
    return os.path.join("bench-results", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))


def build_targets(cfg: BenchConfig, registered: list) -> tuple:
    """``(targets, notes)``: our selected methods, then the configured peers of those methods
    if ``cfg.peers`` (a peer whose package is missing, or whose counterpart is not selected,
    becomes a note, e.g. "peer reformer-pytorch not installed")."""
    chosen = selected_methods(cfg, registered)
    targets = [method_target(m, cfg.settings(m)) for m in chosen]
    notes = []
    if cfg.peers:
        from effattn.bench.peers import PEERS, peer_available

        for name in cfg.peer_names:
            p = PEERS[name]
            if p.ours not in registered:
                notes.append(f"peer {name} skipped: its counterpart method {p.ours!r} is not registered")
                continue
            if p.ours not in chosen:  # e.g. --methods performer: reformer-pytorch would only cost time
                notes.append(f"peer {name} skipped: its counterpart method {p.ours!r} is not selected")
                continue
            ok, why = peer_available(name)
            if not ok:
                notes.append(f"peer {name} not installed ({why})")
                continue
            st = cfg.settings(p.ours)
            targets.append(Target("peer", name, p.ours,
                                  tuple(sorted(st.options.items(), key=lambda kv: kv[0])),
                                  st.shared_qk, st.max_len))
    return targets, notes


def _task(cfg: BenchConfig, target: Target, N: int, mode: str) -> dict:
    return {"mode": mode, "target": target, "N": N, "batch": cfg.batch, "heads": cfg.heads,
            "dim": cfg.dim, "dim_v": cfg.dv, "dtype": cfg.dtype, "device": cfg.device,
            "causal": cfg.causal, "backward": cfg.backward, "repeats": cfg.repeats,
            "warmup": cfg.warmup, "threads": cfg.threads, "max_memory_mb": cfg.max_memory_mb,
            "retain_freed_memory": cfg.retain_freed_memory}


def _applicable(target: Target, N: int, causal: bool) -> Optional[str]:
    try:
        check_applicable(target, N, causal)
    except NotApplicable as e:
        return str(e)
    return None


def time_record(cfg: BenchConfig, target: Target, N: int, machine_gflops: Optional[float]) -> dict:
    """Run (or rule out) one timing case; returns its record for ``results.json``."""
    rec = {"label": target.label, "kind": target.kind, "method": target.name, "ours": target.ours,
           "N": N, "status": "n/a", "reason": None, "time_s": None, "peak_mem_bytes": None,
           "flops": flops(target, cfg.batch, cfg.heads, N, cfg.dim, cfg.dv, cfg.causal),
           "gflops_per_s": None, "efficiency": None, "ratio_to_sdpa": None}
    why = _applicable(target, N, cfg.causal)
    if why:
        rec["reason"] = why
        return rec
    res = run_isolated(_task(cfg, target, N, "time"), cfg.timeout)
    rec["status"] = res["status"]
    rec["reason"] = res.get("reason")
    rec["case_wall_s"] = res.get("wall_s")
    if res["status"] == "ok":
        rec["time_s"] = summarize(res["times"])
        rec["peak_mem_bytes"] = res["peak_mem_bytes"]
        rec["first_call_s"] = res.get("first_call_s")
        rec["backend"] = res.get("backend")
        rec["memory_probe"] = res.get("memory_probe")
        # the matmul rate measured in the case's own process, seconds after its timed calls
        # (the run-wide probe only when the case did not report one)
        rate = res.get("matmul_gflops") or machine_gflops
        rec["matmul_gflops"] = rate
        if rec["flops"]:
            work = rec["flops"] * (BACKWARD_FLOP_FACTOR if cfg.backward else 1.0)
            rec["gflops_per_s"] = work / rec["time_s"]["median"] / 1e9
            if rate:
                rec["efficiency"] = rec["gflops_per_s"] / rate
    return rec


def reference_outputs(cfg: BenchConfig, N: int, family: str, shared_qk: bool, path: str) -> None:
    """Exact attention (``full`` in float64 on the configured-dtype inputs) saved to ``path``."""
    import effattn

    q, k, v = make_inputs(family, cfg.batch, cfg.heads, N, cfg.dim, cfg.dv, seed=ACCURACY_INPUT_SEED,
                          dtype=TORCH_DTYPES[cfg.dtype])
    q, k, v = (t.double() for t in (q, k, v))
    with torch.no_grad():
        out = effattn.attention(q, None if shared_qk else k, v, "full", causal=cfg.causal)
    torch.save({"out": out}, path)


def accuracy_record(cfg: BenchConfig, target: Target, N: int, refs: dict, random: bool) -> list:
    """Run one accuracy case (all families, seeds if ``random``); one record per family."""
    seeds = list(cfg.accuracy_seeds) if random else list(cfg.accuracy_seeds[:1])
    base = {"label": target.label, "kind": target.kind, "method": target.name, "ours": target.ours,
            "N": N, "status": "n/a", "reason": None}
    why = _applicable(target, N, cfg.causal)
    if why:
        return [dict(base, family=f, reason=why) for f in cfg.accuracy_families]
    task = _task(cfg, target, N, "accuracy")
    task.update(refs={f: refs[(f, target.shared_qk)] for f in cfg.accuracy_families},
                seeds=seeds, input_seed=ACCURACY_INPUT_SEED)
    res = run_isolated(task, cfg.accuracy_timeout)
    if res["status"] != "ok":
        return [dict(base, family=f, status=res["status"], reason=res.get("reason"))
                for f in cfg.accuracy_families]
    out = []
    for f, r in res["families"].items():
        out.append(dict(base, family=f, status="ok", seeds=r["seeds"],
                        max_rel_err=summarize(r["max"]), mean_rel_err=summarize(r["mean"])))
    return out


def add_ratios(cases: list) -> None:
    """Set ``ratio_to_sdpa`` = median time / median time of ``full`` at the same N."""
    base = {c["N"]: c["time_s"]["median"] for c in cases
            if c["kind"] == "method" and c["method"] == BASELINE and c["status"] == "ok"}
    for c in cases:
        if c["status"] == "ok" and c["N"] in base:
            c["ratio_to_sdpa"] = c["time_s"]["median"] / base[c["N"]]


def error_for(accuracy: list, label: str, N: int, family: Optional[str] = None) -> tuple:
    """``(error, N_acc)``: the worst mean-over-rows relative error (over seeds, and over
    input families unless ``family`` names one) of ``label`` at the largest accuracy
    N <= ``N`` (else the smallest); ``(None, None)`` when there is none."""
    rows = [a for a in accuracy if a["label"] == label and a["status"] == "ok"
            and (family is None or a["family"] == family)]
    ns = sorted({a["N"] for a in rows})
    if not ns:
        return None, None
    below = [n for n in ns if n <= N]
    n_acc = below[-1] if below else ns[0]
    errs = [a["mean_rel_err"]["max"] for a in rows if a["N"] == n_acc]
    return max(errs), n_acc


#: the recommendation's input families: each measured family, and "worst" (all of them)
WORST = "worst"


def recommendations(cfg: BenchConfig, cases: list, accuracy: list) -> list:
    """For each input family (and ``"worst"`` over all), N, memory budget and error bound:
    the fastest target (ours or peer) that ran within the budget with error under the bound."""
    out = []
    for family in list(cfg.accuracy_families) + [WORST]:
        fam = None if family == WORST else family
        for N in cfg.lengths:
            ok = [c for c in cases if c["N"] == N and c["status"] == "ok"]
            for budget in cfg.budgets_mb:
                for bound in cfg.error_thresholds:
                    best = None
                    for c in ok:
                        err, n_acc = error_for(accuracy, c["label"], N, fam)
                        if err is None or err >= bound or c["peak_mem_bytes"] > budget * 2 ** 20:
                            continue
                        if best is None or c["time_s"]["median"] < best["time_s"]:
                            best = {"label": c["label"], "time_s": c["time_s"]["median"], "error": err,
                                    "error_N": n_acc, "peak_mem_bytes": c["peak_mem_bytes"]}
                    out.append({"family": family, "N": N, "budget_mb": budget, "max_error": bound,
                                "choice": best["label"] if best else None, "detail": best})
    return out


def run_bench(cfg: BenchConfig, out_dir: Optional[str] = None, console=None, progress: bool = True) -> dict:
    """Run the sweep ``cfg``; write ``results.json``, ``report.md`` and PNGs to ``out_dir``;
    return the results dict (the content of ``results.json``)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    import effattn
    from effattn import api

    console = console or Console()
    t_start = time.perf_counter()
    out_dir = out_dir or default_out_dir()
    os.makedirs(out_dir, exist_ok=True)
    registered = [m["name"] for m in effattn.methods()]
    targets, notes = build_targets(cfg, registered)
    for n in notes:
        console.print(f"[yellow]{n}[/yellow]")
    machine = machine_info(cfg.device, cfg.threads)
    console.print(f"machine: {machine['cpu_model']}, {machine['torch_threads']} threads, torch "
                  f"{machine['torch_version']}, matmul {machine['matmul_gflops']:.1f} GFLOP/s, native kernels "
                  f"{machine.get('native_kernels', 'not recorded')}")
    random_of = {t.label: (api.spec(t.ours).random if t.kind == "method" else True) for t in targets}
    n_time = len(targets) * len(cfg.lengths)
    n_acc = len(targets) * len(cfg.accuracy_lengths)
    cases, accuracy = [], []
    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, disable=not progress, transient=False)
    with prog:
        tid = prog.add_task("timing", total=n_time)
        for N in cfg.lengths:
            for t in targets:
                prog.update(tid, description=f"timing {t.label} N={N}")
                rec = time_record(cfg, t, N, machine.get("matmul_gflops"))
                cases.append(rec)
                if rec["status"] not in ("ok", "n/a"):
                    console.print(f"  {t.label} N={N}: {rec['status']} {rec['reason'] or ''}")
                prog.advance(tid)
        aid = prog.add_task("accuracy", total=n_acc)
        with tempfile.TemporaryDirectory(prefix="effattn-bench-") as tmp:
            for N in cfg.accuracy_lengths:
                prog.update(aid, description=f"accuracy references N={N}")
                refs = {}
                for shared in sorted({t.shared_qk for t in targets}):
                    for f in cfg.accuracy_families:
                        path = os.path.join(tmp, f"ref-{N}-{f}-{int(shared)}.pt")
                        reference_outputs(cfg, N, f, shared, path)
                        refs[(f, shared)] = path
                for t in targets:
                    prog.update(aid, description=f"accuracy {t.label} N={N}")
                    recs = accuracy_record(cfg, t, N, refs, random_of[t.label])
                    accuracy.extend(recs)
                    if recs and recs[0]["status"] not in ("ok", "n/a"):
                        console.print(f"  accuracy {t.label} N={N}: {recs[0]['status']} {recs[0]['reason'] or ''}")
                    prog.advance(aid)
    add_ratios(cases)
    results = {
        "schema": SCHEMA,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "config": cfg.to_dict(),
        "targets": [{"label": t.label, "kind": t.kind, "name": t.name, "ours": t.ours,
                     "options": dict(t.options), "shared_qk": t.shared_qk,
                     "random": random_of[t.label]} for t in targets],
        "cases": cases,
        "accuracy": accuracy,
        "recommendations": recommendations(cfg, cases, accuracy),
        "notes": notes + report_mod.method_notes(cfg, {t.ours for t in targets}),
        "peer_notes": _peer_notes(targets),
        "wall_time_s": None,
    }
    from effattn.bench import plots

    results = finite_only(results)
    results["plots"] = plots.write_plots(results, out_dir)
    results["wall_time_s"] = time.perf_counter() - t_start
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report_mod.render(results))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    return results


def _peer_notes(targets: list) -> dict:
    from effattn.bench.peers import PEERS

    return {t.name: PEERS[t.name].matched for t in targets if t.kind == "peer"}


def finite_only(o):
    """``o`` with tuples as lists, non-finite floats as ``None`` and other objects as strings
    (so that ``results.json`` is strict JSON)."""
    if isinstance(o, dict):
        return {str(k): finite_only(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [finite_only(v) for v in o]
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, (bool, int, str)):
        return o
    return str(o)
