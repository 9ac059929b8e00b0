"""AdaFactor reference vs ``transformers``' Adafactor and ``torch.optim.Adafactor`` where semantics coincide.

Runs in float64 over 25 steps on random problems; both peers compute the same equations in a
different operation order (means of g² vs squared norms, rsqrt of an outer product vs two factors), so
results agree to float64 round-off amplified over the steps: rtol=1e-10 leaves ~5 digits of margin.
"""

from __future__ import annotations

import pytest
import torch

import optimfx

transformers_opt = pytest.importorskip("transformers.optimization")

SHAPES = {
    "vector": [(7,)],
    "tall": [(13, 3)],
    "wide": [(3, 17)],
    "3d": [(2, 5, 4)],
    "conv4d": [(6, 3, 3, 3)],
    "size-one-dims": [(1, 9), (9, 1), (1,), (1, 1)],
    "mixed": [(4, 6), (6,), (2, 3, 5), ()],
}
STEPS = 25
TOL = dict(rtol=1e-10, atol=1e-13)


def _problem(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) * (1 + t % 3) for s in shapes]
             for t in range(STEPS)]
    return init, grads


def _train(make_opt, init, grads):
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = make_opt(params)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], opt


HF_CONFIGS = {
    "paper-defaults": dict(),
    "external-lr": dict(lr=1e-3, relative_step=False, scale_parameter=False),
    "beta1": dict(beta1=0.9),
    "external-lr-beta1-wd": dict(lr=1e-3, relative_step=False, scale_parameter=False, beta1=0.9, weight_decay=0.01),
    "warmup-wd": dict(warmup_init=True, weight_decay=0.1),
}


@pytest.mark.parametrize("shapes", list(SHAPES))
@pytest.mark.parametrize("config", list(HF_CONFIGS))
def test_matches_transformers_adafactor(shapes, config):
    kwargs = HF_CONFIGS[config]
    init, grads = _problem(SHAPES[shapes])
    ours, _ = _train(lambda ps: optimfx.AdaFactor(ps, backend="reference", **kwargs), init, grads)
    theirs, _ = _train(lambda ps: transformers_opt.Adafactor(ps, **kwargs), init, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


TORCH_CONFIGS = {
    "defaults": dict(),
    "lr-wd": dict(lr=3e-3, weight_decay=0.05),
    "eps-d-decay": dict(eps=(1e-20, 1e-2), d=2.0, beta2_decay=-0.5),
}


@pytest.mark.parametrize("shapes", list(SHAPES))
@pytest.mark.parametrize("config", list(TORCH_CONFIGS))
def test_matches_torch_adafactor_in_torch_mode(shapes, config):
    kwargs = TORCH_CONFIGS[config]
    ours_kwargs = dict(lr=kwargs.get("lr", 1e-2), eps=kwargs.get("eps", (None, 1e-3)),
                       clip_threshold=kwargs.get("d", 1.0), decay_rate=kwargs.get("beta2_decay", -0.8),
                       weight_decay=kwargs.get("weight_decay", 0.0),
                       lr_mode="rho_max", eps_mode="torch", decay_mode="torch")
    init, grads = _problem(SHAPES[shapes], seed=1)
    ours, _ = _train(lambda ps: optimfx.AdaFactor(ps, backend="reference", **ours_kwargs), init, grads)
    theirs, _ = _train(lambda ps: torch.optim.Adafactor(ps, **kwargs), init, grads)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("config", list(TORCH_CONFIGS))
def test_torch_adafactor_checkpoint_continues_in_optimfx(config):
    """A ``torch.optim.Adafactor`` checkpoint loaded into an ``AdaFactor`` built with its defaults
    (paper mode): the groups take torch's options, the statistics drop their kept dims, and the run
    continues as torch's own continuation."""
    shapes = SHAPES["mixed"] + SHAPES["conv4d"]
    init, grads = _problem(shapes, seed=2)
    theirs_params = [torch.nn.Parameter(p.clone()) for p in init]
    theirs = torch.optim.Adafactor(theirs_params, **TORCH_CONFIGS[config])
    ours_params = [torch.nn.Parameter(p.clone()) for p in init]
    ours = optimfx.AdaFactor(ours_params, backend="reference")
    half = STEPS // 2
    for t, gs in enumerate(grads):
        if t == half:
            for q, p in zip(ours_params, theirs_params):
                q.data.copy_(p.detach())
            ours.load_state_dict(theirs.state_dict())
            assert ours.param_groups[0]["lr_mode"] == "rho_max" and "d" not in ours.param_groups[0]
        for p, g in zip(theirs_params, gs):
            p.grad = g.clone()
        theirs.step()
        if t >= half:
            for p, g in zip(ours_params, gs):
                p.grad = g.clone()
            ours.step()
    for a, b in zip(ours_params, theirs_params):
        torch.testing.assert_close(a, b, **TOL)
