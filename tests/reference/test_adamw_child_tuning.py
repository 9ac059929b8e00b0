"""AdamW / ChildTuning reference vs spec/algorithms.md §4.6 (float64, masks injected) and torch.optim.AdamW."""

from __future__ import annotations

import math

import pytest
import torch

import optimfx
from optimfx.reference import child_tuning as ct

W0 = [[0.5, -0.3, 0.2], [0.1, 0.4, -0.6]]
G1 = [[0.1, -0.2, 0.3], [0.05, 0.0, -0.1]]
G2 = [[-0.05, 0.1, 0.2], [0.02, 0.03, -0.04]]
SPEC = dict(rtol=1e-9, atol=1e-12)  # the spec prints 10 significant digits


def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def _official(params, **kw):
    return optimfx.ChildTuningAdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                                    backend="reference", **kw)


def _inject_masks(monkeypatch, masks):
    """Replace the counter-based F draw by the spec's masks, one per step (the rescale stays)."""
    masks = iter([_t(m).bool() for m in masks])
    monkeypatch.setattr(ct, "bernoulli_grad", lambda g, p, key, offset=0: ct.apply_mask(g, next(masks), 1 / p))


def test_child_tuning_f_with_injected_masks(monkeypatch):
    _inject_masks(monkeypatch, [[[1, 0, 1], [0, 1, 1]], [[0, 1, 1], [1, 0, 1]]])
    p = torch.nn.Parameter(_t(W0))
    opt = _official([p], reserve_p=0.5, mode="ChildTuning-F")
    p.grad = _t(G1)
    opt.step()
    torch.testing.assert_close(opt.state[p]["exp_avg"], _t([[0.02, 0, 0.06], [0, 0, -0.02]]), **SPEC)
    torch.testing.assert_close(p.detach(), _t([[0.4989951681, -0.299997, 0.1989980627],
                                               [0.099999, 0.399996, -0.5989941681]]), **SPEC)
    p.grad = _t(G2)
    opt.step()
    torch.testing.assert_close(opt.state[p]["exp_avg_sq"], _t([[3.996e-5, 4e-5, 5.1964e-4],
                                                               [1.6e-6, 0, 4.636e-5]]), **SPEC)
    torch.testing.assert_close(p.detach(), _t([[0.4983202326, -0.3007380118, 0.1980257729],
                                               [0.09925445845, 0.399992, -0.5980897439]]), **SPEC)


def test_child_tuning_f_torch_decay_order(monkeypatch):
    _inject_masks(monkeypatch, [[[1, 0, 1], [0, 1, 1]], [[0, 1, 1], [1, 0, 1]]])
    p = torch.nn.Parameter(_t(W0))
    opt = _official([p], reserve_p=0.5, mode="ChildTuning-F", decay_order="torch")
    for g in (G1, G2):
        p.grad = _t(g)
        opt.step()
    torch.testing.assert_close(p.detach(), _t([[0.4983202159, -0.3007380192, 0.1980257532],
                                               [0.09925445101, 0.399992, -0.5980897249]]), **SPEC)


def test_child_tuning_d_with_fisher_mask():
    p = torch.nn.Parameter(_t(W0))
    opt = _official([p], reserve_p=0.3, mode="ChildTuning-D")
    opt.set_gradient_mask({p: _t([[1, 0, 1], [0, 0, 0]])})
    p.grad = _t(G1)
    opt.step()
    torch.testing.assert_close(p.detach(), _t([[0.4989953261, -0.299997, 0.1989981154],
                                               [0.099999, 0.399996, -0.599994]]), **SPEC)
    p.grad = _t(G2)
    opt.step()
    torch.testing.assert_close(p.detach(), _t([[0.4987240771, -0.299994, 0.1980258681],
                                               [0.09999800001, 0.399992, -0.5999880001]]), **SPEC)
    assert opt.state[p]["child_mask"].dtype == torch.uint8


def _train(make, steps=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(5, 4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)]
    grads = [[torch.randn(x.shape, generator=gen, dtype=x.dtype) for x in init] for _ in range(steps)]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = make(params)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params


def test_reserve_p_one_is_plain_adamw_bitwise():
    plain = _train(lambda ps: optimfx.AdamW(ps, backend="reference"))
    masked = _train(lambda ps: optimfx.AdamW(ps, child_tuning_mode="F", reserve_p=1.0, backend="reference"))
    for a, b in zip(plain, masked):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6), dict(maximize=True)])
def test_matches_torch_adamw(kw):
    """Same equations, different operation order: float64 round-off only (rtol=1e-12)."""
    ours = _train(lambda ps: optimfx.AdamW(ps, lr=1e-2, backend="reference", **kw))
    theirs = _train(lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False, **kw))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_f_mode_keep_rate_and_unbiasedness():
    """Keep rate and E[g̃] = g, with bounds of 5 binomial standard deviations (false alarm < 1e-6)."""
    p_keep, n, steps = 0.3, 20_000, 4
    g = torch.linspace(-1, 1, n, dtype=torch.float64)
    kept, total = 0, torch.zeros(n, dtype=torch.float64)
    for step in range(1, steps + 1):
        keep = ct.bernoulli_keep(g.shape, p_keep, ct.mask_key(7, 3, step), g.device)
        kept += int(keep.sum())
        total += ct.apply_mask(g, keep, ct.keep_scale(p_keep))
    trials = n * steps
    assert abs(kept / trials - p_keep) < 5 * math.sqrt(p_keep * (1 - p_keep) / trials)
    # mean over all elements of (g̃ − g)/|g|max: each term has variance ≤ (1−p)/p
    err = (total / steps - g).mean()
    assert abs(float(err)) < 5 * math.sqrt((1 - p_keep) / p_keep / trials)


def test_f_masks_are_reproducible_and_fresh_each_step():
    a = ct.bernoulli_keep((1000,), 0.5, ct.mask_key(1, 0, 1), torch.device("cpu"))
    assert torch.equal(a, ct.bernoulli_keep((1000,), 0.5, ct.mask_key(1, 0, 1), torch.device("cpu")))
    for other in (ct.mask_key(1, 0, 2), ct.mask_key(1, 1, 1), ct.mask_key(2, 0, 1)):
        assert not torch.equal(a, ct.bernoulli_keep((1000,), 0.5, other, torch.device("cpu")))


def test_f_mask_keying_is_pinned():
    """The counter-based F masks are part of a run's identity (a resumed or re-run job must draw the
    same ones): a change of the keying or of the hash shows up here first."""
    assert ct.mask_key(0, 0, 1) == 0xB9375ECD4FB7E9E0
    assert ct.mask_key(42, 3, 1000) == 0xF7DFAC3544AAD966
    keep = ct.bernoulli_keep((24,), 0.5, ct.mask_key(0, 0, 1), torch.device("cpu"))
    assert "".join("1" if k else "0" for k in keep.tolist()) == "111011010111011101001110"


def test_f_mode_masks_only_the_parameters_with_a_position_stream():
    """F mode stores ``mask_stream`` (the parameter's position in the optimizer) for the tensors it
    masks, and the reference draws each tensor's mask from it."""
    params = [torch.nn.Parameter(torch.randn(64, dtype=torch.float64)) for _ in range(3)]
    opt = optimfx.AdamW(params, lr=1e-2, weight_decay=0.0, child_tuning_mode="F", reserve_p=0.5, seed=3,
                        backend="reference")
    for p in params:
        p.grad = torch.ones(64, dtype=torch.float64)
    opt.step()
    for index, p in enumerate(params):
        assert int(opt.state[p]["mask_stream"]) == index
        keep = ct.bernoulli_keep((64,), 0.5, ct.mask_key(3, index, 1), torch.device("cpu"))
        # after one step exp_avg = (1 − β1)·g̃ = 0.1·keep/p for a gradient of ones
        torch.testing.assert_close(opt.state[p]["exp_avg"], keep.double() * 0.1 / 0.5, rtol=1e-15, atol=0)


def test_d_mode_leaves_non_child_entries_to_weight_decay_only():
    p = torch.nn.Parameter(_t(W0))
    opt = _official([p], mode="ChildTuning-D")
    opt.set_gradient_mask({p: torch.zeros(2, 3)})
    for g in (G1, G2):
        p.grad = _t(g)
        opt.step()
    torch.testing.assert_close(p.detach(), _t(W0) * (1 - 1e-3 * 0.01) ** 2, rtol=1e-14, atol=0)


def test_grad_untouched_and_errors():
    p = torch.nn.Parameter(torch.randn(4))
    g = torch.randn(4)
    p.grad = g.clone()
    optimfx.AdamW([p], child_tuning_mode="F", reserve_p=0.5).step()
    assert torch.equal(p.grad, g)
    with pytest.raises(ValueError, match="reserve_p"):
        optimfx.AdamW([p], reserve_p=0.0)
    with pytest.raises(ValueError, match="child_tuning_mode"):
        optimfx.AdamW([p], child_tuning_mode="X")
    with pytest.raises(ValueError, match="mask shape"):
        optimfx.AdamW([p], child_tuning_mode="D").set_gradient_mask({p: torch.ones(3)})


@pytest.mark.parametrize("reserve_p", [1e-5, 2e-5, 1e-4])
def test_f_mode_is_unbiased_at_every_reserve_p(reserve_p):
    """The keep probability is T/2^16 (``keep_threshold``), far from ``reserve_p`` when it is tiny
    (1.5x at 1e-5): the mean of the masked gradient of ones over 2^24 elements, drawn by the real
    masking path, is 1 within 5 binomial standard deviations (a 1/reserve_p scale gives 1.53 at 1e-5,
    outside that bound)."""
    n = 1 << 24
    masked = ct.bernoulli_grad(torch.ones(n), reserve_p, ct.mask_key(0, 1, 1))
    kept = ct.keep_threshold(reserve_p) * n / (1 << ct.KEEP_BITS)  # expected number of kept entries
    assert abs(float(masked.double().mean()) - 1.0) < 5 / math.sqrt(kept)

def test_f_masks_have_binomial_row_and_column_counts():
    """Independent elements: the keep counts of a matrix's rows and columns have the binomial variance.
    Two rounds of the pair hash gave column counts 0.78–0.93 of it at 768 columns (the first round is
    linear in the element index); each ratio here is within 4 standard errors (sqrt(2/n))."""
    for shape, p in (((768, 768), 0.1), ((3072, 768), 0.5), ((1024, 1536), 0.3)):
        for step in (1, 2):
            keep = ct.bernoulli_keep(shape, p, ct.mask_key(0, 2, step), "cpu").double()
            for axis, n in ((1, shape[1]), (0, shape[0])):
                ratio = float(keep.sum(axis).var()) / (n * p * (1 - p))
                assert abs(ratio - 1) < 4 * math.sqrt(2 / keep.shape[1 - axis]), (shape, p, step, axis, ratio)


def test_f_masks_are_uncorrelated_at_the_spacings_two_rounds_left():
    """Elements 639,756 apart correlated at +0.1 (z ≈ 190) under the two-round hash."""
    n = 1 << 21
    keep = ct.bernoulli_keep((n,), 0.1, ct.mask_key(0, 2, 1), "cpu").double()
    keep -= keep.mean()
    for spacing in (768, 1536, 639_756):
        corr = float((keep[:-spacing] * keep[spacing:]).mean() / keep.var())
        assert abs(corr) * math.sqrt(n - spacing) < 5, (spacing, corr)


def test_an_unknown_keyword_is_named_on_child_tuning_adamw():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(TypeError, match=r"^ChildTuningAdamW.__init__\(\) got an unexpected keyword argument 'momentum'"):
        optimfx.ChildTuningAdamW(p, momentum=0.9)
    assert optimfx.ChildTuningAdamW(p, seed=3, decay_order="torch").defaults["decay_order"] == "torch"
