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


def _numbers(params: list[torch.Tensor]) -> list[int]:
    return mask_streams.assign_streams(params, [None] * len(params))


def _fresh(n: int) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(2)) for _ in range(n)]


def test_every_form_an_optimizer_accepts_is_numbered_in_order():
    a, b, c, d = _fresh(4)
    optimfx.set_mask_streams([{"params": [a, b]}, {"params": c}, {"params": [("head.bias", d)]}])
    assert _numbers([a, b, c, d]) == [0, 1, 2, 3]
    model = torch.nn.Linear(3, 2)
    optimfx.set_mask_streams(model.named_parameters())
    assert _numbers([model.bias, model.weight]) == [1, 0]  # numbers follow the model, not the optimizer
    e = torch.nn.Parameter(torch.zeros(2))
    optimfx.set_mask_streams(e)  # a lone tensor, as torch.optim.SGD(tensor) accepts
    assert _numbers([b, e]) == [1, 0]


def test_unnumbered_parameters_come_after_the_largest_number_in_a_mixed_optimizer():
    numbered, extra = _fresh(3), _fresh(2)
    optimfx.set_mask_streams(numbered)
    assert _numbers(extra) == [0, 1]  # none numbered: positions, as by default
    assert _numbers([extra[0], numbered[2], extra[1], numbered[0]]) == [3, 2, 5, 0]


def test_a_stream_taken_twice_in_one_optimizer_is_renumbered_with_a_warning():
    first, second = _fresh(2), _fresh(2)
    optimfx.set_mask_streams(first)
    optimfx.set_mask_streams(second)  # two separate numberings, both from 0
    with pytest.warns(UserWarning, match="would draw the same masks") as caught:
        streams = _numbers(first + second)
    assert streams == [0, 1, 2, 3] and len(caught) == 2
    # a stream fixed at an earlier step is kept, and a new one avoids it
    with pytest.warns(UserWarning, match="stream 1"):
        assert mask_streams.assign_streams(second, [1, None]) == [1, 2]


def test_mixed_numbering_draws_distinct_masks_in_the_optimizers():
    """An extra head that set_mask_streams did not number must not share the masks of the numbered
    parameter at its position (both would draw stream 0)."""
    head, body = torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(64))
    optimfx.set_mask_streams([body])
    for make in (MAKERS["childtuning-adamw"], MAKERS["adapter-sgd"]):
        opt = make([head, body])
        head.grad, body.grad = torch.ones(64), torch.ones(64)
        before = [head.detach().clone(), body.detach().clone()]
        opt.step()
        moved = [(p.detach() != b) for p, b in zip((head, body), before)]
        assert not torch.equal(moved[0], moved[1])
        assert [int(opt.state[p]["mask_stream"]) for p in (head, body)] == [1, 0]


def test_bad_input_is_refused():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(TypeError, match="set_mask_streams: expected tensors"):
        optimfx.set_mask_streams([p, 3])
    with pytest.raises(ValueError, match="appears more than once"):
        optimfx.set_mask_streams([p, p])
    assert _numbers([torch.nn.Parameter(torch.zeros(1)), p]) == [0, 1]  # a refused call numbers nothing


def test_numbers_do_not_keep_parameters_alive():
    before = len(mask_streams._ASSIGNED)
    params = [torch.nn.Parameter(torch.zeros(3)) for _ in range(5)]
    optimfx.set_mask_streams(params)
    assert len(mask_streams._ASSIGNED) == before + 5
    del params
    gc.collect()
    assert len(mask_streams._ASSIGNED) == before
