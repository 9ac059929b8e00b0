"""State dicts and param groups of optimizers that wrap a base optimizer (:class:`~optimfx.EGStepSize`,
:class:`~optimfx.ChildTuning`).

A wrapper and its base number the parameters of the same param groups, so each parameter's entry of
the wrapper's state dict holds the wrapper's state and the base's, the latter as ``"base/<key>"``.
One entry per parameter and the param groups are all ``torch.distributed.checkpoint`` keeps: a
separate top-level ``"base"`` state dict would be dropped by its optimizer state-dict helpers.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable, Collection, Iterator

from torch.optim import Optimizer

from .._validation import apply_checks

BASE_PREFIX = "base/"


def refuse_closure_steps(base: Optimizer, owner: str) -> None:
    """A base whose ``step`` needs a closure (``LBFGS`` evaluates the loss and gradients again within
    a step) cannot be wrapped: the wrapper works on the gradients of one evaluation."""
    closure = inspect.signature(base.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(f"{owner}: {type(base).__name__}.step needs a closure (it evaluates the loss and the "
                        f"gradients again within a step), which {owner} cannot drive: it works on the "
                        "gradients of one evaluation")


def share_base_groups(wrapper: Any, own_defaults: dict[str, Any]) -> None:
    """After ``Optimizer.__init__(wrapper, base.param_groups, own_defaults)``: ``wrapper`` shares its
    base's group dicts, so schedulers and ``add_param_group`` act on both, and its ``defaults`` are the
    base's with its own on top (``own_defaults``), since schedulers read ``optimizer.defaults`` as well:
    ``OneCycleLR``/``CyclicLR`` look for ``betas`` or ``momentum`` there, ``transformers``' polynomial
    schedule for ``lr``."""
    wrapper.param_groups = wrapper.base.param_groups
    wrapper.own_defaults = dict(own_defaults)
    wrapper.defaults = {**wrapper.base.defaults, **own_defaults}


def fill_own_defaults(wrapper: Any) -> None:
    """The wrapper's defaults for the keys of its own a group lacks: a group added to the base
    directly, or one of a checkpoint written before an option existed."""
    for group in wrapper.param_groups:
        for key, value in wrapper.own_defaults.items():
            group.setdefault(key, value)


def restore_own_defaults(wrapper: Any) -> None:
    """``__setstate__``: a copy pickled before ``own_defaults`` existed held only its own defaults."""
    if "own_defaults" not in wrapper.__dict__:
        wrapper.own_defaults = dict(wrapper.defaults)
        wrapper.defaults = {**wrapper.base.defaults, **wrapper.own_defaults}


def add_param_group_via_base(wrapper: Any, param_group: dict[str, Any],
                             own_add: Callable[[dict[str, Any]], None]) -> None:
    """``wrapper.add_param_group``: the wrapper checks the keys of its own the group sets
    (``wrapper.group_checks``, ``key → check`` returning the value to store) and fills in its defaults
    for the others, then the base adds the group (its defaults, its checks); wrapper and base share
    the group.

    While ``torch.optim.Optimizer.__init__`` of the wrapper registers the base's existing groups (the
    wrapper does not share the base's list yet), ``own_add`` (``Optimizer.add_param_group``) fills in
    the wrapper's defaults on them.
    """
    apply_checks(param_group, wrapper.group_checks)
    if wrapper.__dict__.get("param_groups") is not wrapper.base.param_groups:
        own_add(param_group)
        return
    # the wrapper's defaults first: where the base has a key of the same name (the ChildTuning
    # adapter's mask options on an optimfx optimizer that masks itself) the wrapper's value counts
    for key, value in wrapper.own_defaults.items():
        param_group.setdefault(key, value)
    wrapper.base.add_param_group(param_group)


def state_dict_with_base(wrapper: Any) -> dict[str, Any]:
    """``Optimizer.state_dict`` of ``wrapper`` with the base's entries added (:func:`with_base_state`)
    before the wrapper's own post-hooks run, so they see (and may rewrite) the whole state."""
    handle = wrapper.register_state_dict_post_hook(lambda opt, sd: with_base_state(opt.base, sd), prepend=True)
    try:
        return Optimizer.state_dict(wrapper)
    finally:
        handle.remove()


#: the attribute a ChildTuning optimizer keeps its pending D masks in (mutated in place on load)
_PENDING = "_pending_gradient_masks"


@contextlib.contextmanager
def unchanged_if_refused(wrapper: Any) -> Iterator[None]:
    """A load that raises leaves ``wrapper`` and its base as they were. ``torch.optim``'s load puts new
    state and group objects in place of the old ones (it never changes the old ones), so the
    attributes taken before are the whole previous state; the pending D masks, which a load clears in
    place, are copied."""
    kept = [(obj, dict(obj.__dict__), dict(obj.__dict__.get(_PENDING, {}))) for obj in (wrapper, wrapper.base)]
    try:
        yield
    except BaseException:
        for obj, attrs, pending in kept:
            had_pending = _PENDING in attrs
            obj.__dict__.clear()
            obj.__dict__.update(attrs)
            if had_pending:
                obj.__dict__[_PENDING].clear()
                obj.__dict__[_PENDING].update(pending)
        raise


def load_with_base_state(wrapper: Any, state_dict: dict[str, Any], own_keys: Collection[str],
                         owner: str) -> dict[str, Any]:
    """``Optimizer.load_state_dict`` of ``wrapper`` on its part of ``state_dict``; the base's part
    (:func:`split_base_state`, taken after the wrapper's own pre-hooks) goes to the base's
    ``load_state_dict``. Returns the wrapper's part as loaded; the wrapper shares the base's param
    groups again afterwards."""
    loaded: dict[str, Any] = {}

    def split(_: Optimizer, saved: dict[str, Any]) -> dict[str, Any]:
        mine, base = split_base_state(saved, own_keys, owner)
        if mine["state"] and not base["state"] and any(wrapper.base.state.values()):
            # torch.distributed.checkpoint rebuilds a flattened optimizer state dict
            # (flatten_optimizer_state_dict=True) from the keys of the wrapper's own state, which
            # leaves out the base's "base/<key>" entries
            raise ValueError(f"{owner}.load_state_dict: the checkpoint holds {owner}'s state but none of its "
                             f"base's ({type(wrapper.base).__name__}), which has state: loading it would lose "
                             "that state. A torch.distributed.checkpoint state dict taken with "
                             "flatten_optimizer_state_dict=True drops it; save and load without that option")
        wrapper.base.load_state_dict(base)
        loaded["state_dict"] = mine
        return mine

    # registered last, it runs after the pre-hooks registered before this call
    handle = wrapper.register_load_state_dict_pre_hook(split)
    try:
        Optimizer.load_state_dict(wrapper, state_dict)
    finally:
        handle.remove()
    wrapper.param_groups = wrapper.base.param_groups
    return loaded["state_dict"]


def with_base_state(base: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with ``base``'s per-parameter state added to each entry (new entry dicts: the
    entries of ``state_dict`` may be the live state)."""
    state = dict(state_dict["state"])
    for key, entry in base.state_dict()["state"].items():
        state[key] = {**state.get(key, {}), **{BASE_PREFIX + k: v for k, v in entry.items()}}
    return {**state_dict, "state": state}


def split_base_state(state_dict: dict[str, Any], own_keys: Collection[str],
                     owner: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(the wrapper's state dict, the base's)`` from a state dict written by :func:`with_base_state`.

    Also reads the older layout with the base's state dict under a top-level ``"base"`` key.

    Raises:
        ValueError: an entry holds keys that are neither ``own_keys`` nor ``"base/<key>"`` (for
            example the base optimizer's own state dict, loaded into the wrapper).
    """
    if "base" in state_dict:
        return {k: v for k, v in state_dict.items() if k != "base"}, state_dict["base"]
    mine: dict[Any, dict[str, Any]] = {}
    base: dict[Any, dict[str, Any]] = {}
    for key, entry in state_dict["state"].items():
        theirs = {k[len(BASE_PREFIX):]: v for k, v in entry.items() if isinstance(k, str) and k.startswith(BASE_PREFIX)}
        own = {k: v for k, v in entry.items() if k in own_keys}
        unknown = set(entry) - set(own) - {BASE_PREFIX + k for k in theirs}
        if unknown:
            raise ValueError(f"{owner}: the state of parameter {key!r} holds {sorted(map(str, unknown))}, "
                             f"neither {owner}'s state nor its base's ('base/<key>'): load what "
                             f"{owner}.state_dict() saved, not the base optimizer's state dict")
        if own:
            mine[key] = own
        if theirs:
            base[key] = theirs
    return {**state_dict, "state": mine}, {"state": base, "param_groups": state_dict["param_groups"]}
