"""ChildTuning masks of whole groups in batches (``optimfx/reference/batched_masks.py``) are bitwise the
per-tensor masks, and the fused CPU step taken batch by batch is bitwise the step taken in one call.

No tolerances: the batched hash, comparison and product are the per-tensor ops on other layouts, and
ATen's fused Adam kernel is elementwise; it rounds its vectorised body and scalar tail differently, so
tensors are cut at multiples of 64 elements (``BATCH_NUMEL``; 1280 in the test here), which keeps
every element in the part of the loop it takes uncut.
"""

from __future__ import annotations

import pytest
import torch

import optimfx
from optimfx._distributed import SHARD_KEY, ShardSpec
from optimfx.reference import aten_fused, batched_masks
from optimfx.reference import child_tuning as ct

SHAPES = [(7,), (128, 128), (3, 5), (1,), (64,), (128, 128), (33, 3), (1000,), (2, 64)]
# (segment length, batch elements): whole tensors in one batch per length; short segments; one
# element per segment (odd offsets everywhere but 0); rows longer than a batch
CUTS = [(None, None), (16, 64), (1, 7), (64, 8)]


def _grads_and_states(shard_offsets: dict[int, int]) -> tuple[list[torch.Tensor], list[dict]]:
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    states = [{"mask_stream": i, "step": torch.tensor(float(3 + i % 2))} for i in range(len(SHAPES))]
    for i, offset in shard_offsets.items():
        states[i][SHARD_KEY] = ShardSpec((10**6,), (), element_offset=offset)
    return grads, states


def _batched(grads, states, hp, cut) -> dict[tuple[int, int], torch.Tensor]:
    keys: dict[int, int] = {}
    out = {}
    flat = [g.view(-1) for g in grads]
    for batch in batched_masks.batches(batched_masks.segments([g.numel() for g in grads], cut[0]), cut[1]):
        for seg, row in zip(batch, batched_masks.masked_batch(flat, states, hp, batch, keys)):
            out[seg.index, seg.start] = row.clone()  # rows are reused buffers
    return out


def _assert_rows_are_per_tensor_masks(grads, states, hp, rows) -> None:
    covered = [0] * len(grads)
    for (i, start), row in rows.items():
        whole = ct.mask_grad(grads[i], states[i], hp).reshape(-1)
        assert torch.equal(row, whole[start:start + row.numel()]), (i, start)
        covered[i] += row.numel()
    assert covered == [g.numel() for g in grads]


@pytest.mark.parametrize("cut", CUTS, ids=str)
@pytest.mark.parametrize("reserve_p", [0.3, 0.9])
def test_f_masks_equal_the_per_tensor_masks(cut, reserve_p):
    # shard offsets: even (batched with a shifted first pair), odd (the per-tensor fallback)
    grads, states = _grads_and_states({2: 35, 4: 64, 8: 2**33 - 40})
    hp = ct.MaskHyper("F", reserve_p, seed=11)
    _assert_rows_are_per_tensor_masks(grads, states, hp, _batched(grads, states, hp, cut))


@pytest.mark.parametrize("cut", CUTS, ids=str)
def test_d_masks_equal_the_per_tensor_masks(cut):
    grads, states = _grads_and_states({})
    gen = torch.Generator().manual_seed(1)
    for i, g in enumerate(grads):
        if i != 3:  # a tensor without a mask keeps its gradient
            states[i]["child_mask"] = (torch.rand(g.shape, generator=gen) < 0.4).to(torch.uint8)
    hp = ct.MaskHyper("D")
    _assert_rows_are_per_tensor_masks(grads, states, hp, _batched(grads, states, hp, cut))


def test_segments_and_batches_cover_every_element_once():
    numels = [0, 5, 16, 17, 40, 16]
    segs = batched_masks.segments(numels, 16)
    assert [(s.index, s.start, s.length) for s in segs] == [
        (1, 0, 5), (2, 0, 16), (3, 0, 16), (3, 16, 1), (4, 0, 16), (4, 16, 16), (4, 32, 8), (5, 0, 16)]
    batches = batched_masks.batches(segs, 40)
    # sorted by length (stably), packed up to 40 elements
    assert [[(s.index, s.start) for s in b] for b in batches] == [
        [(3, 16), (1, 0), (4, 32), (2, 0)], [(3, 0), (4, 0)], [(4, 16), (5, 0)]]
    assert sorted(s for b in batches for s in b) == sorted(segs)
    # a segment longer than a batch is a batch of its own
    assert batched_masks.batches(segs, 10)[-1] == [segs[-1]]


CONFIGS = {
    "AdaXW-F": dict(cls=optimfx.AdaXW, weight_decay=0.1, child_tuning_mode="F", reserve_p=0.4),
    "ChildTuningAdamW-F": dict(cls=optimfx.ChildTuningAdamW, mode="ChildTuning-F", reserve_p=0.3),
    "AdaX-D": dict(cls=optimfx.AdaX, weight_decay=0.1, child_tuning_mode="D"),
    "AdamW-D-maximize": dict(cls=optimfx.AdamW, child_tuning_mode="D", maximize=True),
}
GROUP_SHAPES = [(40, 16)] * 6 + [(3,), (129,), (33, 65), ()]


def _run(config: dict, steps: int = 4):
    kwargs = dict(config)
    cls = kwargs.pop("cls")
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in GROUP_SHAPES]
    opt = cls(params, lr=1e-2, **kwargs)
    if kwargs.get("child_tuning_mode") == "D":
        opt.set_gradient_mask({p: torch.rand(p.shape, generator=gen) < 0.5 for p in params[1:]})
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))  # only read
    return params, opt



@pytest.mark.skipif(not aten_fused.available(), reason="this torch has no fused Adam ops")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_step_in_batches_equals_one_batch_per_tensor(name, monkeypatch, kernel_calls, without_cpu_kernel):
    monkeypatch.setattr(batched_masks, "BATCH_NUMEL", 2**40)
    whole, opt_whole = _run(CONFIGS[name])
    # every tensor whole, all in one call
    assert kernel_calls == [10] * 4
    kernel_calls.clear()
    monkeypatch.setattr(batched_masks, "BATCH_NUMEL", 2 * 640)
    cut, opt_cut = _run(CONFIGS[name])
    # by length (1, 3, 129, 640 × 6, then 865 + 1280 of the (33, 65)) packed up to 1280 elements
    assert kernel_calls == [4, 2, 2, 1, 1, 1] * 4
    for p, q in zip(whole, cut):
        assert torch.equal(p, q)
        for key, value in opt_whole.state[p].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, opt_cut.state[q][key]), key
    assert all(torch.isfinite(p.detach()).all() for p in cut)


@pytest.mark.parametrize("offset", [0, 1, 6])
def test_large_tensor_masks_hashed_in_segments_equal_one_segment(offset, monkeypatch):
    grad = torch.randn(10_001, generator=torch.Generator().manual_seed(3))
    key = ct.mask_key(5, 2, 9)
    monkeypatch.setattr(ct, "SEGMENT_NUMEL", 2**40)
    whole = ct.bernoulli_grad(grad, 0.3, key, offset)
    monkeypatch.setattr(ct, "SEGMENT_NUMEL", 1024)
    assert torch.equal(ct.bernoulli_grad(grad, 0.3, key, offset), whole)


def test_large_tensor_d_masks_applied_in_segments_equal_one_product(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    grad = torch.randn(33, 301, generator=gen)
    keep = (torch.rand(grad.shape, generator=gen) < 0.3).to(torch.uint8)
    monkeypatch.setattr(ct, "SEGMENT_NUMEL", 1000)
    assert torch.equal(ct.apply_mask(grad, keep, 1.0), grad * keep)
    assert torch.equal(ct.apply_mask(grad, keep, 2.5), grad * keep * 2.5)


@pytest.mark.parametrize("mode", ["F", "D"])
@pytest.mark.usefixtures("without_adafactor_kernel")
def test_adafactor_stacks_take_masks_of_non_contiguous_gradients(mode):
    """Same-shape tensors are stacked whatever their gradients' strides (channels_last, ``.t()``;
    the C kernel, which takes fp32 groups first, off)."""
    gen = torch.Generator().manual_seed(6)
    init = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    grads = [torch.randn(5, 6, generator=gen).t() for _ in range(3)]
    masks = [torch.rand(6, 5, generator=gen) < 0.5 for _ in range(3)]
    runs = []
    for contiguous in (True, False):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = optimfx.AdaFactor(params, child_tuning_mode=mode, reserve_p=0.5)
        if mode == "D":
            opt.set_gradient_mask(dict(zip(params, masks)))
        for _ in range(2):
            for p, g in zip(params, grads):
                p.grad = g.contiguous() if contiguous else g.clone().t().contiguous().t()
            opt.step()
        runs.append(params)
    assert not grads[0].is_contiguous()
    for p, q in zip(*runs):
        assert torch.equal(p, q)
