"""The benchmark: FLOP formulas, the results schema of a tiny run, the timeout/oom paths,
the configuration and the command line's bad-argument errors."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from typer.testing import CliRunner

import effattn
from effattn import api
from effattn.bench import config as cfgmod
from effattn.bench.cases import make_inputs
from effattn.bench.measure import relative_errors, run_isolated, summarize
from effattn.bench.runner import run_bench
from effattn.bench.targets import method_target
from effattn.cli import app

REGISTERED = [m["name"] for m in effattn.methods()]


# ------------------------------------------------------------------ FLOP formulas


def test_full_flops_is_the_hand_count():
    B, H, N, D, Dv = 2, 3, 100, 16, 8
    s = api.spec("full")
    assert s.flops(B, H, N, N, D, Dv, False) == 2 * B * H * N * N * (D + Dv)
    # causal: only pairs j <= i, N(N+1)/2 of them
    assert s.flops(B, H, N, N, D, Dv, True) == 2 * B * H * (N * (N + 1) // 2) * (D + Dv)


@pytest.mark.parametrize("name", ["naive", "blockwise"])
def test_exact_methods_count_like_full(name):
    args = (1, 4, 1024, 1024, 64, 64, False)
    assert api.spec(name).flops(*args) == api.spec("full").flops(*args)


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_flops_is_positive_and_finite(name):
    """The bench's FLOP figure (formula with the bench config's options) for a typical case."""
    cfg = cfgmod.load_config(registered=REGISTERED)
    t = method_target(name, cfg.settings(name))
    from effattn.bench.targets import flops

    f = flops(t, 1, 4, 4096, 64, 64, False)
    if name == "window2d":  # needs a grid option; the formula may decline without one
        assert f is None or (math.isfinite(f) and f > 0)
        return
    assert f is not None and math.isfinite(f) and f > 0
    # sub-quadratic approximations must count fewer FLOPs than exact attention at N=4096
    if not api.spec(name).exact and name in ("lsh", "longformer", "linformer", "performer", "linear"):
        assert f < api.spec("full").flops(1, 4, 4096, 4096, 64, 64, False)


# ------------------------------------------------------------------ measurement helpers


def test_relative_errors_per_row():
    ref = torch.zeros(1, 1, 3, 2, dtype=torch.float64)
    ref[..., 0] = 1.0
    out = ref.clone()
    out[0, 0, 1, 1] = 0.5  # row 1 off by 0.5 / 1
    mx, mean = relative_errors(out, ref)
    assert mx == pytest.approx(0.5)
    assert mean == pytest.approx(0.5 / 3)


def test_summarize_median_and_spread():
    s = summarize([3.0, 1.0, 2.0, 10.0])
    assert s["median"] == 2.5 and s["min"] == 1.0 and s["max"] == 10.0
    assert s["q1"] <= s["median"] <= s["q3"] and s["n"] == 4


def _attention_probs(family, N=1024, shared_qk=False):
    q, k, v = make_inputs(family, 1, 1, N, 64, 64, seed=0)
    s = q @ k.transpose(-1, -2) / 8.0
    if shared_qk:  # Reformer's keys: the RMS-normalized queries; a token does not see itself
        s = q @ (q / q.pow(2).mean(-1, keepdim=True).sqrt()).transpose(-1, -2) / 8.0
        s = s.masked_fill(torch.eye(N, dtype=torch.bool), float("-inf"))
    return torch.softmax(s, dim=-1), v


@pytest.mark.parametrize("shared_qk", [False, True])
def test_peaked_families_concentrate_attention(shared_qk):
    """The 32 best keys hold nearly all the attention for clustered and local inputs (also
    with shared-QK keys), little for Gaussian ones."""
    def top_mass(family):
        p, _ = _attention_probs(family, shared_qk=shared_qk)
        return p.topk(32, dim=-1).values.sum(-1).mean().item()

    assert top_mass("clustered") > 0.9
    assert top_mass("local") > 0.99
    assert top_mass("gaussian") < 0.4


def test_clustered_attention_stays_in_cluster_and_local_attention_near_the_diagonal():
    """Clustered: attention is spread along the sequence (not local); local: within 64
    positions of the query."""
    N = 1024
    dist = (torch.arange(N)[:, None] - torch.arange(N)[None]).abs()
    near = lambda fam: (_attention_probs(fam, N)[0][0, 0] * (dist <= 64)).sum(-1).mean().item()
    assert near("local") > 0.99
    assert near("clustered") < 0.3


def test_local_family_works_for_odd_dim_and_rejects_dim_one():
    q, k, v = make_inputs("local", 1, 2, 50, 7, 5)
    assert q.shape == k.shape == (1, 2, 50, 7) and v.shape == (1, 2, 50, 5)
    assert torch.isfinite(q).all()
    with pytest.raises(ValueError, match="dim"):
        make_inputs("local", 1, 1, 8, 1, 4)


# ------------------------------------------------------------------ a tiny run: the schema


def _tiny_cfg(**kw):
    over = dict(methods=["full", "longformer"], lengths=[64, 128], repeats=1, warmup=1,
                accuracy_lengths=[64], accuracy_seeds=[0], timeout=60.0, threads=1)
    over.update(kw)
    return cfgmod.load_config(overrides=over, registered=REGISTERED)


def test_tiny_run_writes_results_report_and_plots(tmp_path):
    out = tmp_path / "run"
    res = run_bench(_tiny_cfg(), str(out), progress=False)
    data = json.loads((out / "results.json").read_text())
    assert data == json.loads(json.dumps(res))
    assert data["schema"] == "effattn-bench/1"
    for key in ("cpu_model", "torch_threads", "torch_version", "device", "matmul_gflops"):
        assert key in data["machine"]
    assert data["machine"]["matmul_gflops"] > 0
    assert data["config"]["lengths"] == [64, 128]
    assert {(c["label"], c["N"]) for c in data["cases"]} == {(m, n) for m in ("full", "longformer") for n in (64, 128)}
    for c in data["cases"]:
        assert c["status"] == "ok", c
        assert set(c["time_s"]) >= {"median", "q1", "q3", "min", "max"}
        assert c["time_s"]["median"] > 0
        assert isinstance(c["peak_mem_bytes"], int) and c["peak_mem_bytes"] >= 0
        assert c["flops"] > 0 and c["efficiency"] > 0
        # efficiency divides by the matmul rate measured in the case's own process
        assert c["matmul_gflops"] > 0
        assert c["efficiency"] == pytest.approx(c["gflops_per_s"] / c["matmul_gflops"])
        assert c["ratio_to_sdpa"] > 0
    assert all(c["ratio_to_sdpa"] == 1.0 for c in data["cases"] if c["label"] == "full")
    acc = data["accuracy"]
    assert {(a["label"], a["family"]) for a in acc} == {(m, f) for m in ("full", "longformer")
                                                        for f in ("gaussian", "clustered", "local")}
    for a in acc:
        assert a["N"] == 64 and a["status"] == "ok"
        # at N=64 the default window (256) covers the sequence: both are exact
        assert a["max_rel_err"]["max"] < 1e-5 and a["mean_rel_err"]["max"] <= a["max_rel_err"]["max"]
    recs = data["recommendations"]
    assert len(recs) == 4 * 2 * 3 * 3  # (gaussian, clustered, local, worst) x N x budgets x bounds
    assert {r["family"] for r in recs} == {"gaussian", "clustered", "local", "worst"}
    assert all(r["choice"] in ("full", "longformer") for r in recs)
    report = (out / "report.md").read_text()
    assert "## N = 64" in report and "## Recommendation" in report and "× SDPA" in report
    for png in ("time_vs_n.png", "memory_vs_n.png", "error_vs_n_gaussian.png", "error_vs_n_clustered.png",
                "error_vs_n_local.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_causal_method_is_na_with_causal(tmp_path):
    name = next(m["name"] for m in effattn.methods() if not m["causal"])
    res = run_bench(_tiny_cfg(methods=[name], lengths=[64], causal=True, accuracy_lengths=[]),
                    str(tmp_path), progress=False)
    c = next(c for c in res["cases"] if c["label"] == name)
    assert c["status"] == "n/a" and "causal" in c["reason"]
    assert next(c for c in res["cases"] if c["label"] == "full")["status"] == "ok"
    # no accuracy measured: no error columns, and no recommendation table of "none" cells
    report = (tmp_path / "report.md").read_text()
    assert "error gaussian" not in report and "| none |" not in report
    assert "measured no accuracy" in report


# ------------------------------------------------------------------ timeout and oom


def _time_task(target, N=256, **kw):
    task = {"mode": "time", "target": target, "N": N, "batch": 1, "heads": 2, "dim": 16, "dim_v": 16,
            "dtype": "fp32", "device": "cpu", "causal": False, "backward": False, "repeats": 1,
            "warmup": 1, "threads": 1, "max_memory_mb": 0}
    task.update(kw)
    return task


def test_timeout_is_recorded_and_the_run_goes_on(tmp_path):
    res = run_bench(_tiny_cfg(methods=["full"], lengths=[64], timeout=0.001, accuracy_lengths=[]),
                    str(tmp_path), progress=False)
    assert [c["status"] for c in res["cases"]] == ["timeout"]
    assert (tmp_path / "report.md").exists()


def test_memory_cap_is_recorded_as_oom():
    """naive at N=4096 needs a 4·N² float32 score matrix (256 MB); a 32 MB cap stops it."""
    t = method_target("naive", cfgmod.MethodSettings())
    res = run_isolated(_time_task(t, N=4096, heads=4, max_memory_mb=32), timeout=60)
    assert res["status"] == "oom", res
    ok = run_isolated(_time_task(method_target("full", cfgmod.MethodSettings()), N=64), timeout=60)
    assert ok["status"] == "ok"


def test_backward_timing_runs():
    t = method_target("full", cfgmod.MethodSettings())
    res = run_isolated(_time_task(t, N=128, backward=True), timeout=60)
    assert res["status"] == "ok" and len(res["times"]) == 1 and res["times"][0] > 0


# ------------------------------------------------------------------ configuration


def test_default_config_loads_and_covers_registered_methods():
    cfg = cfgmod.load_config(registered=REGISTERED)
    assert cfg.lengths == [1024, 4096, 16384]
    assert cfgmod.selected_methods(cfg, REGISTERED) == REGISTERED
    assert cfg.settings("linformer").resolved(2048)["max_len"] == 2048


def test_config_file_overrides_defaults(tmp_path):
    p = tmp_path / "sweep.toml"
    p.write_text('[bench]\nmethods = ["longformer"]\nlengths = [512]\n'
                 '[methods.longformer]\noptions = { window = 32 }\n')
    cfg = cfgmod.load_config(str(p), {"repeats": 5}, registered=REGISTERED)
    assert cfg.lengths == [512] and cfg.repeats == 5 and cfg.heads == 4
    assert cfgmod.selected_methods(cfg, REGISTERED) == ["full", "longformer"]
    assert cfg.settings("longformer").options == {"window": 32}


def test_long_preset_is_forward_backward_at_one_million_tokens(tmp_path):
    cfg = cfgmod.load_config(registered=REGISTERED, preset="long")
    assert cfg.lengths == [1048576] and cfg.backward and (cfg.batch, cfg.heads, cfg.dim) == (1, 1, 64)
    assert set(cfg.methods) == {"lsh", "longformer", "bigbird", "sparse_strided", "sparse_fixed",
                                "linear", "taylor", "performer"}
    assert cfg.settings("full").max_len < 1048576  # the always-included SDPA baseline is n/a
    p = tmp_path / "sweep.toml"
    p.write_text("[bench]\nlengths = [4096]\n")
    assert cfgmod.load_config(str(p), registered=REGISTERED, preset="long").lengths == [4096]
    with pytest.raises(cfgmod.ConfigError, match="preset"):
        cfgmod.load_config(registered=REGISTERED, preset="nope")


def test_peers_preset_runs_peers_at_the_target_lengths():
    cfg = cfgmod.load_config(registered=REGISTERED, preset="peers")
    assert cfg.peers and cfg.lengths == [2048, 16384, 65536] and cfg.accuracy_lengths == []
    assert (cfg.batch, cfg.heads, cfg.dim, cfg.dtype) == (1, 4, 64, "fp32")
    assert "full" in cfgmod.selected_methods(cfg, REGISTERED)  # SDPA: the ratio's denominator


# ------------------------------------------------------------------ command line errors


@pytest.mark.parametrize("args, needle", [
    (["--methods", "nosuch"], "nosuch"),
    (["--dtype", "fp64"], "dtype"),
    (["--lengths", "-5"], "lengths"),
    (["--lengths", "abc"], "lengths"),
    (["--repeats", "0"], "repeats"),
    (["--timeout", "-1"], "timeout"),
    (["--config", "does/not/exist.toml"], "config"),
    (["--preset", "nope"], "preset"),
    (["--long", "--preset", "peers"], "preset"),
])
def test_bad_arguments_exit_2_with_one_line(args, needle):
    r = CliRunner().invoke(app, ["bench", *args])
    text = r.output.strip()
    assert r.exit_code == 2, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert text.startswith("error:") and needle in text


def test_invalid_toml_is_one_line_error(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[bench\nlengths = ")
    r = CliRunner().invoke(app, ["bench", "--config", str(p)])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "not valid TOML" in r.output


def test_cli_tiny_run(tmp_path):
    out = tmp_path / "cli"
    r = CliRunner().invoke(app, ["bench", "--methods", "full", "--lengths", "64", "--repeats", "1",
                                 "--accuracy-lengths", "64", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "results.json").exists() and (out / "report.md").exists()
    assert os.path.basename(str(out)) in r.output or "wrote" in r.output


def test_missing_peer_is_reported_not_fatal(monkeypatch):
    from effattn.bench import peers
    from effattn.bench.runner import build_targets

    fake = peers.Peer("no-such-peer-pkg", "no_such_peer_module_xyz", "full", lambda *a: None, "n/a")
    monkeypatch.setitem(peers.PEERS, "no-such-peer-pkg", fake)
    cfg = _tiny_cfg(methods=["full"], peers=True)
    cfg.peer_names = ["no-such-peer-pkg"]
    targets, notes = build_targets(cfg, REGISTERED)
    assert [t.label for t in targets] == ["full"]
    assert notes and notes[0].startswith("peer no-such-peer-pkg not installed")


def test_peers_run_only_for_the_selected_methods(monkeypatch):
    """A configured peer whose counterpart method is not selected is skipped with a note
    (``--methods performer`` does not time reformer-pytorch)."""
    from effattn.bench import peers
    from effattn.bench.runner import build_targets

    for name, ours in (("fake-full-peer", "full"), ("fake-lsh-peer", "lsh")):
        monkeypatch.setitem(peers.PEERS, name, peers.Peer(name, "effattn", ours, lambda *a: None, "n/a"))
    cfg = _tiny_cfg(methods=["full"], peers=True)
    cfg.peer_names = ["fake-full-peer", "fake-lsh-peer"]
    targets, notes = build_targets(cfg, REGISTERED)
    assert [(t.kind, t.name) for t in targets] == [("method", "full"), ("peer", "fake-full-peer")]
    assert notes == ["peer fake-lsh-peer skipped: its counterpart method 'lsh' is not selected"]


def test_peer_adapters_document_matched_settings():
    from effattn.bench.peers import PEERS

    for name, p in PEERS.items():
        assert p.ours and len(p.matched) > 40, name


def test_backend_of_the_timed_calls_is_recorded():
    """Block-sparse methods report the engine backend that ran (own tiles with gradients);
    methods off the engine report none."""
    from effattn.bench.measure import time_case

    sparse = method_target("longformer", cfgmod.MethodSettings(options={"window": 16}))
    res = time_case(_time_task(sparse, N=128, backward=True))
    assert res["backend"] == "engine"
    assert time_case(_time_task(method_target("full", cfgmod.MethodSettings()), N=128))["backend"] is None


def test_kept_scratch_counts_in_memory_but_its_refault_is_not_timed(monkeypatch):
    """lsh's torch groups keep a workspace between calls (the fused native kernel, switched
    off here, needs none): the memory call frees it first (so the peak includes it); that
    call — for every method, as it starts from a trimmed heap — is left out of the
    ``repeats`` timed calls."""
    from effattn.bench.measure import time_case
    from effattn.mechanisms import lsh as lsh_mod
    from effattn.mechanisms._scratch import kept_bytes, release_workspaces

    monkeypatch.setattr(lsh_mod, "USE_NATIVE_CHUNKS", False)

    lsh = method_target("lsh", cfgmod.MethodSettings(options={"n_hashes": 2, "chunk_len": 16},
                                                    shared_qk=True))
    res = time_case(_time_task(lsh, N=512, repeats=2))
    kept = kept_bytes()
    assert kept > 0 and len(res["times"]) == 2 and res["memory_call_s"] > 0
    assert res["peak_mem_bytes"] >= kept
    release_workspaces()  # (each bench case has a process of its own)
    full = time_case(_time_task(method_target("full", cfgmod.MethodSettings()), N=128, repeats=2))
    assert len(full["times"]) == 2 and full["memory_call_s"] not in full["times"]
