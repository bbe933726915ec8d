"""``effattn repro``: table builders (ours beside the published figures, n/a for missing
cells), the results.json schema, example pools, LSH re-hashing, and seconds-long smoke runs
of the three commands with one-line errors for bad arguments."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from effattn.repro import register, tables
from effattn.repro.data import MixedTask, PooledTask
from effattn.repro.published import REFORMER_EVAL, REFORMER_TABLE2, REFORMER_TRAIN
from effattn.tasks import make_task

runner = CliRunner()
app = typer.Typer()
register(app)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest (and steadiest on a shared 2-core machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rows(md: str) -> list:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines()
            if line.startswith("|") and "---" not in line]


# ------------------------------------------------------------------ table builders


def test_reformer_table_puts_the_paper_beside_ours_with_na_for_missing_cells():
    cells = [{"train": "full", "eval": "full", "accuracy": 99.5},
             {"train": "lsh-1", "eval": "lsh-8", "accuracy": 88.25}]
    res = {"train_labels": list(REFORMER_TRAIN), "eval_labels": list(REFORMER_EVAL), "cells": cells,
           "published": {"table": REFORMER_TABLE2}}
    rows = _rows(tables.reformer_table(res))
    assert rows[0][0] == "train \\ eval" and [c.split(" ")[0] for c in rows[0][1:]] == list(REFORMER_EVAL)
    assert [r[0] for r in rows[1:]] == list(REFORMER_TRAIN)
    body = {r[0]: dict(zip(REFORMER_EVAL, r[1:])) for r in rows[1:]}
    assert body["full"]["full"] == "99.5 / 100.0"
    assert body["full"]["lsh-8"] == "n/a / 94.8"
    assert body["lsh-1"]["lsh-8"] == "88.2 / 99.9"  # rounded to one decimal
    assert body["lsh-4"]["lsh-1"] == "n/a / 91.9"


def test_listops_table_has_published_column_and_reasons_for_skipped_methods():
    res = {"rows": [
        {"method": "full", "published": 36.37, "status": "ok", "test_accuracy": 0.3125, "steps": 10,
         "wall_s": 12.0, "tokens_per_s": 1234.5, "peak_mem_bytes": 3 * 2 ** 20, "method_options": {}},
        {"method": "nystrom", "published": None, "status": "ok", "test_accuracy": 0.25, "steps": 10,
         "wall_s": 3.0, "tokens_per_s": None, "peak_mem_bytes": None, "method_options": {"n_landmarks": 8}},
        {"method": "window2d", "published": None, "status": "skipped", "reason": "needs a 2-D grid"},
    ]}
    rows = _rows(tables.listops_table(res))
    assert rows[0][:3] == ["method", "LRA published (%)", "ours: test accuracy (%)"]
    assert rows[1][:5] == ["full", "36.37", "31.2", "10", "12 s"]
    assert rows[1][5:7] == ["1234", "3 MB"]
    assert rows[2][1] == "n/a" and rows[2][5] == "n/a" and rows[2][7] == "n_landmarks=8"
    assert rows[3][0] == "window2d" and rows[3][2] == "n/a" and "2-D grid" in rows[3][-1]


def test_mqar_table_rows_methods_columns_settings_published_last():
    res = {"settings": [[64, 4], [128, 8]], "methods": ["full", "linear"],
           "runs": [{"method": "full", "length": 64, "pairs": 4, "status": "ok", "test_accuracy": 1.0},
                    {"method": "full", "length": 128, "pairs": 8, "status": "ok", "test_accuracy": 0.5},
                    {"method": "linear", "length": 64, "pairs": 4, "status": "ok", "test_accuracy": 0.125}],
           "published": {"per_method": {"full": 100.0, "linear": None}}}
    rows = _rows(tables.mqar_table(res))
    assert rows[0] == ["method", "N=64, 4 pairs", "N=128, 8 pairs", "Zoology published (%)"]
    assert rows[1] == ["full", "100.0", "50.0", "~100"]
    assert rows[2] == ["linear", "12.5", "n/a", "n/a"]


# ------------------------------------------------------------------ data helpers and hashing


def test_pooled_task_cycles_a_fixed_pool_and_mixed_task_takes_turns():
    base = make_task("mqar", length=16, num_kv_pairs=2, vocab_size=16)
    pooled = PooledTask(base, 3)
    assert torch.equal(pooled.batch("train", 3, 1).inputs, pooled.batch("train", 0, 1).inputs)
    assert torch.equal(pooled.batch("test", 0, 2).inputs, base.batch("test", 0, 2).inputs)
    assert pooled.max_len == 16 and pooled.options() == base.options()
    long = PooledTask(make_task("mqar", length=32, num_kv_pairs=4, vocab_size=16), 3)
    mix = MixedTask([pooled, long], batch=2)
    assert mix.max_len == 32
    assert [mix.batch("train", s * 2, 2).inputs.shape[1] for s in range(4)] == [16, 32, 16, 32]
    assert torch.equal(mix.batch("train", 4, 2).inputs, pooled.batch("train", 2, 2).inputs)


def test_lsh_rotations_are_redrawn_on_every_call():
    from effattn.repro.reformer import redraw_lsh_rotations
    from effattn.nn import CausalLM

    model = CausalLM(16, dim=16, depth=1, heads=2, method="lsh", max_len=16, shared_qk=True,
                     n_hashes=1, chunk_len=4)
    attn = next(m for m in model.modules() if type(m).__name__ == "Attention")
    handles = redraw_lsh_rotations(model, seed=0)
    assert len(handles) == 1
    x = torch.randint(0, 16, (2, 16))
    seeds = []
    for _ in range(3):
        model(x)
        seeds.append(attn.options["seed"])
    assert len(set(seeds)) == 3
    again = CausalLM(16, dim=16, depth=1, heads=2, method="lsh", max_len=16, shared_qk=True,
                     n_hashes=1, chunk_len=4)
    redraw_lsh_rotations(again, seed=0)
    again(x)
    assert next(m for m in again.modules() if type(m).__name__ == "Attention").options["seed"] == seeds[0]


# ------------------------------------------------------------------ smoke runs


def _invoke(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res


def _check_common(out, experiment: str, plot: str) -> dict:
    assert (out / "report.md").is_file() and (out / plot).is_file()
    data = json.loads((out / "results.json").read_text())
    for key in ("experiment", "schema", "date", "command", "config", "published", "wall_time_s", "plots"):
        assert key in data, key
    assert data["experiment"] == experiment and data["schema"] == 1 and data["plots"] == [plot]
    assert data["command"].startswith(f"effattn repro {experiment} ") and "--steps 2" in data["command"]
    return data


def test_reformer_table2_smoke(tmp_path):
    out = tmp_path / "ref"
    _invoke(["repro", "reformer-table2", "--length", "16", "--steps", "2", "--batch", "4", "--chunk-len", "4",
             "--dim", "16", "--eval-examples", "4", "--quiet", "--out", str(out)])
    data = _check_common(out, "reformer-table2", "reformer_table2.png")
    assert [r["train"] for r in data["runs"]] == ["full", "lsh-4", "lsh-2", "lsh-1"]
    assert len(data["cells"]) == 20
    for c in data["cells"]:
        assert set(c) >= {"train", "eval", "accuracy", "examples"} and 0 <= c["accuracy"] <= 100
    for r in data["runs"]:
        assert set(r) >= {"steps", "wall_s", "train_accuracy", "tokens_per_s", "peak_mem_bytes"}
    report = (out / "report.md").read_text()
    assert "ours / paper" in report and "| lsh-1 |" in report


def test_listops_smoke(tmp_path):
    out = tmp_path / "lo"
    _invoke(["repro", "listops", "--methods", "full,linformer", "--steps", "2", "--batch", "4",
             "--min-length", "4", "--max-length", "20", "--train-pool", "8", "--test-examples", "8",
             "--val-examples", "4", "--dim", "16", "--layers", "1", "--heads", "2", "--quiet", "--out", str(out)])
    data = _check_common(out, "listops", "listops_accuracy_vs_speed.png")
    by = {r["method"]: r for r in data["rows"]}
    assert by["full"]["status"] == "ok" and by["linformer"]["status"] == "ok", by
    assert by["full"]["published"] == 36.37 and by["window2d"]["status"] == "skipped"
    assert set(by["full"]) >= {"test_accuracy", "steps", "wall_s", "tokens_per_s", "peak_mem_bytes"}
    assert "| full | 36.37 |" in (out / "report.md").read_text()


def test_mqar_smoke(tmp_path):
    out = tmp_path / "mq"
    _invoke(["repro", "mqar", "--methods", "full,linear", "--settings", "16:2,32:4", "--steps", "2",
             "--batch", "4", "--train-pool", "8", "--test-examples", "4", "--dim", "16", "--heads", "2",
             "--quiet", "--out", str(out)])
    data = _check_common(out, "mqar", "mqar_accuracy.png")
    assert data["settings"] == [[16, 2], [32, 4]] and data["methods"] == ["full", "linear"]
    assert {(r["method"], r["length"]) for r in data["runs"]} == {
        ("full", 16), ("full", 32), ("linear", 16), ("linear", 32)}
    assert data["published"]["per_method"] == {"full": 100.0, "linear": None}


@pytest.mark.parametrize("args, needle", [
    (["reformer-table2", "--length", "7"], "--length"),
    (["reformer-table2", "--dim", "6"], "--dim"),
    (["listops", "--preset", "huge"], "--preset"),
    (["listops", "--methods", "window2d"], "window2d"),
    (["listops", "--methods", "nope"], "unknown method"),
    (["mqar", "--settings", "64:x"], "--settings"),
    (["mqar", "--methods", "linformer"], "cannot be causal"),
    (["mqar", "--settings", "8:4"], "--settings"),
    (["mqar", "--pos", "alibi"], "--pos"),
])
def test_bad_arguments_are_one_line_errors(args, needle, tmp_path):
    res = runner.invoke(app, ["repro", *args, "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.output
    assert "Traceback" not in res.output
