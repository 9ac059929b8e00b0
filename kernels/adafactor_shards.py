r"""AdaFactor's Triton passes on FSDP2 shards: sums over the sharded axis completed across ranks.

FSDP2 shards (``Shard(0)``: whole rows of a matrix, whole slices of a batched tensor, a run of a
vector) take the same passes on the local shard. Their sums over the sharded axis are completed
between passes: a fold pass sums this rank's partials into the tensor's slot of an exchange buffer
(``_distributed.SumLayout``: the same layout on every rank, empty shards included), one all-reduce
per part completes it, and the next pass reads the slot, one partial instead of its own partials,
and divides by the global count. A shard's slots and counts are in a small int64 descriptor whose
address is a meta column (0 for whole tensors, which keep the single-process path)::

    rowcol, fold cols  → all-reduce column sums of row-split matrices      (stats reads them)
    stats,  fold R̄     → all-reduce Σ R of row-split matrices               (rms reads it)
    rms,    fold sums  → all-reduce Σθ², ΣU² of every shard                 (scale reads them)
    scale, apply
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from .. import _distributed
from .._precision import rounding
from ..reference import adafactor as ref
from . import _launcher, adafactor, checks
from ._common import tile_coords
from .adafactor import CB, KC, RJ, SMALL_WARPS, STATS_WARPS, VB, _Group, _Step
from .adafactor_tiles import (_COLS, _FIRST, _G_ROWS, _OFF_RB, _OFF_RC, _ROWS, _TILES, _TILES_C, _TILES_R,
                              _X_COLS, _X_RBAR, _X_SUMS, _pair_sum, _slot, _sum_parts, _vec_sum)


@triton.jit
def adafactor_fold_cols_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, p_rc, p_x,
                               DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr,
                               DTYPE3: tl.constexpr, DTYPE4: tl.constexpr, CHECK_SKIP: tl.constexpr,
                               ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr,
                               KC: tl.constexpr, CB: tl.constexpr):
    # a matrix whose rows are split across ranks (one slice): this rank's column sums, its [t_r, n_c]
    # column partials summed, into its exchange slot; the tiles share the column jobs as in stats
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    _, p_meta, _, i_r, i_c = tile_coords(block_tensor, block_chunk, meta, NMETA)
    o_x, _ = _slot(p_meta, _X_COLS)
    if o_x >= 0:
        n_r, n_c = tl.load(p_meta + _ROWS), tl.load(p_meta + _COLS)
        t_r, t_c = tl.load(p_meta + _TILES_R), tl.load(p_meta + _TILES_C)
        p_cpart = p_rc + tl.load(p_meta + _OFF_RC) + t_c * n_r
        for j in range(i_r * t_c + i_c, (n_c + CB - 1) // CB, t_r * t_c):
            o_v = j * CB + tl.arange(0, CB)
            m_v = o_v < n_c
            tl.store(p_x + o_x + o_v, _sum_parts(p_cpart, o_v, m_v, t_r, n_c, KC, CB), mask=m_v)


@triton.jit
def adafactor_fold_rbar_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, p_rb, p_x,
                               DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr,
                               DTYPE3: tl.constexpr, DTYPE4: tl.constexpr, CHECK_SKIP: tl.constexpr,
                               ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr,
                               RJ: tl.constexpr, VB: tl.constexpr):
    # one program per tensor; a matrix whose rows are split across ranks: Σ R over this rank's rows
    # (the stats pass's [n_jr] partials) into its exchange slot
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    p_meta = meta + tl.program_id(0).to(tl.int64) * NMETA
    o_x, _ = _slot(p_meta, _X_RBAR)
    if o_x >= 0:
        n_jr = (tl.load(p_meta + _ROWS) + RJ - 1) // RJ
        tl.store(p_x + o_x, _vec_sum(p_rb + tl.load(p_meta + _OFF_RB), n_jr, VB))


@triton.jit
def adafactor_fold_sums_kernel(tables, numels, block_tensor, block_chunk, meta, skip_ptr, p_sqp, p_squ, p_x,
                               DTYPE0: tl.constexpr, DTYPE1: tl.constexpr, DTYPE2: tl.constexpr,
                               DTYPE3: tl.constexpr, DTYPE4: tl.constexpr, CHECK_SKIP: tl.constexpr,
                               ALIGNED: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, NMETA: tl.constexpr,
                               VB: tl.constexpr):
    # one program per tensor; an FSDP2 shard: Σθ², ΣU² over this rank's bands into its exchange slot
    if CHECK_SKIP:
        if tl.load(skip_ptr) != 0:
            return
    p_meta = meta + tl.program_id(0).to(tl.int64) * NMETA
    o_x, _ = _slot(p_meta, _X_SUMS)
    if o_x >= 0:
        first, tiles = tl.load(p_meta + _FIRST), tl.load(p_meta + _TILES)
        s_p, s_u = _pair_sum(p_sqp + first, p_squ + first, tiles, VB)
        tl.store(p_x + o_x, s_p)
        tl.store(p_x + o_x + 1, s_u)


# parts of the exchange buffer, in the order a sharded step completes them
_PART_COLS, _PART_RBAR, _PART_SUMS = 0, 1, 2
#: ``(device, rows) → int64 [T, 5]`` device tables of shard descriptors; cached, so a step whose
#: layout did not change reuses its tile plans (whose meta holds the descriptors' addresses)
_descriptor_tables = _launcher.LRU()


def _descriptor_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    return _launcher.cached(_descriptor_tables, (device, tuple(map(tuple, rows))), lambda: _launcher._to_device(
        torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 5), device))


class _Exchange(NamedTuple):
    """Where the sums of FSDP2 shards meet across ranks, and the descriptors that point the kernels there.

    A factored matrix (its rows split) has slots for its column sums (``n_c``) and ``Σ R`` (one);
    every shard has ``[Σθ², ΣU²]``. ``descriptors``: one int64 row per tensor, entries ``_X_COLS``
    to ``_G_NUMEL``. ``empty``: ``(tensor, column-sum slot, global rows)`` of the row-split matrices
    whose local shard is empty (no tiles, but a replicated column statistic).
    """

    layout: _distributed.SumLayout
    descriptors: torch.Tensor
    empty: list[tuple[int, int, int]]

    @classmethod
    def of(cls, params: list[torch.Tensor], states: list[dict[str, Any]],
           shards: list[_distributed.ShardSpec]) -> "_Exchange":
        factored = ["exp_avg_sq_row" in s for s in states]
        split = [f and len(sh.global_shape) == 2 for f, sh in zip(factored, shards)]
        sizes = [[sh.global_shape[1] if sp else 0 for sh, sp in zip(shards, split)], [int(sp) for sp in split],
                 [2] * len(shards)]
        layout = _distributed.SumLayout.build(sizes, shards)
        # per tensor: its slot in each part, then the global rows and element count
        rows = [[*(at[i] for at in layout.offsets), sh.global_shape[-2] if f else -1, _distributed.global_numel(p, s)]
                for i, (p, s, sh, f) in enumerate(zip(params, states, shards, factored))]
        empty = [(i, rows[i][_X_COLS], rows[i][_G_ROWS]) for i, (p, sp) in enumerate(zip(params, split))
                 if sp and p.numel() == 0]
        return cls(layout, _descriptor_table(rows, params[0].device), empty)

    def addresses(self) -> list[int]:
        """The meta column ``_SHARD``: the address of each tensor's descriptor."""
        base, row = self.descriptors.data_ptr(), self.descriptors.stride(0) * self.descriptors.element_size()
        return [base + row * i for i in range(self.descriptors.shape[0])]


class _ShardedStep(_Step):
    """A step over FSDP2 shards: :class:`~optimfx._kernels.adafactor._Step` with an exchange buffer,
    plus the fold passes that write this rank's sums into it."""

    def fold_cols(self, g: _Group) -> None:
        if self.exchange.layout.used(_PART_COLS):
            g.plan.launch(adafactor_fold_cols_kernel, self.flag, g.rowcol, self.x, num_warps=STATS_WARPS,
                          CHECK_SKIP=self.check, KC=KC, CB=CB)

    def fold_rbar(self, g: _Group) -> None:
        if self.exchange.layout.used(_PART_RBAR):
            g.plan.launch(adafactor_fold_rbar_kernel, self.flag, g.row_mean, self.x, per_tensor=True,
                          num_warps=SMALL_WARPS, CHECK_SKIP=self.check, RJ=RJ, VB=VB)

    def fold_sums(self, g: _Group) -> None:
        g.plan.launch(adafactor_fold_sums_kernel, self.flag, g.sq_param, g.sq_update, self.x, per_tensor=True,
                      num_warps=SMALL_WARPS, CHECK_SKIP=self.check, VB=VB)

    def empty_columns(self) -> None:
        """The column statistic of a row-split matrix whose shard is empty here: no tile updates it, but
        it is replicated, so it takes, from the same completed column sums, the update the stats pass
        gives it on the other ranks (torch ops in fp32, as the kernel; a skipped step keeps it)."""
        for i, o_x, g_rows in self.exchange.empty:
            col = self.stat_b[i]
            eps_add = 0.0 if self.torch_eps else adafactor._eps1(self.hp, self.params[i].dtype)
            new = self.x[o_x:o_x + col.numel()].div(g_rows).add_(eps_add)
            new = torch.lerp(col, new, self.sc.weight)
            col.copy_(torch.where(self.flag.ne(0), col, new) if self.check else new)


def _on_kernels(shard: _distributed.ShardSpec) -> bool:
    """Whether the kernels take an FSDP2 shard: split on its leading axis only (FSDP2's ``Shard(0)``:
    whole rows of a matrix, whole slices of a batched tensor, a run of a vector; ChildTuning-F masks
    then add the shard's element offset, ``_mask.prepare``). The same answer on every rank."""
    return shard.element_offset is not None


def launch_distributed(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
                        hp: Any, sc: Any, lr: Any, skip_flag: torch.Tensor | None, scan_nonfinite: bool,
                        round_key: int | None) -> None:
    """A launch with FSDP2 shards: the skip flag is agreed across ranks first (a step skipped on one
    rank is skipped on every rank that shares a tensor with it), then whole tensors take the plain
    passes, shards :func:`_launch_shards` and the shards the kernels do not take the reference step.
    Every rank issues the same collectives in the same order."""
    shards = [s.get(_distributed.SHARD_KEY) for s in states]
    if skip_flag is not None:
        if scan_nonfinite:
            checks.raise_if_nonfinite(grads, skip_flag)
        _distributed.any_rank_(skip_flag, shards)
    whole = [i for i, sh in enumerate(shards) if sh is None]
    kernel = [i for i, sh in enumerate(shards) if sh is not None and _on_kernels(sh)]
    other = [i for i, sh in enumerate(shards) if sh is not None and not _on_kernels(sh)]
    for idx, run in ((whole, adafactor.launch), (kernel, _launch_shards), (other, _reference_steps)):
        if idx:
            pick = [[xs[i] for i in idx] for xs in (params, grads, states)]
            run(*pick, hp, sc, lr, skip_flag, round_key=round_key)


def _launch_shards(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]], hp: Any,
                   sc: Any, lr: Any, skip_flag: torch.Tensor | None, round_key: int | None = None) -> None:
    """FSDP2 shards of the leading axis through the five passes on their local shards; between passes
    their sums are folded into the exchange buffer and all-reduced (module docstring). Each pass runs
    on every group before the next one, and a rank whose shard of a tensor is empty (no tiles) still
    takes part in every all-reduce, with zeros."""
    exchange = _Exchange.of(params, states, [s[_distributed.SHARD_KEY] for s in states])
    step = _ShardedStep(params, grads, states, hp, sc, lr, skip_flag, round_key, exchange)
    step.run(step.rowcol, step.fold_cols)
    exchange.layout.sum_(step.x, _PART_COLS)
    step.empty_columns()
    step.run(step.stats, step.fold_rbar)
    exchange.layout.sum_(step.x, _PART_RBAR)
    step.run(step.rms, step.fold_sums)
    exchange.layout.sum_(step.x, _PART_SUMS)
    step.run(step.scale, step.apply)
    step.write_back()


def _reference_steps(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict[str, Any]],
                     hp: Any, sc: Any, lr: Any, skip_flag: torch.Tensor | None, round_key: int | None = None) -> None:
    """Shards the kernels do not take (:func:`_on_kernels`): the reference step, whose means and RMS
    values are all-reduced (``optimfx/_distributed.py``). It decides on the host: it reads the flag,
    a synchronisation the kernels avoid."""
    if skip_flag is not None and bool(skip_flag.ne(0).any()):
        return
    lr_f = float(lr) if isinstance(lr, torch.Tensor) else lr
    with rounding(round_key):
        for p, g, s in zip(params, grads, states):
            ref.step_(p, g, s, hp, sc, lr_f)
