"""Fisher-mask threshold rules vs numpy and the spec's worked example (§4.6)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import optimfx
from optimfx import fisher as fx

F_W = [[4e-4, 1e-5, 9e-4], [2.5e-5, 0.0, 1e-4]]
F_B = [1e-6, 3e-4, 5e-5]


def test_spec_example_official_percentile():
    fisher = {"layer.w": torch.tensor(F_W), "layer.b": torch.tensor(F_B)}
    tau = fx.fisher_threshold(fisher, 0.3)
    # the spec computes τ in float64 (2.2e-4); here the inputs are float32, hence rtol 1e-6
    assert tau == pytest.approx(2.2e-4, rel=1e-6)
    assert torch.equal(fisher["layer.w"] >= tau, torch.tensor([[1, 0, 1], [0, 0, 0]]).bool())
    assert torch.equal(fisher["layer.b"] >= tau, torch.tensor([0, 1, 0]).bool())


def test_percentile_vs_topk_on_nine_values():
    # spec §4.4: with 9 values and p_D = 0.5 the official rule keeps 5, exact top-k keeps 4
    fisher = {"layer.x": torch.tensor([float(i) * 1e-5 for i in range(9)])}
    assert int((fisher["layer.x"] >= fx.fisher_threshold(fisher, 0.5, "percentile")).sum()) == 5
    assert int((fisher["layer.x"] >= fx.fisher_threshold(fisher, 0.5, "topk")).sum()) == 4


@pytest.mark.parametrize("p", [0.01, 0.1, 0.3, 0.77, 1.0])
def test_percentile_matches_numpy(p):
    gen = torch.Generator().manual_seed(0)
    fisher = {f"layer.{i}": torch.rand(s, generator=gen) ** 3 for i, s in enumerate([(37, 11), (5,), (1000,)])}
    tau = fx.fisher_threshold(fisher, p)
    flat = np.concatenate([f.numpy().ravel() for f in fisher.values()])
    expected = np.percentile(flat.astype(np.float64), 100 * (1 - p))
    # interpolation done in float64 on exact float32 order statistics
    assert tau == pytest.approx(expected, rel=1e-12, abs=1e-30)


def test_order_statistic_exact_with_ties_and_zeros():
    values = [torch.tensor([0.0, 0.0, 3.0, 1.0]), torch.tensor([3.0, 2.0])]
    ordered = sorted([0.0, 0.0, 3.0, 1.0, 3.0, 2.0])
    assert [fx.order_statistic(values, r) for r in range(6)] == ordered


def test_build_fisher_mask_on_a_model_keeps_user_grads_and_filters_names():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("layer0", torch.nn.Linear(6, 5))
    model.add_module("head", torch.nn.Linear(5, 2))
    model.head.weight.grad = torch.ones_like(model.head.weight)
    batches = [(torch.randn(8, 6), torch.randint(0, 2, (8,))) for _ in range(3)]
    loss = lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    masks = optimfx.build_fisher_mask(model, batches, loss, reserve_p=0.4, max_grad_norm=1.0)
    assert set(masks) == {model.layer0.weight, model.layer0.bias}
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept >= round(0.4 * 35) and kept <= round(0.4 * 35) + 1
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))
    assert model.layer0.weight.grad is None


class _ModeRecorder(torch.nn.Module):
    """A linear model that records whether it ran in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 3)
        self.seen: list[bool] = []

    def forward(self, x):
        self.seen.append(self.training)
        return self.layer(x)


def _data(n=3, scale=1.0):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=gen) * scale, torch.randint(0, 3, (8,), generator=gen)) for _ in range(n)]


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.mark.parametrize("train, expected", [(True, [True] * 3), (False, [False] * 3)])
def test_the_pass_runs_in_train_mode_and_restores_the_models(train, expected):
    """The official pass calls ``model.train()`` (dropout on); a model loaded with ``from_pretrained``
    is in eval mode, and must be left so."""
    model = _ModeRecorder().eval()
    optimfx.build_fisher_mask(model, _data(), _loss, 0.5, train=train)
    assert model.seen == expected and not model.training and not model.layer.training


def test_gradients_are_clipped_per_tensor_to_one_by_default():
    """The official code clips each tensor's gradient to the Trainer's ``max_grad_norm`` (1.0)."""
    model = _ModeRecorder()
    data = _data(scale=100.0)  # gradients far above norm 1
    default = fx.fisher_information(model, data, _loss)
    clipped = fx.fisher_information(model, data, _loss, max_grad_norm=1.0)
    unclipped = fx.fisher_information(model, data, _loss, max_grad_norm=None)
    for name in default:
        assert torch.equal(default[name], clipped[name])
    # the weight's gradients scale with the inputs (norms ~100); the bias's stay below 1
    assert not torch.allclose(default["layer.weight"], unclipped["layer.weight"])


@pytest.mark.parametrize("reserve_p", [0.5, 0.7])
def test_topk_keeps_exactly_k_entries_when_values_tie(reserve_p):
    """60 % of the values are 0: the k-th largest is 0, and ``F ≥ τ`` would keep every entry."""
    fisher = {"a": torch.cat([torch.zeros(300), torch.rand(200) + 1]), "b": torch.cat([torch.zeros(300), torch.rand(200) + 1])}
    tau = fx.fisher_threshold(fisher, reserve_p, "topk")
    masks = fx._exactly_topk(fisher, tau, fx._topk_count(reserve_p, 1000))
    assert sum(int(m.sum()) for m in masks.values()) == round(reserve_p * 1000)
    assert all(bool(m[f > tau].all()) for m, f in zip(masks.values(), fisher.values()))


def test_bad_arguments_are_refused_before_the_pass():
    def never():
        raise AssertionError("the data was read")
        yield

    model = _ModeRecorder()
    with pytest.raises(ValueError, match=r"^Invalid reserve_p"):
        optimfx.build_fisher_mask(model, never(), _loss, 0.0)
    with pytest.raises(ValueError, match=r"^Invalid rule"):
        optimfx.build_fisher_mask(model, never(), _loss, 0.5, rule="median")


def test_a_name_filter_that_selects_nothing_names_itself_and_the_parameters():
    """The official default filter ``"layer"`` matches no parameter of an ``nn.Sequential``: said
    before the pass, with the names the model has (it used to end in "no Fisher values")."""
    def never():
        raise AssertionError("the data was read")
        yield

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"^Invalid name_filter: 'layer' selects none .*'0\.weight', '0\.bias'"):
        optimfx.build_fisher_mask(model, never(), _loss, 0.3)


@pytest.mark.parametrize("make", [
    lambda ps: optimfx.ChildTuningAdamW(ps, mode="ChildTuning-D"),
    lambda ps: optimfx.AdaXW(ps, child_tuning_mode="ChildTuning-D"),
    lambda ps: optimfx.ChildTuning(torch.optim.AdamW(ps), mode="ChildTuning-D"),
], ids=["ChildTuningAdamW", "AdaXW", "adapter"])
def test_d_mode_without_any_mask_warns_once(make):
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = make([p])
    p.grad = torch.randn(3, 2)
    with pytest.warns(RuntimeWarning, match="ChildTuning-D is on but no gradient mask is set"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once
    masked = make([p])
    masked.set_gradient_mask({p: torch.rand(3, 2) < 0.5})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masked.step()
