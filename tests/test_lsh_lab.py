"""The seed lab's worked LSH examples (002_reformer_lsh_lab.txt), with its printed numbers,
run through the library's own hashing, sorting, chunking and engine path."""

from __future__ import annotations

import torch

from effattn.mechanisms.lsh import (
    bucket_sort_keys, chunk_layout, hash_vectors, make_rotations, sort_buckets,
    sorted_chunk_attention,
)
from effattn.softmax import merge_partials

SEQLEN, N_BUCKETS, N_HASHES, CHUNK = 8, 4, 2, 2


def lab_inputs():
    """The lab's ``t_q`` (rows 0,1,2,3,0,1,2,3 repeated over 3 features), ``t_v = ones(8, 5)``
    and ``t_buckets = [0 1 2 3 0 1 2 3 4 5 6 7 4 5 6 7]``, batched as ``[1, 1, ...]``."""
    q = (torch.arange(SEQLEN) % N_BUCKETS).float()[:, None].expand(SEQLEN, 3).contiguous()
    v = torch.ones(SEQLEN, 5)
    buckets = torch.tensor([(j % N_BUCKETS) + N_BUCKETS * i
                            for i in range(N_HASHES) for j in range(SEQLEN)])
    return q[None, None], v[None, None], buckets


def test_sort_buckets_matches_the_lab_printout():
    _, _, buckets = lab_inputs()
    ticker = torch.arange(buckets.numel())
    keys = bucket_sort_keys(buckets, SEQLEN)
    sticker, undo_sort = sort_buckets(buckets, SEQLEN)
    assert ticker.tolist() == list(range(16))
    assert keys.tolist() == [0, 9, 18, 27, 4, 13, 22, 31, 32, 41, 50, 59, 36, 45, 54, 63]
    assert keys[sticker].tolist() == [0, 4, 9, 13, 18, 22, 27, 31, 32, 36, 41, 45, 50, 54, 59, 63]
    assert sticker.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert undo_sort.tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    # the lab's sq: rows 0,0,1,1,2,2,3,3 twice
    q, _, _ = lab_inputs()
    sq = q[0, 0][sticker % SEQLEN]
    assert sq[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] * 2


def test_dotandv_with_softmax_through_the_engine():
    """chunk_len=2, two hashes, q = k unnormalized, scale 1, no self-exclusion."""
    q, v, buckets = lab_inputs()
    out, lse, rounds = sorted_chunk_attention(
        q, q, v, buckets[None, None], seqlen=SEQLEN, chunk_len=CHUNK, n_chunks_before=0,
        n_chunks_after=0, scale=1.0, keep_rounds=True)
    logits = torch.tensor([0.6931472, 3.6931472, 12.693148, 27.693148] * 2)
    per_round = torch.tensor([1.0, 1.0, 0.9999995, 0.9999995] * 2)
    for o, l in rounds:  # the lab prints both rounds' (unsorted) outputs and logits
        torch.testing.assert_close(l[0, 0], logits, atol=1e-6, rtol=1e-7)
        torch.testing.assert_close(o[0, 0], per_round[:, None].expand(8, 5), atol=1e-6, rtol=0)
    combined = torch.tensor([1.0, 1.0, 0.99999905, 0.99999905] * 2)
    torch.testing.assert_close(out[0, 0], combined[:, None].expand(8, 5), atol=1e-6, rtol=0)
    # the merged lse: logsumexp of two equal rounds
    torch.testing.assert_close(lse[0, 0], logits + torch.log(torch.tensor(2.0)), atol=1e-6, rtol=1e-7)


def test_dotandv_passthrough_with_the_same_sort_chunk_unsort_helpers():
    """Without softmax the lab's out is ``dots @ v`` per chunk: 0, 6, 24, 54, logits 0."""
    q, v, buckets = lab_inputs()
    sticker, undo_sort = sort_buckets(buckets, SEQLEN)
    sq, sv = q[0, 0][sticker % SEQLEN], v[0, 0][sticker % SEQLEN]
    n_chunks = sticker.numel() // CHUNK
    gids, layout = chunk_layout(n_chunks, 0, 0)
    assert gids.tolist() == list(range(n_chunks)) and layout[:, 0].tolist() == list(range(n_chunks))
    rsq = sq.reshape(n_chunks, CHUNK, -1)
    rsk = rsq[layout[:, 0]]  # each chunk sees only itself (n_chunks_before = after = 0)
    dotlike = rsq @ rsk.transpose(-1, -2)
    assert dotlike[:, 0, 0].tolist() == [0, 3, 12, 27] * 2
    so = (dotlike @ sv.reshape(n_chunks, CHUNK, -1)[layout[:, 0]]).reshape(-1, 5)
    slogits = torch.zeros(sticker.numel())
    o, logits = so[undo_sort], slogits[undo_sort]
    assert o[:, 0].tolist() == [0, 6, 24, 54] * 4
    assert (o == o[:, :1]).all() and (logits == 0).all()
    out, _ = merge_partials(o.reshape(N_HASHES, SEQLEN, 5), logits.reshape(N_HASHES, SEQLEN))
    assert out[:, 0].tolist() == [0, 6, 24, 54] * 2


def test_hash_of_a_constant_input_is_one_bucket_per_round():
    """``np.ones((8, 5))``, 4 buckets, 3 hashes: every position lands in the same bucket
    of each round; round r's buckets are offset by r * n_buckets."""
    ones = torch.ones(8, 5)
    for seed in range(5):
        buckets = hash_vectors(ones, make_rotations(5, 3, 4, seed), 4)
        assert buckets.shape == (24,)
        per_round = buckets.reshape(3, 8)
        for r in range(3):
            assert (per_round[r] == per_round[r, 0]).all()
            assert r * 4 <= int(per_round[r, 0]) < (r + 1) * 4
    # the lab's printed hash (tf backend): bucket 3 in every round -> 3, 7, 11
    rot = torch.zeros(5, 3, 2)
    rot[:, :, 1] = -1.0  # x R = (0, -5): argmax of concat[(0, -5), (0, 5)] is index 3
    assert hash_vectors(ones, rot, 4).tolist() == [3] * 8 + [7] * 8 + [11] * 8
