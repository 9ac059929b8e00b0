r"""optimfx under ``torch.distributed``: DTensor (FSDP2) parameters, sharded reductions, FSDP1 detection.

FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) hands the optimizer DTensor parameters whose
local tensors are row blocks of the global tensor (``Shard(0)``, ``torch.chunk`` semantics: uneven,
possibly empty). optimfx steps the local tensors, so every backend (and every Triton kernel) sees
plain tensors, and:

* **state is created as DTensors** with placements derived from the parameter's: a buffer shaped like
  the parameter gets its placements; a statistic that averages the parameter over one axis
  (``FxOptimizer.reduced_state_axes``: AdaFactor's row and column statistics) is replicated along a
  mesh dimension that shards that axis, and sharded on the matching axis otherwise. For a 2-D weight
  ``(R, C)`` on ``Shard(0)``: row statistic ``(R,)`` → ``Shard(0)``, column statistic ``(C,)`` →
  ``Replicate()``. DCP (``torch.distributed.checkpoint``) saves and reshards them like parameters.
  Other state (the ``int64`` step counter, stream ids) stays a plain tensor, equal on every rank.
* **shape-dependent decisions use the global shape** (whether AdaFactor factors, RMS denominators).
* **reductions over a sharded axis are completed across ranks**: the reference computes the local
  partial sum and :func:`mean`, :func:`mean_sq` and :func:`rms` all-reduce it over the process group
  of the mesh dimension that shards the axis, then divide by the *global* count:

  .. math::

      \mathrm{mean}_i\,x_{ij} = \frac{1}{R}\sum_{r}\sum_{i \in \mathrm{rows}(r)} x_{ij},\qquad
      \mathrm{RMS}(x) = \Big(\frac{1}{n}\sum_r \sum_{k \in \mathrm{shard}(r)} x_k^2\Big)^{1/2}

  Empty local shards contribute zeros, so every rank issues the same collectives in the same order.
  A local tensor's :class:`ShardSpec` reaches the algorithm under :data:`SHARD_KEY` in its state dict
  (the per-step local view, never the stored state). Per-tensor sums that are not means (EG's
  ``⟨ν, g⟩``, ``‖ν‖²``, ``‖g‖²``, ``‖m‖²``) are completed by :func:`sum_rows_`, one all-reduce for
  every tensor split over the same groups. Multi-pass kernels (AdaFactor's) lay their partial sums
  out in a flat buffer with :class:`SumLayout` and complete one part of it between two passes.
* **the non-finite check is global**: a step is skipped on every rank when any rank's shard holds
  inf/NaN (one flag all-reduce and one host read per parameter group and step).

FSDP1 (``FullyShardedDataParallel``) and DeepSpeed ZeRO hand the optimizer flat 1-D partitions
instead; :func:`warn_flat_parameters` detects FSDP1's ``FlatParameter`` and
:func:`warn_replaced_parameter` the flat fp32 partitions DeepSpeed writes into the optimizer's param
groups (shape-dependent optimizers call both).

References:
    Zhao et al, `PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel
    <https://arxiv.org/abs/2304.11277>`_, 2023; the ``fully_shard`` and DTensor documentation.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

Tensor = torch.Tensor

#: key of a local tensor's :class:`ShardSpec` in the state dict an algorithm receives
SHARD_KEY = "__shard__"


def _dtensor_type() -> Optional[type]:
    # no DTensor can exist before its module is imported: a single-process run never imports it
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a :class:`torch.distributed.tensor.DTensor` (FSDP2 parameters, their grads)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


@dataclass(frozen=True)
class ShardSpec:
    """Where a local tensor sits in its global tensor.

    Attributes:
        global_shape: shape of the global tensor.
        axes: one ``(axis, process group)`` per sharded mesh dimension: the tensor axis it splits and
            the group of the ranks that hold the pieces.
        element_offset: index, in the global tensor's row-major order, of the local tensor's first
            element when the local elements are one contiguous run of it (sharding on the leading
            axis, FSDP2's ``Shard(0)``); ``None`` otherwise. Counter-based ChildTuning masks use it
            to draw each element's global mask bit.
    """

    global_shape: tuple[int, ...]
    axes: tuple[tuple[int, Any], ...]
    element_offset: Optional[int] = None

    def groups(self, axis: Optional[int] = None) -> list[Any]:
        """Process groups that split ``axis`` (every sharded axis when ``None``)."""
        if axis is not None:
            axis = axis % len(self.global_shape)
        return [g for a, g in self.axes if axis is None or a == axis]

    def reduced(self, axis: int) -> Optional["ShardSpec"]:
        """The spec of a reduction over ``axis`` (``keepdim=False``); ``None`` when nothing stays sharded.

        A reduction over a sharded axis is completed across ranks, so its result is replicated there.
        """
        axis = axis % len(self.global_shape)
        axes = tuple((a - (a > axis), g) for a, g in self.axes if a != axis)
        shape = self.global_shape[:axis] + self.global_shape[axis + 1:]
        return ShardSpec(shape, axes) if axes else None


def global_numel(local: Tensor, state: Mapping[str, Any]) -> int:
    """Element count of the global tensor whose local piece is ``local`` (its state view tells)."""
    shard = state.get(SHARD_KEY)
    return local.numel() if shard is None else math.prod(shard.global_shape)


def _all_reduce_(t: Tensor, groups: Sequence[Any], op: Any = None) -> Tensor:
    import torch.distributed as dist

    for group in groups:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t


def _distinct_groups(shards: Sequence[Optional[ShardSpec]]) -> list[tuple[list[Any], list[int]]]:
    """The distinct sets of process groups of ``shards``, in order of first appearance, each with the
    indices of the shards split over it (``None`` entries, unsharded tensors, belong to none)."""
    sets: list[tuple[list[Any], list[int]]] = []
    for i, shard in enumerate(shards):
        if shard is None:
            continue
        groups = shard.groups()
        for known, members in sets:
            if len(known) == len(groups) and all(a is b for a, b in zip(known, groups)):
                members.append(i)
                break
        else:
            sets.append((groups, [i]))
    return sets


def sum_rows_(rows: Tensor, shards: Sequence[Optional[ShardSpec]]) -> Tensor:
    """Complete per-tensor partial sums across ranks, in place.

    Row ``i`` of ``rows`` (``[T, k]``) holds sums over this rank's shard of tensor ``i``; it becomes
    the sums over the whole tensor (a sum is the sum of the ranks' partial sums). Rows of tensors split
    over the same process groups go in one all-reduce, the sets in order of first appearance, which
    is the same on every rank (every rank lists the same tensors in the same order); rows of
    unsharded tensors (``None``) stay as they are.
    """
    for groups, members in _distinct_groups(shards):
        index = torch.tensor(members, device=rows.device)
        rows.index_copy_(0, index, _all_reduce_(rows.index_select(0, index), groups))
    return rows


def any_rank_(flag: Tensor, shards: Sequence[Optional[ShardSpec]]) -> Tensor:
    """``flag`` (a device tensor, nonzero: raised) raised on every rank whose tensors share a process
    group with a rank where it is raised; an all-reduce, no host read (nothing without shards)."""
    groups: list[Any] = []
    for known, _ in _distinct_groups(shards):
        groups.extend(g for g in known if all(g is not seen for seen in groups))
    if not groups:
        return flag
    import torch.distributed as dist

    return _all_reduce_(flag, groups, dist.ReduceOp.MAX)


@dataclass(frozen=True)
class SumLayout:
    """Slots of per-tensor partial sums in one flat buffer, in parts completed across ranks one at a time.

    A multi-pass kernel step writes this rank's partial sums of each sharded tensor into the tensor's
    slot of a part, :meth:`sum_` all-reduces the part, and the next pass reads sums over every rank.
    Every rank builds the layout from the same tensors in the same order, with slot sizes that depend
    on global shapes only, so offsets and collectives agree across ranks; an empty local shard keeps
    its slots and adds zeros. Within a part the slots of tensors split over the same process groups
    are adjacent: a part costs one all-reduce per distinct set of groups.

    Attributes:
        offsets: ``offsets[k][i]``, where tensor ``i``'s slot in part ``k`` starts; ``-1``: none.
        ranges: per part, ``(groups, start, end)`` of each set of process groups, in the order of
            :func:`sum_rows_`.
        size: elements of the buffer.
    """

    offsets: tuple[tuple[int, ...], ...]
    ranges: tuple[tuple[tuple[tuple[Any, ...], int, int], ...], ...]
    size: int

    @classmethod
    def build(cls, sizes: Sequence[Sequence[int]], shards: Sequence[Optional[ShardSpec]]) -> "SumLayout":
        """``sizes[k][i]``: elements of tensor ``i``'s slot in part ``k`` (0: none); ``shards[i]``: its spec
        (``None``: a whole tensor, which gets no slot)."""
        sets = _distinct_groups(shards)
        offsets, ranges, end = [], [], 0
        for part in sizes:
            at, spans = [-1] * len(shards), []
            for groups, members in sets:
                start = end
                for i in members:
                    if part[i]:
                        at[i], end = end, end + part[i]
                spans.append((tuple(groups), start, end))
            offsets.append(tuple(at))
            ranges.append(tuple(spans))
        return cls(tuple(offsets), tuple(ranges), end)

    def used(self, part: int) -> bool:
        """Whether part ``part`` has a slot (the same answer on every rank)."""
        return any(end > start for _, start, end in self.ranges[part])

    def sum_(self, flat: Tensor, part: int) -> Tensor:
        """Complete part ``part`` of ``flat`` in place: each slot becomes the sum of the ranks' slots."""
        for groups, start, end in self.ranges[part]:
            if end > start:
                _all_reduce_(flat[start:end], groups)
        return flat


def mean(x: Tensor, dim: int, shard: ShardSpec, keepdim: bool = False) -> Tensor:
    """``x.mean(dim)`` of the global tensor, from this rank's local ``x``."""
    total = _all_reduce_(x.sum(dim=dim, keepdim=keepdim), shard.groups(dim))
    return total.div_(shard.global_shape[dim])


def mean_sq(x: Tensor, dim: int, shard: ShardSpec) -> Tensor:
    """``mean(x², dim)`` of the global tensor, without a full-size ``x²`` temporary."""
    total = _all_reduce_(torch.linalg.vector_norm(x, dim=dim).square_(), shard.groups(dim))
    return total.div_(shard.global_shape[dim])


def rms(x: Tensor, shard: ShardSpec) -> Tensor:
    """RMS over every element of the global tensor (a 0-d tensor, equal on every rank)."""
    total = _all_reduce_(torch.linalg.vector_norm(x).square_(), shard.groups())
    return total.div_(math.prod(shard.global_shape)).sqrt_()


# ---- placement of state -------------------------------------------------------------------------

def _spec(p: Any) -> Optional[ShardSpec]:
    mesh = p.device_mesh
    axes = tuple((pl.dim % p.ndim, mesh.get_group(i)) for i, pl in enumerate(p.placements) if pl.is_shard())
    return ShardSpec(tuple(p.shape), axes, _element_offset(p, axes)) if axes else None


def _element_offset(p: Any, axes: tuple[tuple[int, Any], ...]) -> Optional[int]:
    """The global row-major index of the local shard's first element, when the shard is a contiguous
    run of the global tensor (only the leading axis is split)."""
    if any(axis != 0 for axis, _ in axes):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return int(offset[0]) * math.prod(p.shape[1:]) if p.ndim else 0


def _state_placements(p: Any, key: str, shape: Sequence[int],
                      reduced_axes: Mapping[str, int]) -> Optional[tuple]:
    """Placements of state ``key`` (global ``shape``) of DTensor ``p``; ``None``: a plain tensor."""
    from torch.distributed.tensor import Replicate, Shard

    if key in reduced_axes and p.ndim > 0:
        axis = reduced_axes[key] % p.ndim
        if tuple(shape) != tuple(p.shape[:axis]) + tuple(p.shape[axis + 1:]):
            return None
        out = []
        for pl in p.placements:
            if not pl.is_shard():
                out.append(Replicate())
            elif type(pl) is not Shard:
                raise NotImplementedError(f"optimfx: state {key!r} of a parameter with placement {pl} "
                                          "(only Shard and Replicate placements are supported)")
            else:
                d = pl.dim % p.ndim
                out.append(Replicate() if d == axis else Shard(d - (d > axis)))
        return tuple(out)
    if len(shape) > 0 and tuple(shape) == tuple(p.shape):
        return tuple(p.placements)
    return None


def _local_zeros(p: Any, shape: Sequence[int], dtype: torch.dtype, placements: tuple) -> Any:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, _ = compute_local_shape_and_global_offset(shape, p.device_mesh, placements)
    local = torch.zeros(local_shape, dtype=dtype, device=p.to_local().device)
    return DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def _distribute(p: Any, value: Tensor, placements: tuple) -> Any:
    """A plain global-shaped state tensor (set by the user, or loaded) cut into this rank's piece."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(value.shape, p.device_mesh, placements)
    index = tuple(slice(o, o + n) for o, n in zip(offset, local_shape))
    local = value[index].to(p.to_local().device).clone()
    return DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=value.shape,
                              stride=torch.empty(value.shape, device="meta").stride())


def init_state(init: Callable[[Any, Any], dict], param: Any, hyper: Any,
               reduced_axes: Mapping[str, int]) -> dict:
    """``init(param, hyper)``; for a DTensor parameter, the same buffers as DTensors, allocated per shard.

    ``init`` runs on a meta tensor of the *global* shape, so shape-dependent choices (AdaFactor's
    factoring) are the single-process ones and no rank allocates a full-size buffer. optimfx state
    buffers start at zero, which is what is allocated here.
    """
    if not is_dtensor(param):
        return init(param, hyper)
    proto = init(torch.empty(param.shape, dtype=param.dtype, device="meta"), hyper)
    out = {}
    for key, value in proto.items():
        placements = _state_placements(param, key, value.shape, reduced_axes)
        if placements is None:
            out[key] = torch.zeros(value.shape, dtype=value.dtype, device=param.to_local().device)
        else:
            out[key] = _local_zeros(param, value.shape, value.dtype, placements)
    return out


def local_group(params: list[Tensor], grads: list[Tensor], states: list[dict],
                reduced_axes: Mapping[str, int]) -> Optional[tuple[list[Tensor], list[Tensor], list[dict]]]:
    """Local views of a group's tensors, or ``None`` when no parameter is a DTensor.

    Returns ``(params, grads, states)``: local parameter and gradient tensors (views: in-place
    updates reach the DTensors) and, per tensor, a state dict of local views plus the tensor's
    :class:`ShardSpec` under :data:`SHARD_KEY` when it is sharded. Plain global-shaped state of a
    DTensor parameter (a ChildTuning mask set from a full tensor, a state dict loaded without DCP) is
    first converted, in the stored state, to a DTensor with the placement it would have been created with.
    """
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(p, dtensor) for p in params):
        return None
    local_params, local_grads, local_states = [], [], []
    for p, g, state in zip(params, grads, states):
        if not is_dtensor(p):
            local_params.append(p)
            local_grads.append(g)
            local_states.append(state)
            continue
        if not is_dtensor(g):
            raise RuntimeError("optimfx: a DTensor parameter has a plain-tensor gradient; set gradients "
                               "as DTensors with the parameter's mesh")
        if tuple(g.placements) != tuple(p.placements):
            g = g.redistribute(p.device_mesh, p.placements)
        view: dict[str, Any] = {}
        for key, value in list(state.items()):
            if isinstance(value, Tensor) and not is_dtensor(value) and key != "step":
                placements = _state_placements(p, key, value.shape, reduced_axes)
                if placements is not None:
                    value = state[key] = _distribute(p, value, placements)
            view[key] = value.to_local() if is_dtensor(value) else value
        spec = _spec(p)
        if spec is not None:
            view[SHARD_KEY] = spec
        local_params.append(p.to_local())
        local_grads.append(g.to_local())
        local_states.append(view)
    return local_params, local_grads, local_states


def all_finite(local_grads: list[Tensor], states: list[dict]) -> bool:
    """Whether every rank's gradients are finite (all-reduced over the groups that shard them)."""
    from ._dispatch import all_finite as local_all_finite

    bad = torch.tensor([0.0 if local_all_finite(local_grads) else 1.0],
                       device=local_grads[0].device if local_grads else "cpu")
    return not bool(any_rank_(bad, [state.get(SHARD_KEY) for state in states]).item())


# ---- flat parameters (FSDP1, ZeRO) --------------------------------------------------------------

def is_flat_parameter(p: Tensor) -> bool:
    """FSDP1's ``FlatParameter`` (``use_orig_params=False``), or a view of one (``use_orig_params=True``)."""
    return bool(getattr(p, "_is_flat_param", False) or getattr(p, "_fsdp_flattened", False))


def warn_replaced_parameter(p: Tensor, name: str) -> None:
    """Warn about a group of 1-D tensors the optimizer was never given, where it was given matrices:
    DeepSpeed's ZeRO stages 1–3 build the optimizer on the model's parameters, then overwrite each
    group's ``"params"`` with a flat fp32 partition of their concatenation
    (``param_group["params"] = [partition]``), so a shape-dependent optimizer first meets it at its
    first step. The caller decides (and warns once per optimizer); ``p`` is the group's largest tensor."""
    warnings.warn(
        f"{name}: a parameter group holds a 1-D tensor of {p.numel()} elements that was not among the "
        "parameters given to the optimizer: its param groups were rewritten in place, as DeepSpeed ZeRO "
        "(stages 1, 2 and 3) does when it replaces each group's parameters with a flat partition of their "
        f"concatenation. {name} cannot factor such a partition: it keeps a full-size, unfactored "
        "statistic, and its RMS-based parameter scale and update clipping see this rank's slice of the "
        "concatenation instead of each weight matrix. For factored statistics shard with FSDP2 "
        "(torch.distributed.fsdp.fully_shard) or use DDP or torch.distributed.optim.ZeroRedundancyOptimizer, "
        "which keep whole parameters.",
        UserWarning, stacklevel=6)


def warn_flat_parameters(params: Sequence[Tensor], name: str) -> bool:
    """Warn (once per call site and process) when a shape-dependent optimizer gets FSDP1 flat parameters."""
    if not any(is_flat_parameter(p) for p in params):
        return False
    warnings.warn(
        f"{name}: the parameters are FSDP1 flat parameters (FullyShardedDataParallel flattens and "
        "concatenates a module's parameters into one 1-D buffer and gives each rank a slice of it), so "
        f"{name} cannot factor its second moment: it keeps a full-size, unfactored statistic, and its "
        "RMS-based parameter scale and update clipping see this rank's slice of the concatenation "
        "instead of each weight matrix. use_orig_params=True does not restore the shapes (the "
        "optimizer then sees 1-D slices as well). For factored statistics shard with FSDP2 "
        "(torch.distributed.fsdp.fully_shard, whose DTensor parameters keep their shapes), or use DDP "
        "or torch.distributed.optim.ZeroRedundancyOptimizer, which keep whole parameters. "
        "DeepSpeed ZeRO partitions have the same limitation.",
        UserWarning, stacklevel=3)
    return True
