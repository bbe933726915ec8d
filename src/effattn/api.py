"""The attention contract: one entry point, a registry of methods, argument checks.

Every mechanism module under :mod:`effattn.mechanisms` registers its methods with
:func:`register`.  :func:`attention` validates the arguments once, here, so that no
mechanism needs its own copy of shape, dtype, device or option checks.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from typing import Any, Callable, Optional

import torch
from torch import nn

from effattn.precision import low_precision_pays

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: options every method accepts without declaring them
COMMON_OPTIONS = ("causal", "padding_mask", "scale", "return_lse")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """Everything the library knows about one attention method.

    ``fn(q, k, v, *, causal, padding_mask, scale, return_lse, shared_qk, **options)``
    receives validated tensors (``k`` already built for shared-QK) and returns
    ``(out, lse_or_None)``.  ``flops(B, H, Nq, Nk, D, Dv, causal, **options)`` counts the
    multiply-adds x 2 of the forward pass as this implementation performs it.
    """

    name: str
    fn: Callable[..., Any]
    exact: bool
    causal: bool
    time: str
    memory: str
    flops: Callable[..., float]
    flops_formula: str
    options: dict
    family: str
    description: str
    shared_qk: bool = True
    lse: bool = True
    random: bool = False
    module: Optional[type] = None
    causal_error: str = ""
    #: ``(option, method)``: :func:`get` with ``option`` set builds the learned ``method``
    #: instead (``bigbird`` with ``extra_global_tokens=g`` -> ``bigbird_etc``)
    learned_variant: Optional[tuple] = None

    def info(self) -> dict:
        """A plain-dict summary (what :func:`methods` returns)."""
        return {
            "name": self.name,
            "family": self.family,
            "exact": self.exact,
            "causal": self.causal,
            "shared_qk": self.shared_qk,
            "lse": self.lse,
            "random": self.random,
            "learned": self.module is not None,
            "time": self.time,
            "memory": self.memory,
            "flops": self.flops_formula,
            "options": dict(self.options),
            "description": self.description,
        }


_REGISTRY: dict[str, MethodSpec] = {}
_LOADED = False


def register(name: str, **meta: Any) -> Callable[[Callable], Callable]:
    """Decorator registering an attention function under ``name``.

    ``meta`` holds the :class:`MethodSpec` fields other than ``name`` and ``fn``.
    """

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"attention method {name!r} is registered twice")
        _REGISTRY[name] = MethodSpec(name=name, fn=fn, **meta)
        return fn

    return deco


def _load_mechanisms() -> None:
    """Import every module of :mod:`effattn.mechanisms` so that each registers itself."""
    global _LOADED
    if _LOADED:
        return
    from effattn import mechanisms

    for mod in sorted(pkgutil.iter_modules(mechanisms.__path__), key=lambda m: m.name):
        if not mod.name.startswith("_"):
            importlib.import_module(f"effattn.mechanisms.{mod.name}")
    _LOADED = True


def spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``name``; ``ValueError`` listing the choices if unknown."""
    _load_mechanisms()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(
            f"method: unknown attention method {name!r}; choose one of {sorted(_REGISTRY)}"
        )
    return _REGISTRY[name]


def methods() -> list[dict]:
    """Every registered method as a dict: name, family, exact, causal, complexity, FLOPs, options."""
    _load_mechanisms()
    return [_REGISTRY[n].info() for n in sorted(_REGISTRY, key=_sort_key)]


_FAMILY_ORDER = ["exact", "lsh", "sparse", "window", "bigbird", "lowrank", "kernel", "vision"]


def _sort_key(name: str):
    fam = _REGISTRY[name].family
    return (_FAMILY_ORDER.index(fam) if fam in _FAMILY_ORDER else len(_FAMILY_ORDER), name)


class _RMSNormalized(torch.autograd.Function):
    """``x * rsqrt(mean(x²) + eps)`` along the last dim with a one-output backward,
    ``dx = r dk - x r³ <dk, x> / D`` (``r`` the saved ``rsqrt``): autograd through the
    plain expression made four fresh ``[N, D]`` tensors (the product's two gradients, the
    norm's, their sum), 8-14 ms of LSH's 16K training step here."""

    @staticmethod
    def forward(ctx, x, eps):
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        r = ms.add_(eps).rsqrt_()
        ctx.save_for_backward(x, r)
        return x * r

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dk):
        x, r = ctx.saved_tensors
        # einsum runs the row dot products as one bmm; vecdot made an [N, D] product first
        coef = torch.einsum("...d,...d->...", dk, x)[..., None].mul_(r.pow(3)).div_(x.shape[-1])
        return torch.mul(dk, r).addcmul_(x, coef, value=-1.0), None


def shared_qk_keys(q: torch.Tensor, eps: float = 1e-6, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Keys for shared-QK attention: ``q`` RMS-normalized (Trax's ``length_normalized``).

    ``[..., N, D] -> [..., N, D]``; computed in at least float32, returned in ``q.dtype``
    (float32/float64 ``q``: written to ``out`` when given, a tensor like ``q``; not
    differentiable then).  Rows are independent: the keys of some rows of ``q`` are those
    rows of the keys.  With the default scale ``1/sqrt(D)`` a score is ``q_i . q_j / |q_j|``.
    """
    x = q.float() if q.dtype in (torch.float16, torch.bfloat16) else q
    if out is not None and x is q:
        # the norm reduces without an [N, D] temporary of squares (x.pow(2) cost 4x the rest)
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square() / x.shape[-1]
        return torch.mul(x, torch.rsqrt(ms + eps), out=out)
    return _RMSNormalized.apply(x, eps).to(q.dtype)


def check_options(s: MethodSpec, options: dict) -> dict:
    """Reject unknown option names and fill defaults; returns the full option dict."""
    unknown = [o for o in options if o not in s.options]
    if unknown:
        raise TypeError(
            f"method {s.name!r} got unknown option(s) {unknown}; "
            f"its options are {sorted(s.options) or 'none'}"
        )
    out = dict(s.options)
    out.update(options)
    return out


def _check_tensor(name: str, t: Any, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), got {t.dtype}"
        )
    if t.dim() != ndim:
        raise ValueError(
            f"{name}: expected {ndim} dimensions [B, H, N, D], got shape {tuple(t.shape)}"
        )
    return t


def validate(q, k, v, padding_mask, scale, causal) -> float:
    """Check the contract's tensors; returns the scale to use."""
    _check_tensor("q", q, 4)
    _check_tensor("v", v, 4)
    B, H, Nq, D = q.shape
    if Nq == 0 or D == 0:
        raise ValueError(f"q: sequence length and head dim must be positive, got {tuple(q.shape)}")
    if k is not None:
        _check_tensor("k", k, 4)
        if k.dtype != q.dtype:
            raise TypeError(f"k: dtype {k.dtype} differs from q's {q.dtype}")
        if k.device != q.device:
            raise ValueError(f"k: on {k.device}, q on {q.device}; put them on one device")
        if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
            raise ValueError(
                f"k: expected [B={B}, H={H}, Nk, D={D}], got shape {tuple(k.shape)}"
            )
        Nk = k.shape[2]
    else:
        Nk = Nq
    if v.dtype != q.dtype:
        raise TypeError(f"v: dtype {v.dtype} differs from q's {q.dtype}")
    if v.device != q.device:
        raise ValueError(f"v: on {v.device}, q on {q.device}; put them on one device")
    if v.shape[0] != B or v.shape[1] != H or v.shape[2] != Nk:
        raise ValueError(f"v: expected [B={B}, H={H}, Nk={Nk}, Dv], got shape {tuple(v.shape)}")
    if Nk == 0:
        raise ValueError("k: sequence length must be positive")
    if padding_mask is not None:
        if not isinstance(padding_mask, torch.Tensor):
            raise TypeError(f"padding_mask: expected a bool tensor, got {type(padding_mask).__name__}")
        if padding_mask.dtype != torch.bool:
            raise TypeError(f"padding_mask: expected dtype torch.bool (True = real token), got {padding_mask.dtype}")
        if tuple(padding_mask.shape) != (B, Nk):
            raise ValueError(f"padding_mask: expected shape [B={B}, Nk={Nk}], got {tuple(padding_mask.shape)}")
        if padding_mask.device != q.device:
            raise ValueError(f"padding_mask: on {padding_mask.device}, q on {q.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected bool, got {type(causal).__name__}")
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    if not scale > 0 or scale != scale or scale == float("inf"):
        raise ValueError(f"scale: expected a positive finite float, got {scale}")
    return float(scale)


def prepare(s: MethodSpec, q, k, v, *, causal, padding_mask, scale, return_lse):
    """Validate a call of method ``s``; returns ``(k, scale, shared_qk)``.

    Builds the shared-QK keys when ``k is None``.  Learned-parameter modules call this
    from their ``forward`` so they obey the same contract as :func:`attention`.
    """
    scale = validate(q, k, v, padding_mask, scale, causal)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected bool, got {type(return_lse).__name__}")
    if causal and not s.causal:
        raise ValueError(f"causal: method {s.name!r} cannot be causal. {s.causal_error}".strip())
    if return_lse and not s.lse:
        raise ValueError(f"return_lse: method {s.name!r} has no log-sum-exp of softmax scores")
    shared = k is None
    if shared:
        if not s.shared_qk:
            raise ValueError(f"k: method {s.name!r} does not support shared-QK (k=None); pass keys")
        k = shared_qk_keys(q)
    return k, scale, shared


def attention(
    q: torch.Tensor,
    k: Optional[torch.Tensor],
    v: torch.Tensor,
    method: str = "full",
    *,
    causal: bool = False,
    padding_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    return_lse: bool = False,
    **options: Any,
):
    """Attention of ``q`` over ``k``/``v`` with the chosen method.

    Shapes: ``q [B, H, Nq, D]``, ``k [B, H, Nk, D]`` or ``None`` (shared-QK: keys are the
    RMS-normalized queries and a token attends to itself only when nothing else is
    allowed), ``v [B, H, Nk, Dv]``, ``padding_mask`` bool ``[B, Nk]`` (True = real token).
    Returns ``out [B, H, Nq, Dv]`` in ``q.dtype``, and with ``return_lse=True`` also the
    log-sum-exp of each query's scores ``[B, H, Nq]`` (float32, float64 for float64 input;
    ``-inf`` for a query with nothing to attend to, whose output is zero).  bf16 / fp16
    inputs compute in float32 where their matmuls do not pay on the device
    (:mod:`effattn.precision`).
    """
    s = spec(method)
    opts = check_options(s, options)
    if s.module is not None:
        raise ValueError(
            f"method: {s.name!r} has learned parameters; create it with effattn.get({s.name!r}, ...) "
            "and call the module"
        )
    dtype = q.dtype if isinstance(q, torch.Tensor) else None
    if dtype is not None and not low_precision_pays(dtype, q.device):
        # bf16 / fp16 matmuls slower than float32 here: compute on float32 copies
        q, k, v = (None if t is None else t.float() if isinstance(t, torch.Tensor) and
                   t.dtype == dtype else t for t in (q, k, v))
    k, scale, shared = prepare(s, q, k, v, causal=causal, padding_mask=padding_mask,
                               scale=scale, return_lse=return_lse)
    out, lse = s.fn(
        q, k, v, causal=causal, padding_mask=padding_mask, scale=scale,
        return_lse=return_lse, shared_qk=shared, **opts,
    )
    out = out.to(dtype) if dtype is not None else out
    return (out, lse) if return_lse else out


class Attention(nn.Module):
    """A registered method bound to its options, as an ``nn.Module``.

    ``forward(q, k, v, *, causal=False, padding_mask=None, scale=None, return_lse=False)``
    with the shapes of :func:`attention`.
    """

    def __init__(self, method: str, **options: Any):
        super().__init__()
        s = spec(method)
        check_options(s, options)
        self.method = method
        self.options = options

    def forward(self, q, k, v, *, causal=False, padding_mask=None, scale=None, return_lse=False):
        return attention(q, k, v, self.method, causal=causal, padding_mask=padding_mask,
                         scale=scale, return_lse=return_lse, **self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"method={self.method!r}" + (f", {opts}" if opts else "")


def get(name: str, **options: Any) -> nn.Module:
    """The method ``name`` as an ``nn.Module`` (learned-parameter methods build their own)."""
    s = spec(name)
    if s.learned_variant is not None and options.get(s.learned_variant[0]) is not None:
        return get(s.learned_variant[1], **options)
    if s.module is not None:
        sig = inspect.signature(s.module)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            unknown = [o for o in options if o not in sig.parameters]
            if unknown:
                raise TypeError(f"method {name!r} got unknown option(s) {unknown}; "
                                f"its options are {sorted(p for p in sig.parameters)}")
        return s.module(**options)
    return Attention(name, **options)
