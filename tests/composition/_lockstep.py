"""The resume check the wrapper tests share."""

from __future__ import annotations

import torch


def assert_step_alike(ref_params, ref_opt, params, opt, grads) -> None:
    """``ref_opt`` (over ``ref_params``) and ``opt`` (over ``params``, equal values) take the same
    steps on ``grads``, bit for bit."""
    for gs in grads:
        for a, b, g in zip(ref_params, params, gs):
            a.grad, b.grad = g.clone(), g.clone()
        ref_opt.step()
        opt.step()
    for a, b in zip(ref_params, params):
        assert torch.equal(a, b)


def assert_resumes_in_lockstep(make, ref_params, ref_opt, saved, grads) -> None:
    """A fresh optimizer ``make(params)`` loaded from ``saved`` at the parameters' values takes the same
    steps on ``grads`` as ``ref_opt`` continuing, bit for bit."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    opt = make(params)
    opt.load_state_dict(saved)
    assert_step_alike(ref_params, ref_opt, params, opt, grads)
