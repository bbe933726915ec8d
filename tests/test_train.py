"""``effattn train`` / ``effattn eval``: schedule, options, config files, metrics, checkpoints,
resume, evaluation with another method, one-line errors."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import typer

from effattn.train import register
from effattn.training.config import TrainConfig, build_config, parse_options, parse_value
from effattn.training.loop import lr_at
from effattn.training.objective import loss_terms

runner = CliRunner()
# the train/eval commands on an app of their own (what `effattn` registers through effattn.train)
app = typer.Typer()
register(app)
TINY = ["--task", "duplication", "--length", "16", "--vocab", "8", "--dim", "16", "--heads", "2",
        "--layers", "1", "--batch", "4", "--eval-examples", "8", "--log-every", "2", "--no-progress"]


def _train(tmp_path, *extra, name="run"):
    out = tmp_path / name
    res = runner.invoke(app, ["train", *TINY, "--out", str(out), *extra])
    assert res.exit_code == 0, res.output
    return out, res


def _params(out):
    return load_file(str(out / "checkpoint" / "model.safetensors"))


def test_lr_schedule_warmup_then_decay():
    cfg = TrainConfig(lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    lin = TrainConfig(lr=1.0, warmup=0, steps=100, min_lr_ratio=0.0, schedule="linear")
    assert lr_at(50, lin) == pytest.approx(0.5)
    assert lr_at(7, TrainConfig(schedule="constant", lr=0.3, warmup=0)) == 0.3


def test_option_parsing():
    assert parse_options(["n_hashes=4", "scale=0.5", "causal=true", "grid=4,8", "kernel=relu"],
                         "--method-opt") == {"n_hashes": 4, "scale": 0.5, "causal": True,
                                             "grid": (4, 8), "kernel": "relu"}
    assert parse_value("none") is None
    with pytest.raises(ValueError, match="--method-opt"):
        parse_options(["n_hashes"], "--method-opt")


def test_loss_terms_are_sums_over_non_ignored_targets():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0], [5.0, 0.0]]])
    targets = torch.tensor([[0, 0, -100]])
    s, n, c = loss_terms(logits, targets)
    expect = -math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (math.exp(2) + 1))
    assert s.item() == pytest.approx(expect) and n.item() == 2 and c.item() == 1


def test_toml_config_with_command_line_override(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('task = "mqar"\nlr = 0.01\nsteps = 7\n[method_options]\nblock_q = 8\n')
    cfg = build_config(str(f), {"steps": 9, "method_options": {"block_k": 4}})
    assert (cfg.task, cfg.lr, cfg.steps) == ("mqar", 0.01, 9)
    assert cfg.method_options == {"block_q": 8, "block_k": 4}
    f.write_text("stepz = 3\n")
    with pytest.raises(ValueError, match="stepz"):
        build_config(str(f), {})


def test_train_writes_metrics_checkpoint_and_learns(tmp_path):
    out, res = _train(tmp_path, "--steps", "30", "--lr", "3e-3", "--warmup", "5", "--eval-every", "10")
    summary = json.loads(res.output.strip().splitlines()[-1])
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["split"] == "train"]
    val = [r for r in recs if r["split"] == "val"]
    assert [r["step"] for r in val] == [10, 20, 30]
    assert len(train) == 15 and all(r["tokens_per_s"] > 0 for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    assert summary["val"]["step"] == 30
    for f in ("model.safetensors", "config.json", "optimizer.safetensors", "optimizer.json"):
        assert (out / "checkpoint" / f).is_file()
    saved = json.loads((out / "checkpoint" / "config.json").read_text())
    assert saved["step"] == 30 and saved["task"] == {"length": 16, "vocab_size": 8}


def test_resume_continues_exactly(tmp_path):
    # a constant schedule does not depend on --steps, so 3 steps + resume to 6 must equal
    # 6 steps: model, AdamW moments, RNG (dropout) and the data position are all restored
    common = ["--dropout", "0.1", "--eval-every", "0", "--schedule", "constant", "--warmup", "0"]
    straight, _ = _train(tmp_path, *common, "--steps", "6", name="straight")
    resumed, _ = _train(tmp_path, *common, "--steps", "3", name="resumed")
    assert json.loads((resumed / "checkpoint" / "config.json").read_text())["step"] == 3
    _, res = _train(tmp_path, *common, "--steps", "6", "--resume", name="resumed")
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    steps = [json.loads(x)["step"] for x in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6 and 4 in steps and steps.count(2) == 1


def test_eval_with_other_methods(tmp_path):
    out, _ = _train(tmp_path, "--steps", "4", "--eval-every", "0")
    ck = str(out / "checkpoint")
    base = ["eval", "--checkpoint", ck, "--examples", "8", "--batch", "4", "--split", "val"]
    full = json.loads(runner.invoke(app, base).output.strip().splitlines()[-1])
    naive = json.loads(runner.invoke(app, [*base, "--method", "naive"]).output.strip().splitlines()[-1])
    assert full["method"] == "full" and naive["method"] == "naive"
    assert naive["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert naive["accuracy"] == full["accuracy"]
    blk = runner.invoke(app, [*base, "--method", "blockwise", "--method-opt", "block_q=4"])
    assert blk.exit_code == 0, blk.output
    assert json.loads(blk.output.strip().splitlines()[-1])["method_options"] == {"block_q": 4}


def test_lsh_trained_model_evaluates_with_more_hashes(tmp_path):
    out, _ = _train(tmp_path, "--steps", "2", "--eval-every", "0", "--method", "lsh",
                    "--method-opt", "n_hashes=1", "--method-opt", "chunk_len=4")
    saved = json.loads((out / "checkpoint" / "config.json").read_text())["config"]
    assert saved["method"] == "lsh" and saved["shared_qk"] is None  # resolved: shared-QK for lsh
    assert not any(".to_k." in k for k in _params(out))
    res = runner.invoke(app, ["eval", "--checkpoint", str(out / "checkpoint"), "--examples", "8",
                              "--method-opt", "n_hashes=4"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output.strip().splitlines()[-1])
    assert rec["method_options"] == {"n_hashes": 4, "chunk_len": 4}
    # exact attention on the shared-QK architecture (keys = normalized queries, no key projection)
    res = runner.invoke(app, ["eval", "--checkpoint", str(out / "checkpoint"), "--examples", "8",
                              "--method", "full"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["method_options"] == {}


@pytest.mark.parametrize("args, needle", [
    (["train", "--steps", "0"], "--steps"),
    (["train", "--task", "nope"], "unknown task"),
    (["train", "--method", "nope"], "unknown attention method"),
    (["train", "--method-opt", "bogus=1"], "unknown option"),
    (["train", "--method-opt", "n_hashes"], "key=value"),
    (["train", "--task", "pathfinder", "--length", "64"], "length"),
    (["train", "--task", "listops", "--model", "lm"], "--model"),
    (["train", "--config", "missing.toml"], "--config"),
    (["train", "--batch", "3", "--lr", "-1"], "--lr"),
    (["eval", "--checkpoint", "nowhere"], "--checkpoint"),
])
def test_bad_arguments_one_line_error_exit_2(args, needle):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], res.output


def test_method_option_named_like_a_model_argument_reaches_the_attention(tmp_path):
    """linformer's ``max_len`` (its projection length) is not the model's ``max_len``."""
    from effattn.tasks import make_task
    from effattn.training.models import build_model

    task = make_task("listops", seed=0, min_length=8, max_length=24)
    cfg = TrainConfig(task="listops", method="linformer", method_options={"k": 4, "max_len": 32},
                      dim=16, heads=2, layers=2)
    model = build_model(cfg, task)
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if n.endswith(("E", "F"))}
    assert shapes == {(4, 32)}
