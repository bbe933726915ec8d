"""Data parallel: 2 processes under torchrun (gloo, CPU) equal 1 process with the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

import effattn
from effattn.train import register

app = typer.Typer()
register(app)

# listops has variable lengths, so each rank pads its shard to a different length than the
# single process pads the whole batch: padding-aware models must still give the same update
ARGS = ["train", "--task", "listops", "--task-opt", "preset=tiny", "--dim", "16", "--heads", "2",
        "--layers", "1", "--batch", "8", "--steps", "4", "--lr", "3e-3", "--warmup", "1",
        "--eval-every", "0", "--eval-examples", "8", "--log-every", "1", "--no-progress"]


def test_torchrun_two_processes_match_one(tmp_path):
    single = tmp_path / "single"
    res = CliRunner().invoke(app, [*ARGS, "--out", str(single)])
    assert res.exit_code == 0, res.output

    ddp = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    src = str(Path(effattn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "effattn", *ARGS, "--out", str(ddp)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]

    a = load_file(str(single / "checkpoint" / "model.safetensors"))
    b = load_file(str(ddp / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    la = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb):
        assert abs(ra["loss"] - rb["loss"]) < 1e-4 and ra["accuracy"] == rb["accuracy"]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["world"] == 2
    assert la[0]["loss"] != la[-1]["loss"]  # training moved the parameters
