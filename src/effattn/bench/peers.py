"""Adapters running peer libraries on the benchmark's own ``q, k, v``, matched to one of ours.

Every adapter returns ``fn(q [B,H,N,D], k [B,H,N,D], v [B,H,N,Dv]) -> out [B,H,N,Dv]``.
Peers that are whole layers (input ``x``, their own Q/K/V/output projections) get
*stash* modules in place of those projections: ``to_q(x)`` returns our ``q`` merged
over heads, the output projection is the identity, and so on.  The peer therefore
computes its attention on exactly the benchmark's inputs, and the time is the
attention alone (plus the peer's reshapes), as for ours.

"Matched settings" (each :class:`Peer`'s ``matched`` text, copied into the report) means:
the same structural parameters as our counterpart method's bench options (buckets,
rounds, window, block size, features, projected length, landmarks) and the default
scale ``1/sqrt(D)``; remaining differences are stated there.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class Peer:
    """A peer library: pip ``package``, import name ``module``, our counterpart ``ours``,
    the adapter ``build(opts, N, H, D, Dv, causal, seed) -> fn`` and the ``matched`` note."""

    package: str
    module: str
    ours: str
    build: Callable
    matched: str


class _Stash(nn.Module):
    """Returns the tensor last put in ``self.value`` whatever its input (replaces a projection)."""

    def __init__(self):
        super().__init__()
        self.value = None

    def forward(self, x):  # noqa: D401 - a projection's forward
        return self.value


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D] -> [B, N, H*D]``."""
    B, H, N, D = t.shape
    return t.transpose(1, 2).reshape(B, N, H * D)


def _split_heads(t: torch.Tensor, H: int) -> torch.Tensor:
    """``[B, N, H*D] -> [B, H, N, D]``."""
    B, N, E = t.shape
    return t.reshape(B, N, H, E // H).transpose(1, 2)


def _need(cond: bool, msg: str) -> None:
    from effattn.bench.targets import NotApplicable

    if not cond:
        raise NotApplicable(msg)


# ------------------------------------------------------------------ reformer-pytorch


def _reformer(opts, N, H, D, Dv, causal, seed):
    from reformer_pytorch.reformer_pytorch import LSHAttention

    chunk = opts.get("chunk_len", 64)
    _need(N % (2 * chunk) == 0, f"reformer-pytorch needs N divisible by 2*bucket_size={2 * chunk}")
    attn = LSHAttention(bucket_size=chunk, n_hashes=opts.get("n_hashes", 4), causal=causal)
    attn.eval()

    def fn(q, k, v):
        B = q.shape[0]
        # reformer scores q·normalize(k)·D^-1/2; feeding q·sqrt(D) gives ours q·k/|k|
        qk = (q * D ** 0.5).reshape(B * H, N, D)
        out = attn(qk, v.reshape(B * H, N, Dv))[0]
        return out.reshape(B, H, N, Dv)

    return fn


# ------------------------------------------------------------------ performer-pytorch


def _performer(opts, N, H, D, Dv, causal, seed):
    from performer_pytorch import FastAttention

    _need(opts.get("kernel", "softmax") == "softmax", "performer-pytorch matches only kernel='softmax'")
    attn = FastAttention(dim_heads=D, nb_features=opts.get("n_features", 256), causal=causal)
    attn.eval()
    return lambda q, k, v: attn(q, k, v)


# ------------------------------------------------------------------ local-attention


def _local(opts, N, H, D, Dv, causal, seed):
    from local_attention import LocalAttention

    w = opts.get("window", 128)
    _need(not opts.get("global_tokens"), "local-attention has no global tokens")
    _need(opts.get("dilation", 1) == 1, "local-attention has no dilation")
    attn = LocalAttention(window_size=w, causal=causal, look_backward=1, look_forward=0 if causal else 1,
                          dropout=0.0, autopad=True, exact_windowsize=True)
    attn.eval()
    return lambda q, k, v: attn(q, k, v)


# ------------------------------------------------------------------ linformer


def _linformer(opts, N, H, D, Dv, causal, seed):
    from linformer import LinformerSelfAttention

    _need(not causal, "linformer cannot be causal")
    _need(Dv == D, "linformer-pytorch needs Dv == D")
    kk = opts.get("k", 256)
    layer = LinformerSelfAttention(dim=H * D, seq_len=opts.get("max_len", N), k=kk, heads=H,
                                   share_kv=opts.get("share_kv", False))
    layer.eval()
    stash = {n: _Stash() for n in ("q", "k", "v")}
    layer.to_q, layer.to_k, layer.to_v, layer.to_out = stash["q"], stash["k"], stash["v"], nn.Identity()

    def fn(q, k, v):
        for n, t in (("q", q), ("k", k), ("v", v)):
            stash[n].value = _merge_heads(t)
        return _split_heads(layer(stash["q"].value), H)

    return fn


# ------------------------------------------------------------------ nystrom-attention


def _nystrom(opts, N, H, D, Dv, causal, seed):
    from nystrom_attention import NystromAttention

    _need(not causal, "Nystrom attention cannot be causal")
    _need(Dv == D, "nystrom-attention needs Dv == D")
    m = opts.get("n_landmarks", 64)
    _need(N % m == 0, f"nystrom-attention pads the front when N is not a multiple of landmarks={m}")
    layer = NystromAttention(dim=H * D, dim_head=D, heads=H, num_landmarks=m,
                             pinv_iterations=opts.get("pinv_iters", 6), residual=False)
    layer.eval()
    stash = _Stash()
    layer.to_qkv, layer.to_out = stash, nn.Identity()

    def fn(q, k, v):
        stash.value = torch.cat([_merge_heads(q), _merge_heads(k), _merge_heads(v)], dim=-1)
        return _split_heads(layer(_merge_heads(q)), H)

    return fn


# ------------------------------------------------------------------ linear-attention-transformer


def _efficient(opts, N, H, D, Dv, causal, seed):
    from linear_attention_transformer.linear_attention_transformer import linear_attn

    _need(not causal, "matched to our non-causal 'efficient' attention")
    return lambda q, k, v: linear_attn(q, k, v)


# ------------------------------------------------------------------ transformers (HF)


def _hf_longformer(opts, N, H, D, Dv, causal, seed):
    from transformers import LongformerConfig
    from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

    _need(not causal, "Longformer's self-attention layer is bidirectional")
    _need(Dv == D, "Longformer needs Dv == D")
    _need(not opts.get("global_tokens") and opts.get("dilation", 1) == 1,
          "matched only without global tokens or dilation")
    w = opts.get("window", 128)
    _need(N % (2 * w) == 0, f"HF Longformer needs N divisible by attention_window={2 * w}")
    cfg = LongformerConfig(hidden_size=H * D, num_attention_heads=H, attention_window=[2 * w],
                           attention_probs_dropout_prob=0.0)
    layer = LongformerSelfAttention(cfg, layer_id=0).eval()
    stash = {n: _Stash() for n in ("q", "k", "v")}
    layer.query, layer.key, layer.value = stash["q"], stash["k"], stash["v"]

    def fn(q, k, v):
        B = q.shape[0]
        for n, t in (("q", q), ("k", k), ("v", v)):
            stash[n].value = _merge_heads(t).transpose(0, 1)  # the layer works seq-first
        mask = torch.zeros(B, N, dtype=q.dtype, device=q.device)
        none = torch.zeros(B, N, dtype=torch.bool, device=q.device)
        out = layer(_merge_heads(q), attention_mask=mask, is_index_masked=none,
                    is_index_global_attn=none, is_global_attn=False)[0]
        return _split_heads(out, H)

    return fn


def _hf_bigbird(opts, N, H, D, Dv, causal, seed):
    from transformers import BigBirdConfig
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention, BigBirdModel

    _need(not causal, "BigBird's block-sparse layer is bidirectional")
    _need(Dv == D, "BigBird needs Dv == D")
    b = opts.get("block_size", 64)
    r = opts.get("n_random_blocks", 3)
    _need(N % b == 0 and N // b > 5 + 2 * r,
          f"HF BigBird block-sparse needs N a multiple of block_size={b} and N/block > {5 + 2 * r}")
    cfg = BigBirdConfig(hidden_size=H * D, num_attention_heads=H, block_size=b, num_random_blocks=r,
                        attention_type="block_sparse", use_bias=False)
    layer = BigBirdBlockSparseAttention(cfg, seed=seed).eval()
    stash = {n: _Stash() for n in ("q", "k", "v")}
    layer.query, layer.key, layer.value = stash["q"], stash["k"], stash["v"]

    def fn(q, k, v):
        B = q.shape[0]
        for n, t in (("q", q), ("k", k), ("v", v)):
            stash[n].value = _merge_heads(t)
        am = torch.ones(B, N, dtype=q.dtype, device=q.device)
        blocked, band, from_m, to_m = BigBirdModel.create_masks_for_block_sparse_attn(am, b)
        out = layer(_merge_heads(q), band_mask=band, from_mask=from_m, to_mask=to_m,
                    from_blocked_mask=blocked, to_blocked_mask=blocked)[0]
        return _split_heads(out, H)

    return fn


PEERS = {
    "reformer-pytorch": Peer(
        "reformer-pytorch", "reformer_pytorch", "lsh", _reformer,
        "LSHAttention with bucket_size = our chunk_len and the same n_hashes, shared-QK, self "
        "excluded; q is multiplied by sqrt(D) so its q·normalize(k)·D^-1/2 score equals ours "
        "(q·k/|k|). Differences: its own random rotations (different buckets from ours for the "
        "same seed), n_buckets = N/bucket_size, attends to the previous chunk only (as ours), "
        "and it needs N divisible by 2·bucket_size."),
    "performer-pytorch": Peer(
        "performer-pytorch", "performer_pytorch", "performer", _performer,
        "FastAttention (FAVOR+, softmax kernel, orthogonal features) with nb_features = our "
        "n_features. Differences: its own random projection draw; causal uses its pure-PyTorch "
        "prefix sum (no CUDA extension); it adds eps = 1e-4 to every feature after subtracting "
        "the global key maximum, so when the features are small (large |q|, |k|) the eps term "
        "dominates and its output tends to the mean of v: a low error on flat attention (i.i.d. "
        "Gaussian inputs: 0.79 vs mean-of-v 0.79, measured at N=1024, D=64, 256 features) is "
        "that bias, not a better estimate; ours is the unbiased FAVOR+ estimator."),
    "local-attention": Peer(
        "local-attention", "local_attention", "longformer", _local,
        "LocalAttention with window_size = our window, look_backward=1, look_forward=1 (0 if "
        "causal), exact_windowsize=True: each query sees keys within ±window, as our longformer "
        "without global tokens or dilation. Difference: it computes whole bucket pairs (3·window "
        "keys per query) and masks, so it does more work than the exact band."),
    "linformer": Peer(
        "linformer", "linformer", "linformer", _linformer,
        "LinformerSelfAttention with the same k (projected length) and seq_len = N, its Q/K/V/out "
        "projections replaced by our q, k, v (identity output). Difference: its E/F are its own "
        "random init (both methods' E/F are untrained here)."),
    "nystrom-attention": Peer(
        "nystrom-attention", "nystrom_attention", "nystrom", _nystrom,
        "NystromAttention with num_landmarks = our n_landmarks, the same pinv iterations, no "
        "residual conv, its QKV/out projections replaced by our q, k, v. Needs N divisible by "
        "the landmark count (else it pads the front)."),
    "linear-attention-transformer": Peer(
        "linear-attention-transformer", "linear_attention_transformer", "efficient", _efficient,
        "its linear_attn (softmax of q over features, of k over positions: Shen et al.'s "
        "efficient attention), matched to our 'efficient'. No options to match."),
    "transformers-longformer": Peer(
        "transformers", "transformers", "longformer", _hf_longformer,
        "transformers' LongformerSelfAttention with attention_window = 2·our window (its window "
        "is two-sided), no global tokens, projections replaced by our q, k, v. Needs N divisible "
        "by attention_window."),
    "transformers-bigbird": Peer(
        "transformers", "transformers", "bigbird", _hf_bigbird,
        "transformers' BigBirdBlockSparseAttention (ITC) with the same block_size and "
        "num_random_blocks, projections replaced by our q, k, v. Differences: it always uses 2 "
        "global blocks (first and last) and a 3-block window; its random blocks come from numpy "
        "with its own seed."),
}


def peer_available(name: str) -> tuple:
    """``(True, "")`` if the peer's package imports, else ``(False, reason)``."""
    p = PEERS[name]
    try:
        importlib.import_module(p.module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
        return False, f"{type(e).__name__}: {e}"[:200]
    return True, ""


def build_peer(target, *, N: int, heads: int, dim: int, dim_v: int, causal: bool, seed: int,
               device: str, dtype: torch.dtype) -> Callable:
    """``fn(q, k, v) -> out`` (shapes ``[B,H,N,D]`` -> ``[B,H,N,Dv]``) for peer ``target.name``."""
    p = PEERS[target.name]
    torch.manual_seed(seed)
    fn = p.build(target.resolved_options(N), N, heads, dim, dim_v, causal, seed)
    mods = [c for c in getattr(fn, "__closure__", None) or [] if isinstance(c.cell_contents, nn.Module)]
    for c in mods:
        c.cell_contents.to(device=device, dtype=dtype)
    return fn
