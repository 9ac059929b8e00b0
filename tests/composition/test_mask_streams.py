"""``optimfx.set_mask_streams``: ChildTuning-F masks keyed by the model's numbering, not the optimizer's.

The case it exists for: optimizers that each hold part of a model's parameters (each rank's partition
optimizer of ``ZeroRedundancyOptimizer``; ``tests/distributed/test_zero_fsdp1.py`` runs the real
thing). Here two optimizers over the halves of a parameter list must step exactly as one optimizer
over the whole list once the parameters are numbered, and must not without it.
"""

from __future__ import annotations

import gc

import pytest
import torch

import optimfx
from optimfx.optim import mask_streams

SHAPES = [(6, 5), (5,), (4, 3), (3,)]
STEPS = 4

MAKERS = {
    "childtuning-adamw": lambda ps: optimfx.ChildTuningAdamW(ps, lr=1e-2, mode="ChildTuning-F", reserve_p=0.5),
    "adafactor": lambda ps: optimfx.AdaFactor(ps, child_tuning_mode="F", reserve_p=0.5, seed=3),
    "adax": lambda ps: optimfx.AdaX(ps, lr=1e-2, child_tuning_mode="F", reserve_p=0.3, seed=5),
    "adapter-sgd": lambda ps: optimfx.ChildTuning(torch.optim.SGD(ps, lr=0.1, momentum=0.9), "F", 0.5, seed=7),
}


def _problem():
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) for s in SHAPES] for _ in range(STEPS)]
    return init, grads


def _train(make, partitions, init, grads, number):
    """Parameters from ``init``, stepped by one optimizer per index list of ``partitions``."""
    params = [torch.nn.Parameter(x.clone()) for x in init]
    if number:
        optimfx.set_mask_streams(params)
    opts = [make([params[i] for i in part]) for part in partitions]
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        for opt in opts:
            opt.step()
    return params, opts


@pytest.mark.parametrize("name", list(MAKERS))
def test_numbered_partitions_step_as_one_optimizer(name):
    init, grads = _problem()
    whole, _ = _train(MAKERS[name], [[0, 1, 2, 3]], init, grads, number=False)
    split, _ = _train(MAKERS[name], [[0, 1], [2, 3]], init, grads, number=True)
    for a, b in zip(whole, split):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(MAKERS))
def test_without_numbering_a_partition_draws_other_masks(name):
    init, grads = _problem()
    whole, _ = _train(MAKERS[name], [[0, 1, 2, 3]], init, grads, number=False)
    split, _ = _train(MAKERS[name], [[0, 1], [2, 3]], init, grads, number=False)
    assert all(torch.equal(a, b) for a, b in zip(whole[:2], split[:2]))  # the first half: same positions
    assert not torch.equal(whole[2], split[2])  # the second half is numbered 0, 1 by its own optimizer


@pytest.mark.parametrize("name", ["childtuning-adamw", "adapter-sgd"])
def test_the_stream_is_fixed_at_the_first_step_and_checkpointed(name):
    init, grads = _problem()
    params, (opt,) = _train(MAKERS[name], [[2, 3]], init, grads[:1], number=False)
    optimfx.set_mask_streams(list(reversed(params)))  # later numbers do not move a stepped parameter
    for p, g in zip(params, grads[1]):
        p.grad = g.clone()
    opt.step()
    streams = {key: int(entry["mask_stream"]) for key, entry in opt.state_dict()["state"].items()}
    assert streams == {0: 0, 1: 1}


def test_param_groups_are_numbered_in_order():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    optimfx.set_mask_streams([{"params": [a, b]}, {"params": [c]}])
    assert [mask_streams.stream_of(p, 99) for p in (a, b, c)] == [0, 1, 2]
    assert mask_streams.stream_of(torch.nn.Parameter(torch.zeros(2)), 99) == 99  # not numbered: position


def test_bad_input_is_refused():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="set_mask_streams: expected tensors"):
        optimfx.set_mask_streams([p, 3])
    with pytest.raises(ValueError, match="appears more than once"):
        optimfx.set_mask_streams([p, p])
    assert mask_streams.stream_of(p, 7) == 7  # a refused call numbers nothing


def test_numbers_do_not_keep_parameters_alive():
    before = len(mask_streams._ASSIGNED)
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(5)]
    optimfx.set_mask_streams(params)
    assert len(mask_streams._ASSIGNED) == before + 5
    del params
    gc.collect()
    assert len(mask_streams._ASSIGNED) == before
