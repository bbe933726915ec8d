"""What a benchmark case runs: one of our methods or a peer library, as ``fn(q, k, v) -> out``.

A :class:`Target` is a plain, picklable description (sent to the case subprocess);
:func:`build` turns it into a callable for one sequence length.  A target that cannot
run a case raises :class:`NotApplicable` with the reason (recorded as ``n/a``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch


class NotApplicable(Exception):
    """This target cannot run this case (e.g. a non-causal method with ``causal=True``)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """``kind`` is ``"method"`` (ours) or ``"peer"``; ``name`` is the method or peer name;
    ``ours`` is the method a peer is matched to; ``options`` the method's bench options
    (``"$N"`` not yet resolved); ``shared_qk`` runs ours with ``k=None``."""

    kind: str
    name: str
    ours: str
    options: tuple = ()
    shared_qk: bool = False
    max_len: Optional[int] = None

    @property
    def label(self) -> str:
        """Name shown in tables and plots (peers as ``peer:<package>``)."""
        return self.name if self.kind == "method" else f"peer:{self.name}"

    def resolved_options(self, n: int) -> dict:
        """Options with ``"$N"``/``"$grid"`` resolved for ``n``; :class:`NotApplicable` if impossible."""
        from effattn.bench.config import resolve_option

        try:
            return {k: resolve_option(v, n) for k, v in self.options}
        except ValueError as e:
            raise NotApplicable(str(e)) from None


def method_target(name: str, settings) -> Target:
    """The :class:`Target` of our method ``name`` with its :class:`MethodSettings`."""
    return Target("method", name, name, tuple(sorted(settings.options.items(), key=lambda kv: kv[0])),
                  settings.shared_qk, settings.max_len)


def method_spec_options(name: str, options: dict) -> dict:
    """The method's registered defaults updated with ``options`` (for its FLOP formula)."""
    from effattn import api

    s = api.spec(name)
    out = dict(s.options)
    out.update(options)
    return out


def flops(target: Target, B: int, H: int, N: int, D: int, Dv: int, causal: bool) -> Optional[float]:
    """Forward FLOPs from the registry formula of the (matched) method; ``None`` if it fails."""
    from effattn import api

    try:
        s = api.spec(target.ours)
        opts = method_spec_options(target.ours, target.resolved_options(N))
        f = float(s.flops(B, H, N, N, D, Dv, causal, **opts))
        return f if f > 0 else None
    except Exception:  # a formula that does not accept these options: no FLOP figure
        return None


def check_applicable(target: Target, N: int, causal: bool) -> None:
    """Raise :class:`NotApplicable` for what the registry/config already rule out."""
    from effattn import api

    if target.max_len is not None and N > target.max_len:
        raise NotApplicable(f"N={N} above the configured max_len={target.max_len}")
    if target.kind == "method":
        s = api.spec(target.name)
        if causal and not s.causal:
            raise NotApplicable(f"{target.name} cannot be causal")


def build(target: Target, *, N: int, heads: int, dim: int, dim_v: int, causal: bool,
          seed: int, device: str, dtype: torch.dtype) -> Callable:
    """``fn(q [B,H,N,D], k [B,H,N,D], v [B,H,N,Dv]) -> out [B,H,N,Dv]`` for ``target``.

    ``seed`` seeds random parts (``seed=`` option if the method has one, and torch's
    global RNG before building, for learned-parameter initialisation)."""
    check_applicable(target, N, causal)
    torch.manual_seed(seed)
    if target.kind == "peer":
        from effattn.bench.peers import build_peer

        return build_peer(target, N=N, heads=heads, dim=dim, dim_v=dim_v, causal=causal,
                          seed=seed, device=device, dtype=dtype)
    import effattn
    from effattn import api

    s = api.spec(target.name)
    opts = target.resolved_options(N)
    if s.random and "seed" in s.options:
        opts["seed"] = seed
    if s.module is None:
        unknown = [o for o in opts if o not in s.options]
        if unknown:
            raise NotApplicable(f"config options {unknown} are not options of {target.name}")
    try:
        mod = effattn.get(target.name, **opts).to(device)
    except (TypeError, ValueError) as e:
        raise NotApplicable(f"{type(e).__name__}: {e}") from None
    if any(True for _ in mod.parameters()):
        mod = mod.to(dtype)
    shared = target.shared_qk

    def fn(q, k, v):
        return mod(q, None if shared else k, v, causal=causal)

    return fn
