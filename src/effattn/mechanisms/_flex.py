"""FlexAttention dispatch for the block-sparse engine (:mod:`effattn.mechanisms.blocksparse`).

Where ``torch.nn.attention.flex_attention`` serves a call better than the engine's own
tiles, the engine hands the call to it, with the *same* pattern:

- the block layout: the engine's ``kv_blocks`` become a FlexAttention ``BlockMask``
  (``BlockMask.from_kv_blocks``), built once per (layout, full slots, number of key
  blocks, device) and cached (:data:`CACHE_SIZE` entries); slots the caller marks
  ``full_slots`` (every pair allowed) and that hold no padding key skip ``mask_mod``;
- the pair rule: ``mask_mod`` reads the original positions and key validity captured
  from the engine plan and applies :func:`effattn.masks.allowed_pairs` (causal,
  padding, the method's ``pair_mask``); shared-QK self-exclusion is a ``score_mod``
  subtracting :data:`effattn.masks.SELF_PENALTY` (:func:`effattn.masks.self_pairs`).

Rows with no allowed key give zeros, as on the own path.

When it is used (:func:`usable`):

- CPU: inference only: no input requires grad and no log-sum-exp is asked for (compiled
  FlexAttention on CPU has neither a backward nor ``return_lse``);
- CUDA: also training and ``return_lse``;
- the layout lists each key block at most once per row (the own path counts a block
  listed twice twice), the pair rule is marked :func:`effattn.masks.elementwise`, the
  dtype is float32/bfloat16/float16, and the padded ``[n_q_blocks, n_k_blocks]`` index
  table stays below :data:`MAX_TABLE` entries;
- mode (:func:`flex_mode` context manager, else the ``EFFATTN_FLEX`` environment
  variable): ``"off"`` (``0``) never, ``"on"`` (``1``) whenever possible, ``"auto"`` (the
  default) only for calls of at least :data:`MIN_SCORES` score elements, where the
  one-time ``torch.compile`` (seconds) pays off — and on CPU only where it is faster:
  the first such call of a pattern and shape (:func:`race_key`) times one compiled
  FlexAttention call against one (warm) call of the engine's own tiles and keeps the faster
  (:func:`raced`, :func:`record_race`; CPUs differ: on one 2-core AMD VM FlexAttention was
  faster for sliding windows, on a 2-core Intel Xeon the engine, 0.075 vs 0.106 s for
  longformer at N = 16,384).

When ``torch.compile`` reaches dynamo's recompile limit (one compile per shape and
pattern; 8 by default), torch would run FlexAttention eagerly, which materializes the
whole ``NQ x NK`` score matrix.  The dispatch asks dynamo to raise instead, falls back to
the own path for that call and stops dispatching in this process (:func:`exhausted`).
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F

from effattn.masks import SELF_PENALTY, allowed_pairs, is_elementwise, self_pairs
from effattn.mechanisms._layout import content_digest

#: environment variable selecting the mode: 0/off, 1/on, auto (default)
ENV = "EFFATTN_FLEX"
#: "auto": score elements (B·H·rows·keys per row) from which a call goes to FlexAttention
MIN_SCORES = 1 << 22
#: largest padded index table ``Bl·Hl·n_q_blocks·n_k_blocks`` built for a BlockMask
MAX_TABLE = 1 << 26
#: block tables kept in the cache
CACHE_SIZE = 16

_MODES = {"0": "off", "off": "off", "false": "off", "1": "on", "on": "on", "true": "on",
          "auto": "auto", "": "auto"}
_override: Optional[str] = None
_cache: "OrderedDict[tuple, Optional[tuple]]" = OrderedDict()
#: id(kv_blocks) -> (weakref to it, weakref to full | None, versions, nkb, tables): the
#: same layout object seen again (callers that memoize their layouts) skips the digest
_by_identity: "OrderedDict[int, tuple]" = OrderedDict()
_compiled = None
_exhausted = False  # dynamo's recompile limit was hit: no more dispatch in this process
#: "auto" on CPU: race outcomes kept (True: FlexAttention was the faster)
RACE_SIZE = 64
#: the own path wins a race only when it takes under this fraction of FlexAttention's time
#: (a near tie is noise)
RACE_MARGIN = 0.9
#: alternating timed rounds of a race (each side's fastest call counts)
RACE_ROUNDS = 2
_races: "OrderedDict[tuple, tuple]" = OrderedDict()


def available() -> bool:
    """Whether this torch has ``torch.nn.attention.flex_attention`` with ``BlockMask``."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def mode() -> str:
    """The current dispatch mode: ``"off"``, ``"on"`` or ``"auto"``."""
    if _override is not None:
        return _override
    return _MODES.get(os.environ.get(ENV, "auto").strip().lower(), "auto")


@contextlib.contextmanager
def flex_mode(value: str):
    """Run the enclosed code with dispatch mode ``value`` (``"off"``, ``"on"``, ``"auto"``)."""
    global _override
    if value not in ("off", "on", "auto"):
        raise ValueError(f"flex mode: expected 'off', 'on' or 'auto', got {value!r}")
    old, _override = _override, value
    try:
        yield
    finally:
        _override = old


def _compiled_flex():
    """``torch.compile``d ``flex_attention`` (created on first use; compiles per shape)."""
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def _table(blocks: torch.Tensor, keep: torch.Tensor, nkb: int):
    """``(num int32 [..], idx int32 [.., nkb])`` of the ``blocks [.., S]`` where ``keep``:
    each row's kept blocks ascending, then zeros."""
    srt = torch.sort(torch.where(keep, blocks, torch.full_like(blocks, nkb)), dim=-1).values[..., :nkb]
    idx = F.pad(torch.where(srt < nkb, srt, torch.zeros_like(srt)), (0, nkb - srt.shape[-1]))
    return keep.sum(-1).to(torch.int32), idx.to(torch.int32).contiguous()


def block_tables(kv_blocks: torch.Tensor, nkb: int, full: Optional[torch.Tensor] = None):
    """FlexAttention block tables of an engine layout, cached per (layout, full slots,
    ``nkb``, device).

    The same ``kv_blocks`` object (unchanged since) with the same ``full`` object is
    answered without reading them; any other is keyed by a digest of its content.
    ``kv_blocks`` long ``[Bl, Hl, nqb, S]`` (``-1`` = empty slot); ``full`` bool,
    broadcastable to it: slots whose every pair is allowed (FlexAttention skips their
    ``mask_mod``).  Returns ``(kv_num_blocks [B', H', nqb], kv_indices [B', H', nqb, nkb],
    full_kv_num_blocks, full_kv_indices, member)`` (int32; the full ones ``None`` without
    full slots; ``member`` bool ``[B', H', nqb, nkb]``: the listed block pairs), or ``None``
    when some row lists a block twice.
    """
    if kv_blocks.is_inference() or (full is not None and full.is_inference()):
        # made under torch.inference_mode: no version counter to tell an in-place change
        return _block_tables(kv_blocks, nkb, full)
    versions = (kv_blocks._version, None if full is None else full._version)
    seen = _by_identity.get(id(kv_blocks))
    if (seen is not None and seen[0]() is kv_blocks and (seen[1] and seen[1]()) is full
            and seen[2] == versions and seen[3] == nkb):
        return seen[4]
    tables = _block_tables(kv_blocks, nkb, full)
    _by_identity[id(kv_blocks)] = (weakref.ref(kv_blocks), None if full is None else weakref.ref(full),
                                   versions, nkb, tables)
    _by_identity.move_to_end(id(kv_blocks))
    while len(_by_identity) > CACHE_SIZE:
        _by_identity.popitem(last=False)
    return tables


def _block_tables(kv_blocks: torch.Tensor, nkb: int, full: Optional[torch.Tensor]):
    """:func:`block_tables` keyed by the layout's content (a digest of its bytes), built as
    normal tensors even under ``torch.inference_mode`` (kept, they may serve a training
    call on CUDA, whose backward saves them)."""
    with torch.inference_mode(False):
        return _content_tables(kv_blocks, nkb, full)


def _content_tables(kv_blocks: torch.Tensor, nkb: int, full: Optional[torch.Tensor]):
    """The body of :func:`_block_tables` (looked up in, or added to, the content cache)."""
    cpu = kv_blocks.detach().to("cpu", torch.long).contiguous()
    fcpu = None
    if full is not None:
        fcpu = (full.detach().to("cpu", torch.bool).expand(torch.broadcast_shapes(full.shape, cpu.shape))
                & (cpu >= 0)).contiguous()
        cpu = cpu.expand_as(fcpu).contiguous()
        if not bool(fcpu.any()):
            fcpu = None
    key = (str(kv_blocks.device), tuple(cpu.shape), nkb, content_digest(cpu),
           None if fcpu is None else content_digest(fcpu))
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    valid = cpu >= 0
    srt = torch.sort(torch.where(valid, cpu, torch.full_like(cpu, nkb)), dim=-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] < nkb)
    tables = None
    if not bool(dup.any()):
        dev = kv_blocks.device
        member = torch.zeros(*cpu.shape[:-1], nkb + 1, dtype=torch.bool)
        member.scatter_(-1, torch.where(valid, cpu, torch.full_like(cpu, nkb)), True)
        member = member[..., :nkb].contiguous().to(dev)
        if fcpu is None:
            tables = (*(t.to(dev) for t in _table(cpu, valid, nkb)), None, None, member)
        else:
            tables = (*(t.to(dev) for t in (*_table(cpu, valid & ~fcpu, nkb), *_table(cpu, fcpu, nkb))),
                      member)
    _cache[key] = tables
    if len(_cache) > CACHE_SIZE:
        _cache.popitem(last=False)
    return tables


def exhausted() -> bool:
    """Whether dispatch stopped because ``torch.compile`` hit its recompile limit."""
    return _exhausted


def would_dispatch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_lse: bool,
                   scores: int) -> bool:
    """Whether a layout call on ``q``, ``k``, ``v`` computing ``scores`` score elements
    (``B·H·rows·keys per row``) would go to FlexAttention, pattern aside: mode,
    availability, device, gradients, log-sum-exp, dtype and the ``auto`` size rule."""
    m = mode()
    if m == "off" or _exhausted or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if q.device.type == "cpu":
        if grad or need_lse:
            return False
    elif q.device.type != "cuda":
        return False
    if m == "auto" and scores < MIN_SCORES:
        return False
    return available()


def usable(plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_lse: bool) -> bool:
    """Whether the engine call described by ``plan`` (inputs ``q [B,H,NQ,D]``, ``k``, ``v``
    padded) goes to FlexAttention; see the module docstring for the rules."""
    if plan.kv_blocks is None or not is_elementwise(plan.pair_mask):
        return False
    Bl, Hl, nqb, S = plan.kv_blocks.shape
    if Bl * Hl * nqb * plan.nkb > MAX_TABLE:
        return False
    if not would_dispatch(q, k, v, need_lse, plan.B * plan.H * q.shape[2] * S * plan.block_k):
        return False
    return block_tables(plan.kv_blocks, plan.nkb, plan.unmasked_slots()) is not None


def _reader(t: Optional[torch.Tensor], arange: bool):
    """``f(b, h, i)`` reading ``t [Bt|1, Ht|1, L]`` at a position (0-d tensors); with
    ``arange`` the position itself.  ``None`` for ``t = None``."""
    if arange:
        return lambda b, h, i: i
    if t is None:
        return None
    Bt, Ht = t.shape[0], t.shape[1]
    if Bt == 1 and Ht == 1:
        t0 = t[0, 0]
        return lambda b, h, i: t0[i]
    if Bt == 1:
        t1 = t[0]
        return lambda b, h, i: t1[h, i]
    if Ht == 1:
        t2 = t[:, 0]
        return lambda b, h, i: t2[b, i]
    return lambda b, h, i: t[b, h, i]


def _mods(plan, member: torch.Tensor):
    """``(mask_mod, score_mod or None)`` of an engine plan: the engine's pair rules on
    original positions, the self-exclusion penalty as a score modification.

    ``mask_mod`` also requires the block pair to be listed (``member [B', H', nqb, nkb]``)
    unless the plan's rules already imply it (``exact_layout``): the compiled kernel only
    visits listed blocks anyway, but FlexAttention's eager fallback (e.g. past dynamo's
    recompile limit, or with dynamo disabled) evaluates ``mask_mod`` on every pair.
    """
    qp = _reader(plan.q_pos, plan.default_pos)
    kp = _reader(plan.k_pos, plan.default_pos)
    kv = _reader(plan.k_valid, False)
    listed = _reader(member.flatten(-2), False)
    bq, bk, nkb = plan.block_q, plan.block_k, plan.nkb

    def mask_mod(b, h, qi, ki):
        a, c = qp(b, h, qi), kp(b, h, ki)
        ok = allowed_pairs(a, c, causal=plan.causal, k_valid=None if kv is None else kv(b, h, ki),
                           pair_mask=plan.pair_mask)
        if plan.exact_layout and ok is not None:
            return ok
        inside = listed(b, h, torch.div(qi, bq, rounding_mode="floor") * nkb
                        + torch.div(ki, bk, rounding_mode="floor"))
        return inside if ok is None else ok & inside

    score_mod = None
    if plan.exclude_self:
        def score_mod(score, b, h, qi, ki):
            return score - SELF_PENALTY * self_pairs(qp(b, h, qi), kp(b, h, ki), score.dtype)
    return mask_mod, score_mod


def forward(plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_lse: bool):
    """FlexAttention on the engine's padded tensors ``q [B,H,NQ,D]``, ``k [B,H,NK,D]``,
    ``v [B,H,NK,Dv]`` -> ``(out [B,H,NQ,Dv], lse [B,H,NQ] float32 or None)``, or None when
    ``torch.compile`` has hit its recompile limit (the caller then runs its own path)."""
    global _exhausted
    import torch._dynamo
    from torch.nn.attention.flex_attention import BlockMask

    num, idx, fnum, fidx, member = block_tables(plan.kv_blocks, plan.nkb, plan.unmasked_slots())
    mask_mod, score_mod = _mods(plan, member)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if not training:  # FlexAttention refuses inputs that require grad on CPU, even under no_grad
        q, k, v = q.detach(), k.detach(), v.detach()
    bm = BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=(plan.block_q, plan.block_k),
                                  mask_mod=mask_mod, seq_lengths=(q.shape[2], k.shape[2]),
                                  compute_q_blocks=training)
    try:  # never the eager fallback: it materializes the NQ x NK scores
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            res = _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=bm, scale=plan.scale,
                                   return_lse=need_lse)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        _exhausted = True
        return None
    if not need_lse:
        return res, None
    out, lse = res
    return out, lse.float()


def cpu_race_key(device: torch.device, *parts) -> Optional[tuple]:
    """``parts`` as a race key where races are run (mode ``"auto"`` on CPU), else None (mode
    ``"on"``, or not CPU: FlexAttention is used whenever it is usable)."""
    if mode() != "auto" or torch.device(device).type != "cpu":
        return None
    return parts


def race_key(plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[tuple]:
    """What an engine call's FlexAttention-vs-own-path race is remembered by: the block
    tables (the pattern), shapes, dtype, causal / self-exclusion / padding / rule (or
    None: :func:`cpu_race_key`)."""
    if cpu_race_key(q.device) is None:
        return None
    tables = block_tables(plan.kv_blocks, plan.nkb, plan.unmasked_slots())
    return ("engine", id(tables), tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype,
            plan.causal, plan.exclude_self, plan.k_valid is None, plan.pair_mask is None)


def race(key: tuple, flex, own, hold=None):
    """Time an (already compiled and run) FlexAttention call ``flex()`` (None when it
    cannot run) against the own path ``own()``, each in a block of consecutive calls —
    :data:`RACE_ROUNDS` timed FlexAttention calls, then an untimed own call and
    :data:`RACE_ROUNDS` timed ones — each side's fastest call counting.  Alternating the
    two timed each in the other's wake: BigBird's row pieces, 82 ms a call at N = 16,384
    in steady state, took 93–99 ms right after FlexAttention calls and lost to its 104 ms
    in 1 of 4 processes (and in a bench run).  A first own call builds layouts and
    scratch, so one call never decides (one call each misjudged longformer at N = 16,384:
    FlexAttention kept at 0.101 s where the own path takes 0.075).  Remember which was
    faster (:func:`record_race`; ``hold`` is kept with the outcome, e.g. the tables whose
    ``id`` is in the key) and return ``(FlexAttention's result, None)`` or ``(None, the
    own path's result)``."""
    t_flex = t_own = float("inf")
    res = mine = None
    for _ in range(RACE_ROUNDS):
        t0 = time.perf_counter()
        res = flex()
        t_flex = min(t_flex, time.perf_counter() - t0)
        if res is None:  # the recompile limit hit meanwhile
            return None, own()
    own()
    for _ in range(RACE_ROUNDS):
        t0 = time.perf_counter()
        mine = own()
        t_own = min(t_own, time.perf_counter() - t0)
    flex_wins = t_own > RACE_MARGIN * t_flex
    record_race(key, flex_wins, hold)
    return (res, None) if flex_wins else (None, mine)


def raced(key: Optional[tuple]) -> Optional[bool]:
    """The remembered race outcome for ``key`` (True: FlexAttention is the faster), None
    when not raced yet (or no race applies: ``key`` None)."""
    if key is None or key not in _races:
        return None
    _races.move_to_end(key)
    return _races[key][0]


def record_race(key: tuple, flex_faster: bool, hold=None) -> None:
    """Remember a race outcome (``hold``: an object kept alive with it, so an ``id`` in the
    key stays its own)."""
    _races[key] = (flex_faster, hold)
    while len(_races) > RACE_SIZE:
        _races.popitem(last=False)
