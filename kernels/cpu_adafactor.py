"""Host side of ``cpu_adafactor.c``: AdaFactor's step in two passes per element (three for 1-D
tensors) for fp32 or bf16 CPU parameters (fp32 maths and state).

The reference takes about ten ATen passes per tensor and step (the squared gradient, its row and
column sums, ``ΣU²``, the update, the parameter), and on many small tensors mostly per-op cost; the
C kernel steps every tensor of a group in one call per pass:

1. reads ``G`` and ``θ``: ``Σθ²``, the rows' new statistics and the column sums of ``G²`` and of
   ``G²/R_i`` (from which ``ΣU²`` follows without another read), and the inf/NaN check of the group;
2. (unfactored tensors only) the second moment ``V`` and ``ΣU²``;
3. reads ``G`` and ``θ`` (and ``M``), writes ``θ`` (and ``M``): the update.

Two short *finishes* per tensor (the statistics and ``ΣU²``; the clip) run in C between them. The
ChildTuning mask is computed where the gradient is loaded. The paper's ε form only
(``eps_mode="paper"`` with ``ε1`` at least the smallest normal fp32 number); everything else takes
the reference.

Scratch per call (cached with the call's layout while it is in use, :data:`_PLANS`): per tensor its
row and column vectors and two column sums per block of rows, at most 1/32 of the parameter's
elements (:func:`block_rows`). With ChildTuning-F masks, each factored tensor also keeps one bit per
element: the next step's mask, drawn by the update pass so that the next first pass reads it
instead of hashing (bits drawn for another step, seed or ``reserve_p`` are not used).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from typing import NamedTuple, Optional, Sequence

import torch

from . import cpu_build, cpu_launcher

Tensor = torch.Tensor
NAME = "cpu_adafactor"
#: elements per block of an unfactored tensor (``CHUNK`` in ``cpu_adafactor.c``)
CHUNK = 16384
#: a factored tensor's blocks hold at least this many rows (the column sums of a block are one
#: row's worth of scratch) and at least :data:`CHUNK` elements
MIN_BLOCK_ROWS = 64
#: mask modes of the kernel
MASK_NONE, MASK_BERNOULLI, MASK_STORED = 0, 1, 2
_SCALE_PARAMETER, _MOMENTUM, _DECAY_TORCH, _MAXIMIZE = 1, 2, 4, 8
# columns of the per-tensor table (the T_* enum of cpu_adafactor.c)
(T_PARAM, T_GRAD, T_ROW, T_COL, T_EXP_AVG, T_MASK, T_OFFSET, T_KEY, T_NUMEL, T_ROWS, T_COLS, T_BLOCK,
 T_A, T_B, T_COLPART, T_PARTS, T_SCALARS, T_PARAM_BF16, T_GRAD_BF16, T_KEEPS, T_NEXT_KEY, T_COLUMNS) = range(22)
#: int64 words before a tensor's F keep bits: the key, threshold and first element's global index
#: they were drawn for (``KEEPS_KEY, KEEPS_THRESHOLD, KEEPS_OFFSET`` in ``cpu_adafactor.c``)
KEEPS_HEADER = 3
_KEEPS_THRESHOLD = 1
#: parameter and gradient dtypes the kernel reads (maths and state in fp32)
DTYPES = (torch.float32, torch.bfloat16)
_PARTS_PER_BLOCK, _SCALARS_PER_TENSOR = 3, 6
_MASK_DTYPES = (torch.uint8, torch.bool)
_LIB = cpu_build.Library(NAME, {
    "optimfx_adafactor_pass": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                ctypes.c_int64], None),
    "optimfx_adafactor_finish": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                  ctypes.c_int64, ctypes.c_int64], ctypes.c_int64),
    "optimfx_adafactor_mask_keys": ([ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                     ctypes.c_int64], None),
})


def available() -> bool:
    """Whether the kernel is built (building it on the first call) and enabled; the F mask's bits
    are read as little-endian 16-bit halves of each pair's hash."""
    return sys.byteorder == "little" and _LIB.available()


_plain = cpu_build.plain


def takes(param: Tensor, grad: Tensor, state: dict, momentum: bool) -> bool:
    """Contiguous CPU tensors, not empty: the parameter and its gradient in fp32 or bf16, its fp32
    state in the layout ``reference.adafactor.init_state`` gives for the group's options
    (``momentum``: ``beta1`` set, so an ``exp_avg`` is needed), a ChildTuning-D mask, if any, of one
    byte per element. Anything else (a state of another shape or dtype loaded from a checkpoint,
    momentum switched on after the state was made) takes the reference, which says what is wrong."""
    shape = param.shape
    if not (_plain(param, DTYPES) and _plain(grad, DTYPES) and grad.shape == shape and param.numel() > 0):
        return False
    if "exp_avg_sq_row" in state:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        if not (_plain(row) and _plain(col) and row.shape == shape[:-1] and col.shape == shape[:-2] + shape[-1:]):
            return False
    elif not (_plain(state["exp_avg_sq"]) and state["exp_avg_sq"].shape == shape):
        return False
    avg = state.get("exp_avg")
    if momentum and avg is None:
        return False
    if avg is not None and not (_plain(avg) and avg.shape == shape):
        return False
    mask = state.get("child_mask")
    return mask is None or (mask.dtype in _MASK_DTYPES and mask.is_cpu and mask.is_contiguous()
                            and mask.numel() == param.numel())


def block_rows(slices: int, rows: int, cols: int) -> int:
    """Rows per block of a factored ``[slices, rows, cols]`` tensor: at least :data:`MIN_BLOCK_ROWS` rows
    and :data:`CHUNK` elements. The blocks of a slice must not reach into the next one: with several
    slices a block is a divisor of ``rows`` (or a whole slice, where no divisor near the target exists)."""
    target = max(MIN_BLOCK_ROWS, -(-CHUNK // cols))
    if rows <= target or slices == 1:
        return min(rows, target)
    divisor = max(d for d in range(1, target + 1) if rows % d == 0)
    return divisor if divisor * 4 >= target else rows


class _Plan(NamedTuple):
    """A call's per-tensor table and scratch, for one layout of tensors."""

    table: Tensor  # int64 [T, T_COLUMNS]
    floats: Tensor  # fp32 scratch: row and column vectors, blocks' column sums
    doubles: Tensor  # float64 scratch: blocks' partial sums, per-tensor scalars
    numels: tuple[int, ...]
    aligns: tuple[int, ...]
    keep_words: tuple[int, ...]  # int64 words of each tensor's F keep bits (0: unfactored, none)
    keeps: list[Tensor]  # the keep bits of every tensor and their threshold words' indices, made by
    # the first F-masked call (else empty)


def _keep_bits(plan: _Plan) -> None:
    """Give the plan's factored tensors their F keep bits (one bit per element, a row's bits in
    whole words: 1/32 of the fp32 elements), headed by a threshold no mask has: not yet drawn."""
    if plan.keeps:
        return
    bits = torch.zeros(max(1, sum(plan.keep_words)), dtype=torch.int64)
    at, thresholds = 0, []
    for k, words in enumerate(plan.keep_words):
        if words:
            thresholds.append(at + _KEEPS_THRESHOLD)
            plan.table[k, T_KEEPS] = bits.data_ptr() + 8 * at
        at += words
    index = torch.tensor(thresholds, dtype=torch.int64)
    bits[index] = -1
    plan.keeps.extend((bits, index))


#: layouts (a layout: the tensors' addresses and shapes) → their plan and the call that last used it
_PLANS: dict[tuple, tuple[_Plan, int]] = {}
#: a plan unused for this many calls is dropped: every param group of a model (each its own layout)
#: keeps its plan while the groups step in turn, and the plans of layouts that will not come back
#: (the state replaced by ``load_state_dict``) are released a few steps later
PLAN_LIFETIME_CALLS = 64
_calls = 0
_plans_lock = threading.Lock()


def free_scratch() -> None:
    """Drop the cached plans and their scratch (the next step builds them again)."""
    with _plans_lock:
        _PLANS.clear()


def _geometry(param: Tensor, factored: bool) -> tuple[int, int, int]:
    """``(rows, cols, block)``: a factored tensor's last two sizes and elements per block; ``(0, 0,
    CHUNK)`` for an unfactored one."""
    if not factored:
        return 0, 0, CHUNK
    rows, cols = param.shape[-2], param.shape[-1]
    slices = param.numel() // (rows * cols)
    return rows, cols, block_rows(slices, rows, cols) * cols


def _plan(params: Sequence[Tensor], states: Sequence[dict]) -> _Plan:
    """The plan of these tensors: cached by their addresses and shapes (the gradients, whose
    addresses change from step to step, are written into the table by each call)."""
    global _calls
    layout = tuple(map(_address, params, states))
    with _plans_lock:
        _calls += 1
        cached = _PLANS.get(layout)
        for key in [k for k, (_, last) in _PLANS.items() if last < _calls - PLAN_LIFETIME_CALLS]:
            del _PLANS[key]
    plan = cached[0] if cached is not None else _build_plan(params, states)
    with _plans_lock:
        _PLANS[layout] = (plan, _calls)
    return plan


def _address(param: Tensor, state: dict) -> tuple[int, ...]:
    """Where a tensor's parameter and state buffers are, and its shape: with :func:`takes` having
    checked the buffers' shapes against the parameter's, the layout of its row of the table."""
    get = state.get
    row, col, avg, mask = get("exp_avg_sq_row"), get("exp_avg_sq_col"), get("exp_avg"), get("child_mask")
    return (param.data_ptr(), param.shape, param.dtype, (row if row is not None else state["exp_avg_sq"]).data_ptr(),
            0 if col is None else col.data_ptr(), 0 if avg is None else avg.data_ptr(),
            0 if mask is None else mask.data_ptr())


def _build_plan(params: Sequence[Tensor], states: Sequence[dict]) -> _Plan:
    geometry = [_geometry(p, "exp_avg_sq_row" in s) for p, s in zip(params, states)]
    float_sizes, double_sizes = [], []
    for p, (rows, cols, block) in zip(params, geometry):
        blocks = -(-p.numel() // block)
        slices = p.numel() // (rows * cols) if cols else 0
        float_sizes.append((slices * rows, slices * cols, blocks * 2 * cols))
        double_sizes.append((blocks * _PARTS_PER_BLOCK, _SCALARS_PER_TENSOR))
    floats = torch.empty(max(1, sum(map(sum, float_sizes))), dtype=torch.float32)
    doubles = torch.empty(sum(map(sum, double_sizes)), dtype=torch.float64)
    f_at, d_at = floats.data_ptr(), doubles.data_ptr()
    rows_out = []
    for p, s, (rows, cols, block), fs, ds in zip(params, states, geometry, float_sizes, double_sizes):
        row = s.get("exp_avg_sq_row", s.get("exp_avg_sq"))
        col, avg, mask = s.get("exp_avg_sq_col"), s.get("exp_avg"), s.get("child_mask")
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        a, b, colpart = f_at, f_at + 4 * fs[0], f_at + 4 * (fs[0] + fs[1])
        f_at += 4 * sum(fs)
        parts, scalars = d_at, d_at + 8 * ds[0]
        d_at += 8 * sum(ds)
        rows_out.append((p.data_ptr(), 0, row.data_ptr(), ptr(col), ptr(avg), ptr(mask), 0, 0,
                         p.numel(), rows, cols, block, a, b, colpart, parts, scalars,
                         int(p.dtype is torch.bfloat16), 0, 0, 0))
    table = torch.tensor(rows_out, dtype=torch.int64).reshape(-1, T_COLUMNS)
    keep_words = tuple(KEEPS_HEADER + (p.numel() // cols) * -(-cols // 64) if cols else 0
                       for p, (_, cols, _) in zip(params, geometry))
    return _Plan(table, floats, doubles, tuple(p.numel() for p in params), tuple(blk for _, _, blk in geometry),
                 keep_words, [])


class Options(NamedTuple):
    """A step's scalars and switches (host floats in float64)."""

    weight: float  # w_t, the EMA weight of the new statistic
    eps1: float
    eps2: float
    clip_threshold: float
    step: float  # ρ_t times the lr: α_t before the parameter scale
    lr: float  # the group's lr (torch's decay mode)
    weight_decay: float
    beta1: Optional[float]
    scale_parameter: bool
    decay_torch: bool
    maximize: bool


class FMask(NamedTuple):
    """A step's ChildTuning-F masks: the words of their keys (:func:`optimfx.reference.child_tuning.mask_key`
    of each tensor's stream) and the keep rule. Every tensor is whole (the kernel takes no shards):
    its elements' global indices start at 0."""

    seed_word: int  # s0 of the seed
    step_word: int  # b of the step
    next_step_word: int  # b of the step after it (pass 3 draws that step's mask ahead)
    streams: Tensor  # int64 [T]: each tensor's mask stream
    threshold: int
    keep_scale: float


def step(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[dict], options: Options, *,
         check_finite: bool, f_mask: Optional[FMask] = None, stored_masks: bool = False) -> bool:
    """One AdaFactor step of every tensor (all taken by :func:`takes`, with :func:`available` true);
    returns ``False``, having written nothing, when ``check_finite`` and a gradient holds inf/NaN.

    ``f_mask`` draws ChildTuning-F masks (their keys formed in C from the tensors' streams);
    ``stored_masks`` reads each state's ChildTuning-D ``child_mask`` (a tensor without one is
    unmasked). ``grads`` are only read.
    """
    plan = _plan(params, states)
    table = plan.table
    # the gradients' addresses and dtypes change from step to step
    table[:, T_GRAD] = torch.tensor([g.data_ptr() for g in grads], dtype=torch.int64)
    table[:, T_GRAD_BF16] = torch.tensor([g.dtype is torch.bfloat16 for g in grads], dtype=torch.int64)
    mask_mode, threshold, keep_scale = (MASK_STORED if stored_masks else MASK_NONE), 0, 1.0
    if f_mask is not None:
        mask_mode, threshold, keep_scale = MASK_BERNOULLI, f_mask.threshold, f_mask.keep_scale
        streams = f_mask.streams.to(torch.int64).contiguous()
        _keep_bits(plan)
        keys = _LIB.function("optimfx_adafactor_mask_keys")
        for column, word in ((T_KEY, f_mask.step_word), (T_NEXT_KEY, f_mask.next_step_word)):
            keys(streams.data_ptr(), len(params), f_mask.seed_word, word, table.data_ptr() + 8 * column, T_COLUMNS)
    o = options
    scalars = (ctypes.c_double * 9)(o.weight, o.eps1, o.eps2, o.clip_threshold, o.step, o.lr, o.weight_decay,
                                    0.0 if o.beta1 is None else o.beta1, keep_scale)
    flags = ((_SCALE_PARAMETER if o.scale_parameter else 0) | (_MOMENTUM if o.beta1 is not None else 0)
             | (_DECAY_TORCH if o.decay_torch else 0) | (_MAXIMIZE if o.maximize else 0)
             | (mask_mode << 8) | (threshold << 16))
    pass_fn, finish_fn = _LIB.function("optimfx_adafactor_pass"), _LIB.function("optimfx_adafactor_finish")
    threads = _LIB.threads(sum(plan.numels))
    table_ptr, n_tensors = ctypes.c_void_p(table.data_ptr()), len(params)

    def run_pass(number: int) -> None:
        cpu_launcher.run(pass_fn, _LIB.openmp, table, plan.numels, number, scalars, flags, align=plan.aligns)

    run_pass(1)
    second_pass = finish_fn(table_ptr, n_tensors, 1, scalars, flags, int(check_finite), threads)
    if second_pass < 0:
        return False
    if second_pass:
        run_pass(2)
    finish_fn(table_ptr, n_tensors, 2, scalars, flags, 0, threads)
    run_pass(3)
    if f_mask is not None:  # the next step's keep bits are drawn: they may be read
        plan.keeps[0][plan.keeps[1]] = f_mask.threshold
    cpu_build.written([*params, *(s[k] for s in states for k in _STATE_BUFFERS if k in s)])
    return True


_STATE_BUFFERS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg")
