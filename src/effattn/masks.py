"""Masking shared by every method: which (query, key) pairs may interact.

Masks are decided by *original* positions, so methods that permute tokens (LSH's
sort) or gather blocks (the block-sparse engine) still mask the right pairs:

- ``causal``: query at position i may see key at position j only if j <= i;
- padding: a key whose ``padding_mask`` entry is False is never attended;
- shared-QK self-exclusion (Trax's ``exclude_self``): the pair (i, i) gets a score
  penalty of :data:`SELF_PENALTY`, so a token attends to itself only when it has no
  other allowed key;
- an optional extra rule ``pair_mask(q_pos, k_pos) -> bool`` (True = allowed) for
  sparse patterns.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

#: score penalty on a token's own key under shared-QK (Trax 1.3.4 uses 1e5)
SELF_PENALTY = 1e5

PairMask = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def elementwise(rule: PairMask) -> PairMask:
    """Mark a ``pair_mask`` rule as a pure elementwise function of ``(q_pos, k_pos)``: it
    broadcasts over any shapes, 0-d tensors included, and does not depend on the batch or
    head a position belongs to.  Such rules can also run inside FlexAttention's
    ``mask_mod`` (which passes 0-d positions); unmarked rules keep the engine's own path.
    Returns ``rule`` itself."""
    rule.elementwise = True
    return rule


def is_elementwise(rule: Optional[PairMask]) -> bool:
    """True for no rule or a rule marked with :func:`elementwise`."""
    return rule is None or bool(getattr(rule, "elementwise", False))


def relative(rule: PairMask, key=None) -> PairMask:
    """Mark a ``pair_mask`` rule as a function of ``q_pos - k_pos`` alone (the same answer
    for positions shifted alike: sliding windows, strides, "not the diagonal"); implies
    :func:`elementwise`.  The engine then evaluates such a rule once per tile instead of
    once per query group (:func:`shared_tile_bias`).  ``key``: optional hashable naming the
    rule's meaning (equal keys = equal answers, e.g. ``("band", 256)``): rules rebuilt as
    new functions on every call with the same key share the tile biases the engine keeps
    between calls (:func:`rule_key`).  Returns ``rule`` itself."""
    rule.relative = True
    rule.cache_key = key
    return elementwise(rule)


def distance_rule(max_distance: Optional[int] = None, dilation: int = 1,
                  off_diagonal: bool = False) -> PairMask:
    """The relative rule allowing a pair ``(i, j)`` where ``|i - j| <= max_distance``
    (``None``: any distance), ``dilation`` divides ``i - j`` and, with ``off_diagonal``,
    ``i != j``: sliding windows (dilated or not), Sparse Transformer's near and
    off-diagonal rules.  Marked :func:`relative` with a key naming it, and carrying
    ``rule.distance = (max_distance or -1, dilation, off_diagonal)``, from which the native
    engine kernels (:mod:`effattn.native`) apply it without calling it."""
    if max_distance is not None and max_distance < 0:
        raise ValueError(f"max_distance: expected >= 0 or None, got {max_distance}")
    if dilation < 1:
        raise ValueError(f"dilation: expected >= 1, got {dilation}")

    def rule(a, b):
        d = a - b
        ok = d == d  # every pair (positions are integers)
        if max_distance is not None:
            ok = ok & (d.abs() <= max_distance)
        if dilation > 1:
            ok = ok & (d % dilation == 0)
        if off_diagonal:
            ok = ok & (d != 0)
        return ok

    rule.distance = (-1 if max_distance is None else int(max_distance), int(dilation),
                     bool(off_diagonal))
    return relative(rule, key=("distance",) + rule.distance)


def rule_key(rule: Optional[PairMask]):
    """The hashable that stands for ``rule`` in caches of its results: ``()`` for no rule,
    ``("rule", key)`` for a rule marked with a ``key`` (:func:`relative`), ``None`` (not
    cacheable) for any other."""
    if rule is None:
        return ()
    key = getattr(rule, "cache_key", None)
    return None if key is None else ("rule", key)


def is_relative(rule: Optional[PairMask]) -> bool:
    """True for no rule or a rule marked with :func:`relative`."""
    return rule is None or bool(getattr(rule, "relative", False))


def self_pairs(q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """1 where a query meets its own key (same original position), else 0, in ``dtype``
    (broadcast of ``q_pos`` and ``k_pos``); times :data:`SELF_PENALTY` it is the
    shared-QK self-exclusion penalty."""
    return (q_pos == k_pos).to(dtype)


def allowed_pairs(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    k_valid: Optional[torch.Tensor] = None,
    pair_mask: Optional[PairMask] = None,
) -> Optional[torch.Tensor]:
    """Bool mask, True where query ``q_pos[..., i, None]`` may see key ``k_pos[..., None, j]``.

    ``q_pos [..., Lq, 1]`` and ``k_pos [..., 1, Lk]`` are integer positions; ``k_valid``
    (bool, broadcastable to ``[..., 1, Lk]``) marks real keys.  Returns a tensor
    broadcastable to ``[..., Lq, Lk]``, or ``None`` when every pair is allowed.
    """
    mask = None
    if causal:
        mask = k_pos <= q_pos
    if k_valid is not None:
        mask = k_valid if mask is None else mask & k_valid
    if pair_mask is not None:
        extra = pair_mask(q_pos, k_pos)
        mask = extra if mask is None else mask & extra
    return mask


def apply_masks(
    scores: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    causal: bool,
    exclude_self: bool,
    k_valid: Optional[torch.Tensor] = None,
    pair_mask: Optional[PairMask] = None,
    inplace: bool = False,
    penalty: float = SELF_PENALTY,
) -> torch.Tensor:
    """Scores ``[..., Lq, Lk]`` with disallowed pairs at ``-inf`` and, for shared-QK,
    the self pair lowered by ``penalty`` (:data:`SELF_PENALTY`; ``SELF_PENALTY * log2 e``
    for scores in base-2 units).  Positions as in :func:`allowed_pairs`.
    ``inplace=True`` overwrites ``scores`` (which must already have the full shape).
    """
    if exclude_self:
        same = self_pairs(q_pos, k_pos, scores.dtype)
        scores = scores.sub_(same, alpha=penalty) if inplace else scores - penalty * same
    mask = allowed_pairs(q_pos, k_pos, causal=causal, k_valid=k_valid, pair_mask=pair_mask)
    if mask is not None:
        scores = scores.masked_fill_(~mask, float("-inf")) if inplace else scores.masked_fill(~mask, float("-inf"))
    return scores


def shared_tile_bias(q_pos: torch.Tensor, k_pos: torch.Tensor, *, causal: bool,
                     exclude_self: bool, k_valid: Optional[torch.Tensor] = None,
                     pair_mask: Optional[PairMask] = None, dtype=torch.float32,
                     penalty: float = SELF_PENALTY):
    """The masks of a whole tile as one additive bias ``[Lq, Lk]`` (0 allowed, ``-inf``
    masked, ``-penalty`` on self pairs: :func:`apply_masks`) when every query group of the
    tile sees the same pattern, else None.

    ``q_pos [1, 1, G, Lq, 1]`` or ``[1, 1, Lq, 1]``, ``k_pos [1, 1, G, 1, Lk]`` or ``[1,
    1, 1, Lk]`` (positions shared by every batch and head).  The pattern is shared when
    ``pair_mask`` is :func:`relative` (or None), ``k_valid`` (broadcastable to ``k_pos``)
    is None or all True, and every group's query and key positions are group 0's shifted
    by one amount: then ``q - k`` — all the rules read — is the same in every group.
    Adding the bias is one pass where the per-group masks (rule, negation, fill) are
    several over the whole tile (262,144 scores: 20 vs 210 us)."""
    if not is_relative(pair_mask) or q_pos.shape[:2] != (1, 1) or k_pos.shape[:2] != (1, 1):
        return None
    if k_valid is not None and not bool(k_valid.all()):
        return None
    qp = q_pos.reshape(-1, q_pos.shape[-2])  # [G, Lq]
    kp = k_pos.reshape(-1, k_pos.shape[-1])  # [G, Lk]
    if qp.shape[0] != kp.shape[0]:
        return None
    if qp.shape[0] > 1:
        shift = qp[:, :1] - qp[:1, :1]  # [G, 1]
        if not (torch.equal(qp - shift, qp[:1].expand_as(qp))
                and torch.equal(kp - shift, kp[:1].expand_as(kp))):
            return None
    bias = torch.zeros(qp.shape[1], kp.shape[1], dtype=dtype, device=q_pos.device)
    return apply_masks(bias, qp[0, :, None], kp[:1], causal=causal, exclude_self=exclude_self,
                       pair_mask=pair_mask, inplace=True, penalty=penalty)


def key_valid(padding_mask: Optional[torch.Tensor], n_keys: int, n_padded: int,
              device: torch.device) -> Optional[torch.Tensor]:
    """Validity of ``n_padded`` key slots as bool ``[B or 1, 1, n_padded]``: the user's
    ``padding_mask [B, n_keys]`` extended with False for the slots a method added to reach
    a block multiple.  ``None`` when every slot is a real key.
    """
    if padding_mask is None and n_padded == n_keys:
        return None
    if padding_mask is None:
        valid = torch.ones(1, n_keys, dtype=torch.bool, device=device)
    else:
        valid = padding_mask
    if n_padded > n_keys:
        valid = torch.nn.functional.pad(valid, (0, n_padded - n_keys), value=False)
    return valid[:, None, :]


def dense_bool_mask(
    n_q: int,
    n_k: int,
    *,
    causal: bool,
    padding_mask: Optional[torch.Tensor],
    device: torch.device,
) -> Optional[torch.Tensor]:
    """The full ``[B or 1, 1, Nq, Nk]`` bool mask (True = allowed) for dense methods, or
    ``None`` when nothing is masked.  Causal alignment is top-left (key j <= query i).
    """
    q_pos = torch.arange(n_q, device=device)[:, None]
    k_pos = torch.arange(n_k, device=device)[None, :]
    kv = None if padding_mask is None else padding_mask[:, None, None, :]
    mask = allowed_pairs(q_pos, k_pos, causal=causal, k_valid=None)
    if mask is not None:
        mask = mask[None, None]
    if kv is not None:
        mask = kv if mask is None else mask & kv
    return mask


def query_has_keys(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """For a bool mask ``[..., Nq, Nk]``: True for queries with at least one allowed key."""
    return None if mask is None else mask.any(-1)
