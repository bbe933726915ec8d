"""effattn methods as HuggingFace ``transformers`` attention implementations.

>>> from effattn.integrations.transformers import register
>>> register(options={"lsh": {"n_hashes": 4, "chunk_len": 32}})   # every method, once
>>> model = AutoModel.from_pretrained(path, attn_implementation="effattn_lsh")
>>> model.set_attn_implementation("effattn_full")                  # or switch later

:func:`register` adds every registered effattn method ``<name>`` to
``transformers.AttentionInterface`` as ``effattn_<name>`` and registers transformers'
``sdpa`` mask builder for it in ``AttentionMaskInterface`` (without a mask builder,
transformers passes *no* mask to a custom implementation: causal and padding masks
would be silently lost).  The attention function:

- takes ``query [B, H, Nq, D]``, ``key``/``value [B, Hkv, Nk, D]`` (GQA: key/value
  heads are repeated to ``H``), the model's ``scaling`` and ``is_causal``, and returns
  ``(out [B, Nq, H, Dv], None)`` (no attention weights);
- reads the 4-D mask (:mod:`effattn.integrations.hf_mask`) as a key padding mask plus
  causal alignment, and raises ``ValueError`` for masks a method cannot honour (sliding
  windows, custom patterns, additive biases; only ``naive`` takes any boolean mask);
- decoding with a KV cache (``Nq < Nk``, transformers' bottom-right causal alignment):
  exact methods attend each new query to every visible key directly; approximate
  methods get the queries at their true positions (zero queries fill the positions
  before them, whose outputs are dropped), so a window/block pattern around the new
  token is the one a full forward pass would use;
- attention dropout is not supported: ``dropout > 0`` (a model in training mode with
  ``attention_probs_dropout_prob`` / ``attention_dropout`` > 0) raises ``ValueError``.

Methods with learned parameters (``linformer``, ``bigbird_etc``) get one module per
attention layer, created on the layer's first call and stored on it as the submodule
``effattn_<name>`` (so it moves with ``.to()`` and is saved in ``state_dict``).  Its
parameters start random: these methods need fine-tuning — run one forward pass before
building the optimizer so the parameters exist.  Linformer's ``max_len`` defaults to
the model's ``max_position_embeddings``.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from effattn import api
from effattn.integrations.hf_mask import MaskLayout, UnsupportedMask, bool_mask, read_mask
from effattn.softmax import softmax_lse, stat_dtype

__all__ = ["register", "attention_function", "implementation_name", "observe", "run_layout",
           "PREFIX"]

#: prefix of the implementation names effattn registers in transformers
PREFIX = "effattn_"

#: transformers keyword arguments that change the attention and that no effattn method honours
_UNSUPPORTED_KWARGS = {
    "position_bias": "an additive position bias (T5-style)",
    "softcap": "logit soft-capping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "sliding_window": "a sliding window",
}

_OBSERVERS: list[Callable[..., None]] = []


def _transformers():
    try:
        import transformers  # noqa: F401
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "effattn.integrations.transformers needs HuggingFace transformers with "
            "AttentionInterface and AttentionMaskInterface (>= 4.53): pip install 'effattn[hf]'") from e
    return AttentionInterface, AttentionMaskInterface, sdpa_mask


def implementation_name(method: str) -> str:
    """The transformers ``attn_implementation`` name of effattn method ``method``."""
    return PREFIX + method


@contextlib.contextmanager
def observe(callback: Callable[..., None]) -> Iterator[None]:
    """Call ``callback(module=, method=, query=, key=, value=, out=, layout=, scale=)`` after
    every effattn attention call inside the ``with`` block.

    ``query [B, H, Nq, D]``, ``key``/``value [B, H, Nk, ·]`` (GQA heads already repeated),
    ``out [B, H, Nq, Dv]``, ``layout`` the :class:`~effattn.integrations.hf_mask.MaskLayout`
    (``None`` when ``naive`` honoured an arbitrary boolean mask).
    Used by ``effattn bench quality`` to measure per-layer errors.
    """
    _OBSERVERS.append(callback)
    try:
        yield
    finally:
        _OBSERVERS.remove(callback)


def _repeat_kv(x: torch.Tensor, n_heads: int, name: str) -> torch.Tensor:
    """``[B, Hkv, N, D] -> [B, H, N, D]``: key/value head ``h // (H / Hkv)`` for query head ``h``."""
    hkv = x.shape[1]
    if hkv == n_heads:
        return x
    if n_heads % hkv:
        raise ValueError(f"{name}: {hkv} key/value heads do not divide {n_heads} query heads")
    return x.repeat_interleave(n_heads // hkv, dim=1)


class _LayoutCache:
    """The last mask read, keyed by the mask tensor's identity (every layer gets the same one)."""

    def __init__(self) -> None:
        self._ref: Optional[weakref.ref] = None
        self._key: tuple = ()
        self._layout: Optional[MaskLayout] = None

    def read(self, mask, batch, n_q, n_k, causal_hint) -> MaskLayout:
        key = (batch, n_q, n_k, causal_hint)
        if mask is not None and self._ref is not None and self._ref() is mask and self._key == key:
            return self._layout
        layout = read_mask(mask, batch=batch, n_q=n_q, n_k=n_k, causal_hint=causal_hint)
        if mask is not None:
            self._ref, self._key, self._layout = weakref.ref(mask), key, layout
        return layout


def run_layout(attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               layout: MaskLayout, *, exact: bool) -> torch.Tensor:
    """Attention of ``q [B, H, Nq, D]`` over ``k``/``v [B, H, Nk, ·]`` as ``layout`` asks.

    ``attend(q, k, v, causal=, padding_mask=)`` is an effattn method (top-left causal).
    Keys past ``layout.n_keys`` are dropped.  Causal with ``q_offset != 0``: an ``exact``
    method whose queries all see every key runs non-causal; otherwise queries and keys
    are placed at their absolute positions in one square causal problem (zero queries
    and masked keys fill the gaps) and the last ``Nq`` outputs are kept.
    Returns ``out [B, H, Nq, Dv]``.
    """
    k, v = k[:, :, :layout.n_keys], v[:, :, :layout.n_keys]
    pad = layout.padding_mask
    n_q, n_k = q.shape[2], k.shape[2]
    if not layout.causal or (exact and layout.sees_every_key()):
        return attend(q, k, v, causal=False, padding_mask=pad)
    o = layout.q_offset
    if o == 0 and n_q == n_k:
        return attend(q, k, v, causal=True, padding_mask=pad)
    front_q, front_k = max(o, 0), max(-o, 0)  # gap fillers before the queries / keys
    size = n_q + front_q
    back_k = size - front_k - n_k
    real = pad if pad is not None else torch.ones(q.shape[0], n_k, dtype=torch.bool, device=q.device)
    real = F.pad(real, (front_k, back_k), value=False)
    qs = F.pad(q, (0, 0, front_q, 0))
    ks = F.pad(k, (0, 0, front_k, back_k))
    vs = F.pad(v, (0, 0, front_k, back_k))
    out = attend(qs, ks, vs, causal=True, padding_mask=real)
    return out[:, :, front_q:]


def _dense_masked(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Exact attention under an arbitrary bool mask ``[B, 1|H, Nq, Nk]`` (method ``naive``).

    Rows with no allowed key output zeros.  Returns ``[B, H, Nq, Dv]`` in ``q.dtype``.
    """
    cdt = stat_dtype(q.dtype)
    s = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    probs, _ = softmax_lse(s.masked_fill(~mask, float("-inf")))
    return torch.matmul(probs, v.to(cdt)).to(q.dtype)


def _learned_module(module: torch.nn.Module, impl: str, method: str, options: dict,
                    device: torch.device) -> torch.nn.Module:
    """The learned-parameter method module of attention layer ``module`` (created once)."""
    inst = getattr(module, impl, None)
    if inst is None:
        opts = dict(options)
        cfg = getattr(module, "config", None)
        if method == "linformer" and "max_len" not in opts and cfg is not None:
            mpe = getattr(cfg, "max_position_embeddings", None)
            if isinstance(mpe, int) and mpe > 0:
                opts["max_len"] = mpe
        inst = api.get(method, **opts).to(device)
        module.add_module(impl, inst)
    return inst


def attention_function(method: str, *, name: Optional[str] = None, **options: Any) -> Callable:
    """The transformers attention function running effattn method ``method`` with ``options``.

    Signature ``(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
    is_causal=None, **kwargs) -> (out [B, Nq, H, Dv], None)`` with ``query [B, H, Nq, D]``,
    ``key``/``value [B, Hkv, Nk, ·]``.  ``name`` (default ``effattn_<method>``) is the
    attribute under which learned-parameter methods are stored on each attention layer.
    Unknown options raise ``TypeError`` here, not at the first forward pass.
    """
    s = api.spec(method)
    impl = name or implementation_name(method)
    if s.module is not None:
        api.get(method, **options)  # validates the options now
    else:
        api.check_options(s, options)
    layouts = _LayoutCache()

    def effattn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          is_causal=None, **kwargs):
        for arg, what in _UNSUPPORTED_KWARGS.items():
            if kwargs.get(arg) is not None:
                raise ValueError(f"{arg}: {impl} cannot apply {what}; use attn_implementation="
                                 "'sdpa' or 'eager' for this model")
        if kwargs.get("cache") is not None and type(kwargs["cache"]).__name__ == "PagedAttentionCache":
            raise ValueError(f"cache: {impl} does not support paged (continuous-batching) caches")
        if dropout:
            raise ValueError(
                f"dropout: {impl} has no attention dropout (got p={dropout}); call model.eval() "
                "or set the config's attention dropout (attention_probs_dropout_prob / "
                "attention_dropout) to 0 to train with it")
        B, H, n_q, _ = query.shape
        key = _repeat_kv(key, H, "key")
        value = _repeat_kv(value, H, "value")
        n_k = key.shape[2]
        hint = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        scale = scaling if scaling is None else float(scaling)
        try:
            layout = layouts.read(attention_mask, B, n_q, n_k, bool(hint))
        except UnsupportedMask:
            if method != "naive":
                raise
            mask = bool_mask(attention_mask, B, n_q, n_k)
            out = _dense_masked(query, key, value, mask, scale or query.shape[-1] ** -0.5)
            layout = None
        else:
            if s.module is not None:
                attend_mod = _learned_module(module, impl, method, options, query.device)

                def attend(q, k, v, *, causal, padding_mask):
                    return attend_mod(q, k, v, causal=causal, padding_mask=padding_mask, scale=scale)
            else:
                def attend(q, k, v, *, causal, padding_mask):
                    return api.attention(q, k, v, method, causal=causal, padding_mask=padding_mask,
                                         scale=scale, **options)
            out = run_layout(attend, query, key, value, layout, exact=s.exact)
        for cb in list(_OBSERVERS):
            cb(module=module, method=method, query=query, key=key, value=value, out=out,
               layout=layout, scale=scale)
        return out.transpose(1, 2).contiguous(), None

    effattn_attention.__name__ = f"{impl}_attention"
    effattn_attention.__qualname__ = effattn_attention.__name__
    effattn_attention.__doc__ = f"transformers attention function: effattn method {method!r}."
    return effattn_attention


def register(methods: Optional[list] = None, *, options: Optional[dict] = None,
             prefix: str = PREFIX) -> list:
    """Register effattn methods in transformers; returns the implementation names.

    ``methods``: method names (default: every registered method); each becomes
    ``<prefix><name>`` in ``transformers.AttentionInterface``, with transformers' sdpa
    mask builder in ``AttentionMaskInterface`` so causal and padding masks reach it.
    ``options``: ``{method: {option: value}}`` (e.g. ``{"lsh": {"n_hashes": 8}}``);
    methods not named there use effattn's defaults.  Calling again re-registers (a
    learned-parameter module already created on a layer keeps its options).
    """
    AttentionInterface, AttentionMaskInterface, sdpa_mask = _transformers()
    known = [m["name"] for m in api.methods()]
    chosen = list(known if methods is None else methods)
    options = dict(options or {})
    for m in list(chosen) + list(options):
        if m not in known:
            raise ValueError(f"methods: unknown effattn method {m!r}; choose from {known}")
    missing = [m for m in options if m not in chosen]
    if missing:
        raise ValueError(f"options: given for methods {missing} that are not being registered")
    names = []
    for m in chosen:
        impl = prefix + m
        AttentionInterface.register(impl, attention_function(m, name=impl, **options.get(m, {})))
        AttentionMaskInterface.register(impl, sdpa_mask)
        names.append(impl)
    return names
