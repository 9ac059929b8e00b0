"""``torch.optim.Adafactor`` checkpoints, read into :class:`~optimfx.AdaFactor`'s layout.

``torch.optim.Adafactor`` saves, per param group, ``lr`` (the cap of the relative step),
``beta2_decay``, ``eps = (ε1 or None, ε2)``, ``d``, ``weight_decay``, ``maximize`` and ``foreach``, and
per parameter ``row_var`` ``[..., n, 1]``, ``col_var`` ``[..., 1, m]`` or ``variance``, and a float
``step``. Each of its groups becomes the option set that reproduces its step (``lr_mode="rho_max"``,
``eps_mode="torch"``, ``decay_mode="torch"``; ``AdaFactor``'s note), and its statistics drop their
kept dimension: they are optimfx's ``exp_avg_sq_row``/``exp_avg_sq_col``/``exp_avg_sq`` in that mode.
(``transformers``' checkpoints already use optimfx's keys; ``AdaFactor.__setstate__`` reads their lr.)
"""

from __future__ import annotations

from typing import Any

#: torch's state key → (optimfx's key, the kept dimension to drop or None)
TORCH_STATE_KEYS = {"row_var": ("exp_avg_sq_row", -1), "col_var": ("exp_avg_sq_col", -2),
                    "variance": ("exp_avg_sq", None)}
#: the options that make optimfx's step torch's (the rest of a torch group maps by name)
TORCH_MODE = dict(relative_step=True, scale_parameter=True, warmup_init=False, beta1=None,
                  min_dim_size_to_factor=None, beta2_cap=None, lr_mode="rho_max", eps_mode="torch",
                  decay_mode="torch")


def is_torch_group(group: dict[str, Any]) -> bool:
    """A param group saved by ``torch.optim.Adafactor`` (its ``d`` and ``beta2_decay``, none of ours)."""
    return "d" in group and "beta2_decay" in group and "lr_mode" not in group


def from_torch(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with every group and parameter entry written by ``torch.optim.Adafactor`` in
    optimfx's layout (a new dict; anything else passes through unchanged)."""
    groups, torch_params = [], set()
    for group in state_dict["param_groups"]:
        if not is_torch_group(group):
            groups.append(group)
            continue
        renamed = dict(clip_threshold=group["d"], decay_rate=group["beta2_decay"])
        group = {k: v for k, v in group.items() if k not in ("d", "beta2_decay", "foreach")}
        group.update(TORCH_MODE, **renamed)
        torch_params.update(group["params"])
        groups.append(group)
    if not torch_params:
        return state_dict
    state = {}
    for key, entry in state_dict["state"].items():
        if key in torch_params:
            entry = dict(_renamed(name, value) for name, value in entry.items())
        state[key] = entry
    return {**state_dict, "state": state, "param_groups": groups}


def _renamed(name: str, value: Any) -> tuple[str, Any]:
    if name not in TORCH_STATE_KEYS:
        return name, value
    new_name, kept_dim = TORCH_STATE_KEYS[name]
    return new_name, value if kept_dim is None else value.squeeze(kept_dim)
