r"""EG step-size adaptation (spec §3.1) around any base optimizer: four launches per tensor group.

Every tensor is a flat ``(1, ceil(n / BC), BC)`` view cut into ``BR × BC`` tiles (``_launcher.TilePlan``).
Before the base optimizer's ``step()``::

    reduce   (tiles)  : θ → saved copy; per tile Σν·g, Σν², Σg², Σm²                        → partials
    partials (tensors): fixed-order sum of the tensor's tile partials                       → sums[row]
    scale    (tensors): sums of the tensor's scope unit (rows lo..hi) → a = γ_s·cos or γ_s·⟨ν,g⟩,
                        clipped; s ← s·exp(a); c = γ_p / (RMS m · RMS g) (or γ_p)            → coefs[row]

after it (``θ`` now holds the base's proposal)::

    apply    (tiles)  : d = θ_saved − θ;  p ← clamp(p·exp(clip(c·m·g)));  ν ← μν + η·p·d;
                        θ ← θ + (d − s·ν);  m ← lerp(m, g, 1 − β)

Around a plain ``torch.optim.SGD`` (Funnel's base) the base does not step: the apply pass forms
``d = lr·(g + λθ)`` itself and writes ``θ ← θ − s·ν`` (``d`` read back off the parameters would be
rounded to the spacing of their floats, and lost below half of it), and no copy of ``θ`` is saved
(4 B fewer written and read per fp32 element, and no parameter-sized buffer).

Reductions are two-stage with a fixed order (no float atomics): reruns are bit-identical. Scope units
are contiguous row ranges (a tensor, a param group, or every tensor), so group and global scopes need
no host step. A raised skip flag (``kernels/checks.py``) leaves scales, gains, velocity and average
untouched and restores ``θ`` from the saved copy. Traffic per fp32 element: 16 B read + 4 B written
before the base step, 24 B read + 16 B written after it (60 B on top of the base).

On FSDP2 shards (a ``ShardSpec`` in a tensor's state view) the rows of ``sums`` hold this rank's
partial sums: they are all-reduced between the partials and the scale passes, the skip flag is
all-reduced (max), and the gain coefficient divides by the global element count. No host read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .. import _distributed
from . import _launcher
from ._common import load_f32, nan_max, nan_min, store_cast, table_ptr, tile_coords, tile_offsets

BR, BC = 16, 128
NUM_WARPS = 8
SMALL_WARPS = 4
#: saved copies start on multiples of this many elements (keeps 16-byte alignment for every dtype)
_PAD = 64
_TINY = torch.finfo(torch.float32).tiny

_FIRST = tl.constexpr(_launcher.TILE_META.index("first"))
_TILES = tl.constexpr(_launcher.TILE_META.index("tiles"))
# caller meta columns: the tensor's row in ``sums``/``coefs``; scale plan: unit rows, element count
_ROW = tl.constexpr(_launcher.META_USER)
_LO = tl.constexpr(_launcher.META_USER + 1)
_HI = tl.constexpr(_launcher.META_USER + 2)
_NUMEL = tl.constexpr(_launcher.META_USER + 3)


@triton.jit
def _reduce_tile(p_p, p_g, p_v, p_m, p_s, o, m, p_out, SAVE: tl.constexpr, MASKED: tl.constexpr):
    # the saved copy keeps the parameter's dtype and bits (none when the base does not step: DIRECT)
    if SAVE:
        if MASKED:
            tl.store(p_s + o, tl.load(p_p + o, mask=m), mask=m)
        else:
            tl.store(p_s + o, tl.load(p_p + o))
    b_g = load_f32(p_g, o, m, MASKED)
    b_v = load_f32(p_v, o, m, MASKED)
    b_m = load_f32(p_m, o, m, MASKED)
    tl.store(p_out, tl.sum(b_v * b_g))
    tl.store(p_out + 1, tl.sum(b_v * b_v))
    tl.store(p_out + 2, tl.sum(b_g * b_g))
    tl.store(p_out + 3, tl.sum(b_m * b_m))


@triton.jit
def eg_reduce_kernel(tables, numels, block_tensor, block_chunk, meta, p_part,
                     DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr, DTYPE3: tl.constexpr,
                     DTYPE4: tl.constexpr, DTYPE5: tl.constexpr, SAVE: tl.constexpr, ALIGNED: tl.constexpr,
                     BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr):
    # lists: 0 param, 1 grad, 2 gains, 3 velocity, 4 average gradient, 5 saved param (DIRECT: the param)
    i_t, p_meta, i_s, i_r, i_c = tile_coords(block_tensor, block_chunk, meta, NMETA)
    _, _, o, m, full, _, _ = tile_offsets(p_meta, tl.load(numels + i_t), i_s, i_r, i_c, BR, BC, ALIGNED)
    p_p = table_ptr(tables, i_t, 0, 6, DTYPE0, ALIGNED)
    p_g = table_ptr(tables, i_t, 1, 6, DTYPE1, ALIGNED)
    p_v = table_ptr(tables, i_t, 3, 6, DTYPE3, ALIGNED)
    p_m = table_ptr(tables, i_t, 4, 6, DTYPE4, ALIGNED)
    p_s = table_ptr(tables, i_t, 5, 6, DTYPE5, ALIGNED)
    # four partials per tile, at the program's slot
    p_out = p_part + 4 * tl.program_id(0).to(tl.int64)
    if full:
        _reduce_tile(p_p, p_g, p_v, p_m, p_s, o, m, p_out, SAVE, False)
    else:
        _reduce_tile(p_p, p_g, p_v, p_m, p_s, o, m, p_out, SAVE, True)


@triton.jit
def eg_partials_kernel(tables, numels, block_tensor, block_chunk, meta, p_part, p_sums,
                       DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr, DTYPE3: tl.constexpr,
                       DTYPE4: tl.constexpr, DTYPE5: tl.constexpr, ALIGNED: tl.constexpr, BR: tl.constexpr,
                       BC: tl.constexpr, NMETA: tl.constexpr):
    # one program per tensor: its [tiles, 4] partials summed in a fixed order
    p_meta = meta + tl.program_id(0).to(tl.int64) * NMETA
    first, tiles = tl.load(p_meta + _FIRST), tl.load(p_meta + _TILES)
    o_j = tl.arange(0, 4)
    b_acc = tl.zeros([BC, 4], dtype=tl.float32)
    for k in range(0, tiles, BC):
        o_k = k + tl.arange(0, BC)
        b_acc += tl.load(p_part + 4 * (first + o_k)[:, None] + o_j[None, :], mask=(o_k < tiles)[:, None],
                         other=0.0)
    tl.store(p_sums + 4 * tl.load(p_meta + _ROW) + o_j, tl.sum(b_acc, axis=0))


@triton.jit
def eg_scale_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, p_sums, p_coefs,
                    gamma_scale, gamma_gain, clip, tiny,
                    DTYPE0: tl.constexpr, NORMALIZE: tl.constexpr, CHECK_SKIP: tl.constexpr,
                    ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr):
    # one program per tensor; list 0: the 0-d scales
    i_t = tl.program_id(0).to(tl.int64)
    p_meta = meta + i_t * NMETA
    row, lo, hi = tl.load(p_meta + _ROW), tl.load(p_meta + _LO), tl.load(p_meta + _HI)
    o_j = tl.arange(0, 4)
    # the scope unit's sums, rows lo..hi in a fixed order (every tensor of a unit gets the same bits)
    b_acc = tl.zeros([BC, 4], dtype=tl.float32)
    for k in range(lo, hi, BC):
        o_k = k + tl.arange(0, BC)
        b_acc += tl.load(p_sums + 4 * o_k[:, None] + o_j[None, :], mask=(o_k < hi)[:, None], other=0.0)
    b_unit = tl.sum(b_acc, axis=0)
    dot = tl.sum(tl.where(o_j == 0, b_unit, 0.0))
    if NORMALIZE:
        # ‖ν‖·‖g‖ as a product of IEEE square roots: the product of the squares can leave the normal
        # range (a subnormal flushes to 0 on the GPU, and the alignment with it)
        nu_sq, g_sq = tl.sum(tl.where(o_j == 1, b_unit, 0.0)), tl.sum(tl.where(o_j == 2, b_unit, 0.0))
        denom = tl.sqrt_rn(nu_sq) * tl.sqrt_rn(g_sq)
        a = tl.where(denom > 0, dot / nan_max(denom, tiny), 0.0)
    else:
        a = dot
    a = nan_min(nan_max(gamma_scale * a, -clip), clip)
    p_scale = table_ptr(tables, i_t, 0, 1, DTYPE0, False)
    scale = tl.load(p_scale)
    if CHECK_SKIP:
        scale = tl.where(tl.load(skip_ptr) != 0, scale, scale * tl.exp(a))
    else:
        scale = scale * tl.exp(a)
    tl.store(p_scale, scale)
    # gain coefficient from the tensor's own row: γ_p / (‖m‖·‖g‖ / n)
    b_own = tl.load(p_sums + 4 * row + o_j)
    coef = gamma_gain
    if NORMALIZE:
        n = tl.maximum(tl.load(p_meta + _NUMEL), 1).to(tl.float32)
        avg_sq, g_sq = tl.sum(tl.where(o_j == 3, b_own, 0.0)), tl.sum(tl.where(o_j == 2, b_own, 0.0))
        rms = tl.sqrt_rn(avg_sq) * tl.sqrt_rn(g_sq) / n
        coef = tl.where(rms > 0, gamma_gain / nan_max(rms, tiny), 0.0)
    tl.store(p_coefs + 2 * row, scale)
    tl.store(p_coefs + 2 * row + 1, coef)


@triton.jit
def _lerp(b_old, b_new, weight):
    # torch.lerp's two-sided form, so the kernel rounds as the reference does
    return tl.where(weight < 0.5, b_old + weight * (b_new - b_old), b_new - (b_new - b_old) * (1.0 - weight))


@triton.jit
def _apply_tile(p_p, p_g, p_a, p_v, p_m, p_s, o, m, scale, coef, lr, momentum, weight, clip, gain_min,
                gain_max, sgd_lr, sgd_decay, DIRECT: tl.constexpr, MASKED: tl.constexpr):
    b_p = load_f32(p_p, o, m, MASKED)
    b_g = load_f32(p_g, o, m, MASKED)
    b_m = load_f32(p_m, o, m, MASKED)
    if DIRECT:
        # a plain SGD base did not step: θ is θ_{t-1} and d = lr·(g + λθ) exactly
        b_d = (b_g + sgd_decay * b_p) * sgd_lr
    else:
        b_d = load_f32(p_s, o, m, MASKED) - b_p
    b_z = nan_min(nan_max(coef * b_m * b_g, -clip), clip)
    b_a = nan_min(nan_max(load_f32(p_a, o, m, MASKED) * tl.exp(b_z), gain_min), gain_max)
    b_v = momentum * load_f32(p_v, o, m, MASKED) + lr * b_a * b_d
    store_cast(p_a, o, b_a, m, MASKED)
    store_cast(p_v, o, b_v, m, MASKED)
    store_cast(p_m, o, _lerp(b_m, b_g, weight), m, MASKED)
    if DIRECT:
        store_cast(p_p, o, b_p - scale * b_v, m, MASKED)
    else:
        store_cast(p_p, o, b_p + (b_d - scale * b_v), m, MASKED)


@triton.jit
def eg_apply_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, p_coefs,
                    lr, momentum, weight, clip, gain_min, gain_max, sgd_lr, sgd_decay,
                    DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr, DTYPE3: tl.constexpr,
                    DTYPE4: tl.constexpr, DTYPE5: tl.constexpr, CHECK_SKIP: tl.constexpr, DIRECT: tl.constexpr,
                    ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr):
    # lists as in eg_reduce_kernel; list 0 now holds the base's proposal
    i_t, p_meta, i_s, i_r, i_c = tile_coords(block_tensor, block_chunk, meta, NMETA)
    _, _, o, m, full, _, _ = tile_offsets(p_meta, tl.load(numels + i_t), i_s, i_r, i_c, BR, BC, ALIGNED)
    p_p = table_ptr(tables, i_t, 0, 6, DTYPE0, ALIGNED)
    p_s = table_ptr(tables, i_t, 5, 6, DTYPE5, ALIGNED)
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            # skipped step: θ back to the saved copy (DIRECT: θ was not touched), EG state untouched
            if not DIRECT:
                tl.store(p_p + o, tl.load(p_s + o, mask=m), mask=m)
            return
    row = tl.load(p_meta + _ROW)
    scale, coef = tl.load(p_coefs + 2 * row), tl.load(p_coefs + 2 * row + 1)
    p_g = table_ptr(tables, i_t, 1, 6, DTYPE1, ALIGNED)
    p_a = table_ptr(tables, i_t, 2, 6, DTYPE2, ALIGNED)
    p_v = table_ptr(tables, i_t, 3, 6, DTYPE3, ALIGNED)
    p_m = table_ptr(tables, i_t, 4, 6, DTYPE4, ALIGNED)
    if full:
        _apply_tile(p_p, p_g, p_a, p_v, p_m, p_s, o, m, scale, coef, lr, momentum, weight, clip, gain_min,
                    gain_max, sgd_lr, sgd_decay, DIRECT, False)
    else:
        _apply_tile(p_p, p_g, p_a, p_v, p_m, p_s, o, m, scale, coef, lr, momentum, weight, clip, gain_min,
                    gain_max, sgd_lr, sgd_decay, DIRECT, True)


@dataclass
class Pending:
    """What :func:`before` leaves for :func:`after`: per unit its lists, plus the shared buffers."""

    units: list[Any]
    grads: list[list[torch.Tensor]]
    saved: list[list[torch.Tensor]]
    rows: list[list[int]]
    coefs: torch.Tensor
    flag: torch.Tensor | None
    direct: bool  # the base is a plain SGD that does not step (see ``after``)


def _views(tensors: list[torch.Tensor]) -> list[tuple[int, int, int]]:
    return [(1, -(-t.numel() // BC), BC) for t in tensors]


def _lists(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, torch.Tensor]],
           saved: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    return [params, grads, [s["gains"] for s in states], [s["velocity"] for s in states],
            [s["avg_grad"] for s in states], saved]


def _saved_copies(units: list[Any], scratch: dict) -> list[list[torch.Tensor]]:
    """Views of one buffer per (device, param dtype), owned by the optimizer: one saved copy per step."""
    sizes: dict[tuple, int] = {}
    offsets = []
    for unit in units:
        offs = []
        for p in unit.params:
            key = (p.device, p.dtype)
            offs.append(sizes.get(key, 0))
            sizes[key] = offs[-1] + -(-p.numel() // _PAD) * _PAD
        offsets.append(offs)
    buffers = {key: _buffer(scratch, "eg.saved", total, *key) for key, total in sizes.items()}
    return [[buffers[(p.device, p.dtype)][o:o + p.numel()] for p, o in zip(u.params, offs)]
            for u, offs in zip(units, offsets)]


def _buffer(scratch: dict, name: str, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A grow-only buffer of the optimizer (the base step runs between its writes and its reads, so a
    buffer shared by every optimizer, as ``_launcher.workspace``, could be overwritten by a nested one)."""
    key = (name, device, dtype)
    buf = scratch.get(key)
    if buf is None or buf.numel() < numel:
        buf = scratch[key] = torch.empty(max(numel, 1), dtype=dtype, device=device)
    return buf


def _scope_rows(units: list[Any]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Each tensor's row and its scope unit's rows ``[lo, hi)``: rows run over units in order."""
    rows, bounds, start = [], [], 0
    total = sum(len(u.params) for u in units)
    for unit in units:
        n = len(unit.params)
        rows.append(list(range(start, start + n)))
        if unit.scope == "tensor":
            bounds.append([(r, r + 1) for r in rows[-1]])
        else:
            lo, hi = (0, total) if unit.scope == "global" else (start, start + n)
            bounds.append([(lo, hi)] * n)
        start += n
    return rows, bounds


def before(units: list[Any], skip_nonfinite: bool, scratch: dict, direct: bool = False) -> Pending:
    """Everything before the base step: flag, saved copies, sums, scales and gain coefficients.

    ``units`` are the param groups to update (``params``, ``grads``, ``states``, ``hp``, ``scope``), all
    on one device; ``scratch`` is the optimizer's dict of reusable buffers. ``direct``: the base is a
    plain SGD that will not step, so no copy of θ is saved (``after`` forms the base's step).
    """
    device = units[0].params[0].device
    if any(p.device != device for u in units for p in u.params):
        raise RuntimeError("EGStepSize's Triton backend needs every parameter on one device")
    grads = [[_launcher.contiguous_or_copy(g) for g in u.grads] for u in units]
    # FSDP2 shards, one per row of ``sums`` (None: a whole tensor)
    shards = [s.get(_distributed.SHARD_KEY) for u in units for s in u.states]
    flag = None
    if skip_nonfinite:
        from .checks import nonfinite_flag

        flag = _distributed.any_rank_(nonfinite_flag([g for gs in grads for g in gs]), shards)
    # DIRECT: no saved copy; the parameters stand in for it in the tables (never read there)
    saved = [[] for _ in units] if direct else _saved_copies(units, scratch)
    rows, bounds = _scope_rows(units)
    n_rows = sum(len(r) for r in rows)
    sums = _buffer(scratch, "eg.sums", 4 * n_rows, device, torch.float32)
    coefs = _buffer(scratch, "eg.coefs", 2 * n_rows, device, torch.float32)
    # rows of empty tensors stay zero: alignment 0 (§3.5.11)
    sums.zero_()
    for unit, gs, sv, rw in zip(units, grads, saved, rows):
        work = [_launcher.contiguous_or_copy(p) for p in unit.params]
        lists = _lists(work, gs, unit.states, work if direct else sv)
        for _, plan in _launcher.tile_groups(lists, _views(work), (BR, BC), [rw]):
            part = _launcher.workspace("eg.partials", 4 * plan.n_blocks, device)
            plan.launch(eg_reduce_kernel, part, num_warps=NUM_WARPS, SAVE=not direct)
            plan.launch(eg_partials_kernel, part, sums, per_tensor=True, num_warps=SMALL_WARPS)
    _distributed.sum_rows_(sums[:4 * n_rows].view(n_rows, 4), shards)
    for unit, rw, bd in zip(units, rows, bounds):
        hp = unit.hp
        scales = [s["scale"] for s in unit.states]
        numels = [_distributed.global_numel(p, s) for p, s in zip(unit.params, unit.states)]
        columns = [rw, [b[0] for b in bd], [b[1] for b in bd], numels]
        plan = _launcher.tile_plan([scales], [(1, 1, BC)] * len(scales), (1, BC), columns)
        plan.launch(eg_scale_kernel, flag if flag is not None else sums, sums, coefs, hp.gamma_scale,
                    hp.gamma_gain, _bound(hp.exp_clip), _TINY, per_tensor=True, num_warps=SMALL_WARPS,
                    NORMALIZE=hp.normalize, CHECK_SKIP=flag is not None)
    return Pending(units, grads, saved, rows, coefs, flag, direct)


def _bound(x: float | None, default: float = float("inf")) -> float:
    return default if x is None else float(x)


def after(pending: Pending) -> None:
    """The apply pass of every unit, once the base optimizer has written its proposal; with
    ``pending.direct`` the base is a plain ``torch.optim.SGD`` that did not step, and its step
    ``lr·(g + λθ)`` is formed here (read back off the parameters it would be rounded to the spacing
    of their floats)."""
    flag, direct = pending.flag, pending.direct
    for unit, gs, sv, rw in zip(pending.units, pending.grads, pending.saved, pending.rows):
        hp = unit.hp
        sgd_lr, sgd_decay = (float(unit.group["lr"]), float(unit.group["weight_decay"])) if direct else (0.0, 0.0)
        work = [_launcher.contiguous_or_copy(p) for p in unit.params]
        lists = _lists(work, gs, unit.states, work if direct else sv)
        for _, plan in _launcher.tile_groups(lists, _views(work), (BR, BC), [rw]):
            plan.launch(eg_apply_kernel, flag if flag is not None else pending.coefs, pending.coefs,
                        hp.lr, hp.momentum, 1.0 - hp.beta, _bound(hp.exp_clip), _bound(hp.gain_min, -float("inf")),
                        _bound(hp.gain_max), sgd_lr, sgd_decay, num_warps=NUM_WARPS, CHECK_SKIP=flag is not None,
                        DIRECT=direct)
        for p, w in zip(unit.params, work):
            if w is not p:
                p.copy_(w)
