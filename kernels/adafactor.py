r"""AdaFactor: the exact three-reduction algorithm (spec §1.1) in five launches per tensor group.

Every tensor is a ``[slices, rows, cols]`` view (``_launcher.TilePlan``): factored tensors view their
last two axes, each leading index a slice; unfactored ones are flat, ``(1, ceil(n / BC), BC)``. A tile
program owns a band of ``RB`` rows × ``BC`` columns and walks it in sub-tiles of up to ``BR × BC``
(64 KB of fp32 per stream per program: the block-map and meta-table look-ups are paid once per band,
and every warp loads whole 512-byte row segments). All five passes run over all tensors of a group,
one launch each::

    rowcol (bands)  : Σθ² per band; factored: row sums of g² per column tile (one per sub-tile
                      row) and column sums per band                                        → scratch
    stats  (bands)  : the programs of a slice share out its row jobs (RJ rows) and column jobs (CB
                      columns); each sums its partials as [K, V] blocks in a fixed order,
                      R ← lerp(R, Σ/n_c + ε1, w), C likewise; Σ R per row job            → scratch
    rms    (bands)  : R̄ per slice; ΣU² per band (unfactored: V ← (1 − w)·V + w·(g² + ε1) here)
    scale  (tensors): α = min(lr·ρ, cap)·max(ε2, RMS θ), κ = max(1, RMS U / d) → α/κ and decay
    apply  (bands)  : U recomputed, M ← β1·M + (1 − β1)·(α/κ)·U, θ ← θ·decay − (M or (α/κ)·U)

The finishing work is spread over many programs and read as wide blocks: a column of an
``n_r``-row matrix has ``n_r / RB`` partials, a slice ``n_r / RJ`` R̄ partials and a tensor
``numel / (RB·BC)`` Σθ², ΣU² partials (488 160 × 512: 3 814, 477 and 15 256), so no program runs a
long serial chain of dependent loads, and R̄, which every rms program recomputes, costs a 2 KB read.

The rowcol, rms and apply passes load g through ``_mask.load_grad``: a ChildTuning-F mask is a hash of
the element index, so the three passes see the same masked gradient without storing it.
Reductions are two-stage (partials at fixed scratch slots, summed in a fixed order): no float
atomics, bit-identical reruns. ``lr`` and the skip flag are read from device memory; no host sync.
Traffic per fp32 element (factored, no momentum): θ + g, g, θ + g + θ written = 24 bytes, plus
~0.2 bytes of partials written and read back.

FSDP2 shards take the same passes on their local shards, with their sums completed across ranks
between passes (``kernels/adafactor_shards.py``): the stats, rms and scale passes read a sharded
tensor's completed sums from its slot of an exchange buffer (meta column ``_SHARD``, 0 for whole
tensors).
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

import torch

from .. import _distributed
from ..reference.adafactor import _eps1
from . import _launcher, _mask, checks
from .adafactor_passes import (adafactor_apply_kernel, adafactor_rms_kernel, adafactor_rowcol_kernel,
                               adafactor_scale_kernel, adafactor_stats_kernel)

if TYPE_CHECKING:
    from .adafactor_shards import _Exchange

# a band program owns RB rows × BC columns (64 KB of fp32 per stream) and walks them in sub-tiles of
# SUB[pass] = (rows, warps), 8 fp32 elements per thread and stream each step; BR × BC is the apply
# pass's sub-tile. With the register cap, 32 warps fit on an SM (eight 4-warp or two 16-warp
# programs): 64 KB of loads in flight per SM, no spill in the unmasked passes on sm_90 beyond
# 8 bytes in rowcol (0 disables the cap; the interpreter ignores it). Measured on an H100 at 500 M
# parameters (ms): rowcol 1.35 / 1.40 / 1.59 / 2.26 with (8, 4) / (16, 8) / (32, 16) capped /
# (32, 16) uncapped (76-108 registers, one program per SM), rms 0.67 / 0.71 / 0.83 / 1.36, apply
# 2.01 / 2.03 / 2.01 / 2.37
BR, BC = 32, 128
RB = 4 * BR
SUB = {"rowcol": (BR // 4, 4), "rms": (BR // 4, 4), "apply": (BR, 16)}
MAX_REGS = 64
#: the rowcol pass can check the gradients for inf/NaN as it reads them (``launch(scan_nonfinite=True)``)
SCANS_NONFINITE = True
# stats: a row job finishes RJ rows from [KR, VR] blocks of row partials, a column job CB columns
# from [KC, CB] blocks of column partials (CB·4 = 128 bytes: one cache line per partial row)
RJ, KR, VR = 1024, 8, 512
KC, CB = 128, 32
STATS_WARPS = 8
# the scale pass and R̄ read their partials as [VB] vectors
VB = 1024
SMALL_WARPS = 4
_TINY = torch.finfo(torch.float32).tiny
_lr_cache: dict = {}


def _view(t: torch.Tensor, factored: bool) -> tuple[int, int, int]:
    """``(slices, rows, cols)``: the last two axes of a factored tensor, else flat rows of ``BC``."""
    if factored:
        n_r, n_c = t.shape[-2], t.shape[-1]
        return t.numel() // max(n_r * n_c, 1), n_r, n_c
    return 1, -(-t.numel() // BC), BC


def _scratch_sizes(view: tuple[int, int, int], factored: bool) -> tuple[int, int]:
    """Row/column partials ``S·(t_c·n_r + t_r·n_c)`` (``t_r`` bands of ``RB`` rows) and R̄ partials
    plus finals ``S·(ceil(n_r / RJ) + 1)``."""
    if not factored:
        return 0, 0
    slices, n_r, n_c = view
    t_r, t_c = _launcher.tile_counts(view, (RB, BC))
    return slices * (t_c * n_r + t_r * n_c), slices * (-(-n_r // RJ) + 1)


class _Group(NamedTuple):
    """A launch group: its tile plan, ε1 and torch mode's clamp floors for its dtype, and its scratch."""

    plan: _launcher.TilePlan
    eps1: float
    floor1: float
    floor2: float
    sq_param: torch.Tensor
    sq_update: torch.Tensor
    rowcol: torch.Tensor
    row_mean: torch.Tensor
    scale: torch.Tensor


def _group(plan: _launcher.TilePlan, dtype: torch.dtype, hp: Any, tag: str) -> _Group:
    """The group of ``plan``; groups with one ``tag`` take turns with the same scratch buffers."""
    eps1 = _eps1(hp, dtype)
    device = plan.tables.device

    def scratch(name: str, numel: int) -> torch.Tensor:
        return _launcher.workspace(f"adafactor.{name}{tag}", numel, device)

    # torch mode's clamp floors ε1 (on R̄) and ε1² (on V̂, V), kept positive in fp32 as the
    # reference does (ε1² = 1e-60 would flush to 0 and a zero row give 0·rsqrt(0))
    return _Group(plan, eps1, max(eps1, _TINY), max(eps1 * eps1, _TINY), scratch("sq_param", plan.n_blocks),
                  scratch("sq_update", plan.n_blocks), scratch("rowcol", plan.segment_sizes[0]),
                  scratch("row_mean", plan.segment_sizes[1]), scratch("scale", 2 * plan.n_tensors))


class _Step:
    """One step over a list of tensors: its launch arguments, and each pass as a method that launches
    it on one group (:meth:`run` runs passes group by group).

    With ``exchange`` (FSDP2 shards) the shard descriptors point the kernels at the tensors' slots in
    the zeroed exchange buffer :attr:`x`; without it every tensor finishes its sums from its own
    partials (meta column ``_SHARD`` holds 0, and :attr:`x` is a never-read stand-in).
    """

    def __init__(self, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]], hp: Any,
                 sc: Any, lr: Any, skip_flag: torch.Tensor | None, round_key: int | None,
                 exchange: _Exchange | None = None) -> None:
        factored = ["exp_avg_sq_row" in s for s in states]
        stat_a = [s["exp_avg_sq_row"] if f else s["exp_avg_sq"] for s, f in zip(states, factored)]
        self.stat_b = [s["exp_avg_sq_col"] if f else s["exp_avg_sq"] for s, f in zip(states, factored)]
        self.params, self.hp, self.sc, self.round_key, self.exchange = params, hp, sc, round_key, exchange
        self.work = [_launcher.contiguous_or_copy(p) for p in params]
        self.grads = [_launcher.contiguous_or_copy(g) for g in grads]
        self.mask = _mask.prepare(self.grads, states, hp.mask)
        self.momentum = hp.beta1 is not None
        # without momentum list 4 is a never-read stand-in, so every kernel keeps one signature
        exp_avg = [s["exp_avg"] for s in states] if self.momentum else self.grads
        views = [_view(p, f) for p, f in zip(params, factored)]
        sizes = [_scratch_sizes(v, f) for v, f in zip(views, factored)]
        device = params[0].device
        self.lr_t = _launcher.device_scalar(lr, device, _lr_cache)
        self.flag = skip_flag if skip_flag is not None else self.lr_t
        self.check = skip_flag is not None
        self.torch_eps = hp.eps_mode == "torch"
        self.sign = -1.0 if hp.maximize else 1.0
        if hp.relative_step and hp.lr_mode == "rho_max":
            self.rho, self.cap = 1.0, sc.inv_sqrt_step
        else:
            self.rho, self.cap = sc.rho, float("inf")
        regs = {"maxnreg": MAX_REGS} if MAX_REGS else {}
        self.sub = {k: dict(SR=r, num_warps=w, **regs) for k, (r, w) in SUB.items()}
        if exchange is None:
            shards, tag, self.x = [0] * len(params), "", self.lr_t
        else:
            shards, tag = exchange.addresses(), ".shards"
            self.x = _launcher.workspace("adafactor.exchange", exchange.layout.size, device)[:exchange.layout.size]
            self.x.zero_()
        columns = [[int(f) for f in factored], *self.mask.columns, shards]
        segments = [[s[0] for s in sizes], [s[1] for s in sizes]]
        launch_groups = _launcher.tile_groups([self.work, self.grads, stat_a, self.stat_b, exp_avg], views,
                                              (RB, BC), columns, segments)
        # a sharded step runs each pass over every group before the next pass: each group keeps its
        # own scratch (whole tensors' groups take turns with one set)
        self.groups = [_group(plan, params[idx[0]].dtype, hp, f"{tag}{k}" if exchange else "")
                       for k, (idx, plan) in enumerate(launch_groups)]

    def run(self, *passes: Callable[[_Group], None]) -> None:
        """``passes`` in order on the first group, then on the next one, and so on."""
        for g in self.groups:
            for launch_pass in passes:
                launch_pass(g)

    def rowcol(self, g: _Group, scan: bool = False) -> None:
        g.plan.launch(adafactor_rowcol_kernel, self.flag, g.sq_param, g.rowcol, *self.mask.args, **self.sub["rowcol"],
                      MASK_MODE=self.mask.mode, CHECK_SKIP=self.check, SCAN=scan)

    def stats(self, g: _Group) -> None:
        g.plan.launch(adafactor_stats_kernel, self.flag, g.rowcol, g.row_mean, self.x, self.sc.weight,
                      0.0 if self.torch_eps else g.eps1, num_warps=STATS_WARPS, CHECK_SKIP=self.check, RJ=RJ,
                      KR=KR, VR=VR, KC=KC, CB=CB)

    def rms(self, g: _Group) -> None:
        w = self.sc.weight
        g.plan.launch(adafactor_rms_kernel, self.flag, g.row_mean, g.sq_update, self.x, self.sign, w, 1.0 - w,
                      w * g.eps1, g.floor1, g.floor2, _TINY, *self.mask.args, **self.sub["rms"],
                      EPS_TORCH=self.torch_eps, MASK_MODE=self.mask.mode, CHECK_SKIP=self.check, RJ=RJ, VB=VB)

    def scale(self, g: _Group) -> None:
        hp = self.hp
        hf_decay = hp.decay_mode == "hf"
        g.plan.launch(adafactor_scale_kernel, self.flag, self.lr_t, g.sq_param, g.sq_update, self.x, g.scale,
                      self.rho, self.cap, hp.eps2, float(hp.scale_parameter), hp.clip_threshold,
                      hp.weight_decay if hf_decay else 0.0, 0.0 if hf_decay else hp.weight_decay,
                      per_tensor=True, num_warps=SMALL_WARPS, CHECK_SKIP=self.check, VB=VB)

    def apply(self, g: _Group) -> None:
        beta1 = self.hp.beta1 if self.momentum else 0.0
        key = self.round_key
        g.plan.launch(adafactor_apply_kernel, self.flag, g.row_mean, g.scale, self.sign, beta1, 1.0 - beta1,
                      g.floor1, g.floor2, _TINY, *self.mask.args, 3 if key is None else key, **self.sub["apply"],
                      EPS_TORCH=self.torch_eps, MOMENTUM=self.momentum, MASK_MODE=self.mask.mode,
                      STOCHASTIC=key is not None, CHECK_SKIP=self.check, RJ=RJ)

    def write_back(self) -> None:
        for p, w in zip(self.params, self.work):
            if w is not p:
                p.copy_(w)


def launch(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, torch.Tensor]],
           hp: Any, sc: Any, lr: Any, skip_flag: torch.Tensor | None = None, scan_nonfinite: bool = False,
           round_key: int | None = None) -> None:
    """Host launcher: five launches per (device, dtype, alignment) group of tensors, whatever their number.

    ``skip_flag``, when given, is a device int32 tensor; a non-zero value makes every pass a no-op
    (parameters and all state untouched), with no host synchronisation. With ``scan_nonfinite`` the
    gradients are checked here and ``skip_flag`` raised when one holds inf or NaN: inside the rowcol
    pass, which reads them anyway, when the tensors form one launch group (so no group is written
    before every gradient has been seen), else by a separate scan first.

    ``round_key``, when given, writes bf16 parameters by stochastic rounding with that key
    (:func:`optimfx._precision.round_key`) in the apply pass.

    FSDP2 shards (a ``ShardSpec`` under ``_distributed.SHARD_KEY`` in their state) go through
    :func:`optimfx._kernels.adafactor_shards.launch_distributed`.
    """
    if any(_distributed.SHARD_KEY in s for s in states):
        from .adafactor_shards import launch_distributed

        launch_distributed(params, grads, states, hp, sc, lr, skip_flag, scan_nonfinite, round_key)
        return
    step = _Step(params, grads, states, hp, sc, lr, skip_flag, round_key)
    scan = scan_nonfinite and len(step.groups) == 1
    if scan_nonfinite and not scan:
        checks.raise_if_nonfinite(step.grads, skip_flag)
    step.run(partial(step.rowcol, scan=scan), step.stats, step.rms, step.scale, step.apply)
    step.write_back()
