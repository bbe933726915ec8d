"""Generated tasks: exact ListOps semantics, task structure, determinism, disjoint splits."""

import numpy as np
import pytest
import torch

from effattn.tasks import SPLITS, TASKS, content_hash, make_task
from effattn.tasks.listops import OPERATORS, decode, encode, evaluate, parse, to_tokens


@pytest.mark.parametrize("expr, value", [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 3 [MAX 8 1 ] 5 ]", 3),
    ("[SM 5 6 7 ]", 8),  # 18 mod 10
    ("[MED 1 2 3 4 ]", 2),  # median 2.5 truncated, as LRA's int(np.median)
    ("[MED 9 1 5 ]", 5),
    ("[SM [MAX 9 9 ] [SM 9 9 ] 4 ]", 1),  # 9 + 8 + 4 = 21
    ("7", 7),
])
def test_listops_evaluates_known_expressions(expr, value):
    tree = parse(expr)
    assert evaluate(tree) == value
    assert " ".join(to_tokens(tree)) == expr


@pytest.mark.parametrize("bad", ["[MAX 2 9", "[MAX ]", "[FOO 1 ]", "[MIN 1 ] 2", "12"])
def test_listops_parse_rejects_malformed(bad):
    with pytest.raises(ValueError):
        parse(bad)


def _depth(tree):
    return 1 if isinstance(tree, int) else 1 + max(_depth(a) for a in tree[1])


def test_listops_examples_are_consistent_and_within_bounds():
    task = make_task("listops", seed=3, min_length=20, max_length=60, max_depth=4, max_args=5)
    ops = set()
    for i in range(40):
        ex = task.example("train", i)
        tree = parse(decode(ex.tokens))
        assert ex.target == evaluate(tree)
        assert 20 < len(ex.tokens) < 60
        assert _depth(tree) <= 4
        assert (encode(to_tokens(tree)) == ex.tokens).all()
        stack = [tree]
        while stack:
            t = stack.pop()
            if not isinstance(t, int):
                ops.add(t[0])
                assert 2 <= len(t[1]) <= 5
                stack += t[1]
    assert ops == set(OPERATORS)
    labels = [task.example("train", i).target for i in range(40)]
    assert len(set(labels)) >= 4  # not a constant label


def test_listops_lra_preset_lengths():
    task = make_task("listops", preset="lra")
    ex = task.example("val", 0)
    assert 500 < len(ex.tokens) < 2000
    b = task.batch("train", 0, 3)
    assert b.padding_mask is not None and b.inputs.shape[1] == int(b.padding_mask.sum(1).max())


def test_duplication_structure_and_targets():
    task = make_task("duplication", length=16, vocab_size=8)
    b = task.batch("train", 0, 4)
    x, y = b.inputs, b.targets
    assert x.shape == y.shape == (4, 16) and b.padding_mask is None
    assert (x[:, 0] == 0).all() and (x[:, 8] == 0).all()
    assert torch.equal(x[:, 1:8], x[:, 9:])
    assert ((x[:, 1:8] >= 1) & (x[:, 1:8] <= 7)).all()
    assert (y[:, :8] == -100).all() and (y[:, -1] == -100).all()
    assert torch.equal(y[:, 8:15], x[:, 9:16])  # position i predicts token i+1 of the second copy


def test_mqar_keys_values_and_query_labels():
    task = make_task("mqar", length=64, vocab_size=32, num_kv_pairs=4)
    gaps = []
    for i in range(30):
        ex = task.example("train", i)
        x, y = ex.tokens, ex.target
        keys, vals = x[0:8:2], x[1:8:2]
        assert ((1 <= keys) & (keys < 16)).all() and ((16 <= vals) & (vals < 32)).all()
        assert len(set(keys.tolist())) == 4
        q = np.nonzero(y != -100)[0]
        assert len(q) == 4 and (q >= 8).all()
        lookup = dict(zip(keys.tolist(), vals.tolist()))
        for p in q:
            assert y[p] == lookup[int(x[p])]  # the label is the value paired with the queried key
        gaps += ((q - 8) // 2).tolist()
    # power law: queries crowd near the context (uniform over 28 gap slots would average 13.5)
    assert np.mean(gaps) < 11


def test_pathfinder_balanced_binary_pixels_and_difficulty():
    task = make_task("pathfinder", contour_length=6)
    b = task.batch("val", 0, 16)
    assert b.inputs.shape == (16, 1024) and b.padding_mask is None
    assert b.targets.sum().item() == 8  # balanced
    assert set(torch.unique(b.inputs).tolist()) <= {0, 255}
    ink_short = (b.inputs > 0).float().mean()
    ink_long = (make_task("pathfinder", contour_length=14).batch("val", 0, 16).inputs > 0).float().mean()
    assert ink_long > ink_short


@pytest.mark.parametrize("name, opts", [
    ("listops", dict(preset="tiny")),
    ("duplication", dict(length=16, vocab_size=8)),
    ("mqar", dict(length=32, vocab_size=32, num_kv_pairs=2)),
    ("pathfinder", dict(size=16, contour_length=3, distractors=1)),
])
def test_tasks_deterministic_given_seed(name, opts):
    a = make_task(name, seed=1, **opts).batch("train", 5, 3)
    b = make_task(name, seed=1, **opts).batch("train", 5, 3)
    c = make_task(name, seed=2, **opts).batch("train", 5, 3)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, c.inputs)
    # random access: example 6 alone equals the second row of the batch starting at 5
    one = make_task(name, seed=1, **opts).batch("train", 6, 1)
    n = one.inputs.shape[1]
    assert torch.equal(one.inputs[0], a.inputs[1, :n])


@pytest.mark.parametrize("name, opts, counts", [
    # a tiny example space (3^4 = 81 sequences): duplicates abound, yet no split shares one
    ("duplication", dict(length=10, vocab_size=4), (120, 40, 40)),
    ("listops", dict(preset="tiny"), (60, 20, 20)),
    ("mqar", dict(length=32, vocab_size=32, num_kv_pairs=2), (100, 30, 30)),
    ("pathfinder", dict(size=16, contour_length=3, distractors=1), (40, 12, 12)),
])
def test_splits_never_overlap(name, opts, counts):
    task = make_task(name, seed=0, **opts)
    seen = {}
    for split, n in zip(SPLITS, counts):
        seen[split] = {content_hash(task.example(split, i)) for i in range(n)}
    assert not seen["train"] & seen["val"]
    assert not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]


def test_make_task_errors():
    with pytest.raises(ValueError, match="unknown task"):
        make_task("nope")
    with pytest.raises(TypeError, match="duplication"):
        make_task("duplication", colour=3)
    with pytest.raises(ValueError, match="length"):
        make_task("duplication", length=7)
    with pytest.raises(ValueError, match="num_kv_pairs"):
        make_task("mqar", length=64, vocab_size=8, num_kv_pairs=8)
    with pytest.raises(ValueError, match="preset"):
        make_task("listops", preset="huge")
    with pytest.raises(ValueError, match="split"):
        make_task("duplication").example("dev", 0)
    assert set(TASKS) == {"listops", "duplication", "mqar", "pathfinder"}
