"""Reading transformers' attention masks as effattn's ``padding_mask`` and ``causal``.

transformers hands an attention function either no mask or a 4-D mask
``[B or 1, 1 or H, Nq, Nk]`` — boolean (True = attend) or additive float (0 = attend,
a very negative number = masked).  effattn methods take a key padding mask
``[B, Nk]`` and a top-left ``causal`` flag instead.  :func:`read_mask` recognises the
masks that have that form and describes them as a :class:`MaskLayout`:

- padding only: ``mask[b, :, i, j] == real[b, j]``;
- causal (with an offset) and padding: ``mask[b, :, i, j] == real[b, j] & (j <= i + q_offset)``
  — ``q_offset`` is the absolute position of query 0 among the keys: 0 for a prompt,
  ``Nk - Nq`` when decoding with a KV cache (transformers' bottom-right alignment), the
  number of cached tokens with a static cache.

Anything else (sliding windows, per-head masks, additive biases, ...) raises
:class:`UnsupportedMask`.  No mask (``None``) follows ``sdpa``'s convention: causal when
the module is causal and ``Nq > 1``, keys cropped to ``Nq`` for a causal prefill into a
longer (static) cache, and a single causal query sees every key.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

__all__ = ["MaskLayout", "UnsupportedMask", "read_mask", "bool_mask", "MASKED_BELOW"]

#: additive-mask entries at or below this count as masked (transformers uses finfo.min)
MASKED_BELOW = -1e4


class UnsupportedMask(ValueError):
    """A mask that is neither padding-only nor causal-with-padding."""


@dataclasses.dataclass(frozen=True)
class MaskLayout:
    """What a transformers mask asks for, in effattn's terms.

    ``padding_mask``: bool ``[B, n_keys]`` (True = real key) or ``None`` (every key real);
    ``causal``: query ``i`` sees key ``j`` only if ``j <= i + q_offset``;
    ``n_keys``: how many leading keys matter (later ones are never visible and are cropped).
    """

    padding_mask: Optional[torch.Tensor]
    causal: bool
    q_offset: int
    n_keys: int

    def sees_every_key(self) -> bool:
        """True when causality hides nothing: every query's window covers all ``n_keys`` keys."""
        return not self.causal or self.q_offset >= self.n_keys - 1


def bool_mask(attention_mask: torch.Tensor, batch: int, n_q: int, n_k: int) -> torch.Tensor:
    """A 4-D transformers mask as bool ``[B, Hm, Nq, Nk]`` (True = attend).

    Accepts bool masks and additive float masks whose entries are 0 (attend) or
    ``<= MASKED_BELOW`` / ``-inf`` (masked); ``ValueError`` for other shapes or values,
    ``TypeError`` for other dtypes.
    """
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask: expected a torch.Tensor or None, got {type(attention_mask).__name__}")
    shape = tuple(attention_mask.shape)
    if (attention_mask.dim() != 4 or shape[0] not in (1, batch) or shape[2] != n_q
            or shape[3] != n_k):
        raise ValueError(
            f"attention_mask: expected a 4-D mask [B={batch} (or 1), 1 (or heads), Nq={n_q}, "
            f"Nk={n_k}] (bool, True = attend; or additive float), got shape {shape}")
    if attention_mask.dtype == torch.bool:
        m = attention_mask
    elif attention_mask.is_floating_point():
        allowed = attention_mask == 0
        masked = attention_mask <= MASKED_BELOW
        if not bool((allowed | masked).all()):
            raise UnsupportedMask(
                "attention_mask: an additive float mask with values other than 0 (attend) and "
                "a large negative number (masked) is an attention bias (ALiBi, relative "
                "positions, ...); effattn methods cannot add a bias to their scores. Use "
                "attn_implementation='sdpa' or 'eager' for this model.")
        m = allowed
    else:
        raise TypeError(
            f"attention_mask: expected a bool or floating mask, got dtype {attention_mask.dtype}")
    return m.expand(batch, -1, -1, -1)


def _causal_offset(m: torch.Tensor) -> Optional[int]:
    """Smallest ``o`` with every allowed key ``j <= i + o`` in ``m [B, Nq, Nk]`` (None: empty)."""
    n_q, n_k = m.shape[-2:]
    j = torch.arange(n_k, device=m.device)
    last = torch.where(m, j, -1).amax(-1)  # [B, Nq] last allowed key per row, -1 if none
    rows = last >= 0
    if not bool(rows.any()):
        return None
    i = torch.arange(n_q, device=m.device)
    return int((last - i)[rows].max())


def _none_layout(n_q: int, n_k: int, causal_hint: bool) -> MaskLayout:
    if not causal_hint:
        return MaskLayout(None, False, 0, n_k)
    if n_q == 1:
        return MaskLayout(None, True, n_k - 1, n_k)
    if n_k < n_q:
        raise UnsupportedMask(
            f"attention_mask: no mask with a causal module, Nq={n_q} queries and only "
            f"Nk={n_k} keys: the causal alignment is ambiguous; pass a 4-D mask")
    # sdpa: is_causal=True (top-left); keys past Nq are empty static-cache slots
    return MaskLayout(None, True, 0, n_q)


def read_mask(attention_mask: Optional[torch.Tensor], *, batch: int, n_q: int, n_k: int,
              causal_hint: bool) -> MaskLayout:
    """Describe ``attention_mask`` (``None`` or 4-D ``[B|1, 1|H, Nq, Nk]``) as a :class:`MaskLayout`.

    ``causal_hint`` is the module's ``is_causal``: with no mask it decides causality (as
    sdpa does); when a mask fits both readings (one query that sees every key) it picks
    the causal one, so approximate methods place a decoding query at its true position.
    Raises :class:`UnsupportedMask` (a ``ValueError``) for masks of any other form.
    """
    if attention_mask is None:
        return _none_layout(n_q, n_k, causal_hint)
    m4 = bool_mask(attention_mask, batch, n_q, n_k)
    m = m4[:, 0]
    if m4.shape[1] > 1 and not bool((m4 == m[:, None]).all()):
        raise UnsupportedMask(
            "attention_mask: the mask differs between heads; effattn methods take one "
            "key padding mask per sequence")
    real = m.any(-2)  # [B, Nk]: keys some query sees
    padding_only = bool((m == real[:, None, :]).all())
    o = _causal_offset(m)
    causal_ok = False
    if o is not None:
        i = torch.arange(n_q, device=m.device)[:, None]
        j = torch.arange(n_k, device=m.device)[None, :]
        causal_ok = bool((m == (real[:, None, :] & (j <= i + o))).all())
    if causal_ok and (causal_hint or not padding_only):
        n_keys = min(n_k, n_q + o)
        real = real[:, :n_keys]
        return MaskLayout(None if bool(real.all()) else real, True, o, n_keys)
    if padding_only:
        return MaskLayout(None if bool(real.all()) else real, False, 0, n_k)
    raise UnsupportedMask(
        f"attention_mask: this [{n_q} x {n_k}] mask is neither padding-only nor causal with "
        "padding (e.g. a sliding window, chunked, packed-sequence or custom mask); effattn "
        "methods honour only key padding and causal masks (method 'naive' honours any "
        "boolean mask). Use attn_implementation='sdpa' or 'eager' for this model.")
