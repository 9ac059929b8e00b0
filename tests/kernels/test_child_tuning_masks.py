"""ChildTuning masks as a gradient transform of every optimfx optimizer (spec §4).

* The F-mode hash: the reference's int32 torch ops and the kernels' uint32 ``load_grad`` give the same
  bits, also for an FSDP2 shard (global indices from its element offset); kept fraction,
  unbiasedness and pairwise independence within binomial bounds; the keying.
* Every optimizer: ``reserve_p = 1`` is the optimizer without masks, bit for bit; F and D masks
  on AdaX/AdaXW/AdaFactor, reference against Triton; resume in F mode is bitwise.

Statistical bounds are 5 binomial standard deviations (a false alarm below 1e-6 per check), plus
``|T/2^16 − p| ≤ 2^-17``, the documented resolution of ``reserve_p``.
"""

from __future__ import annotations

import math

import pytest
import torch
from _device import KERNEL_DEVICE, randn_like

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

import optimfx  # noqa: E402
from optimfx._distributed import SHARD_KEY, ShardSpec  # noqa: E402
from optimfx._kernels import _launcher, _mask, cpu_adam, cpu_build  # noqa: E402
from optimfx.reference import aten_fused  # noqa: E402
from optimfx.reference import child_tuning as ct  # noqa: E402

SIGMAS = 5
RESOLUTION = 2.0 ** -(ct.KEEP_BITS + 1)
# the same parameter copies and float32 gradients for the reference and the Triton run; kernels
# round host scalars to fp32 and fuse in another order (tests/kernels/test_adax.py's reasons):
# fp32 parameters agree far inside rtol=1e-5 / atol=1e-7 after 3 steps
FP32 = dict(rtol=1e-5, atol=1e-7)


@triton.jit
def _masked_ones_kernel(out_ptr, p_d, base, n, mask_seed, mask_step, mask_threshold, mask_scale,
                        MASK_MODE: tl.constexpr, BLOCK: tl.constexpr):
    # load_grad over a gradient of ones at element indices base + [0, n): the mask times its scale
    # (the gradient pointer is shifted back by base, so indices past 2^32 need no memory)
    # int64 indices, as the launcher's kernels pass them: the hash reads their high word (``>> 32``)
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    b_g = _mask.load_grad(out_ptr - base, p_d, base + o, m, mask_seed, mask_step, mask_threshold, mask_scale,
                          True, MASK_MODE)
    tl.store(out_ptr + o, b_g, mask=m)


def _kernel_mask(hp: ct.MaskHyper, stream: int, step: int, n: int, base: int = 0,
                 shard_offset: int | None = None) -> torch.Tensor:
    state = {"mask_stream": torch.tensor(stream), "step": torch.tensor(step)}
    if shard_offset is not None:
        # an FSDP2 shard's state view: n elements from shard_offset on, of a longer tensor
        state[SHARD_KEY] = ShardSpec((shard_offset + n,), ((0, None),), shard_offset)
    launch = _mask.prepare([torch.empty(n, device=KERNEL_DEVICE)], [state], hp)
    out = torch.ones(n, device=KERNEL_DEVICE)
    _masked_ones_kernel[(triton.cdiv(n, 512),)](out, launch.aux[0], base, n, *launch.args, MASK_MODE=launch.mode,
                                                BLOCK=512)
    return out


def _keep(seed, stream, step, n, p, offset=0):
    return ct.bernoulli_keep((n,), p, ct.mask_key(seed, stream, step), "cpu", offset)


@pytest.mark.parametrize("n, base", [(1, 0), (2, 0), (1001, 0), (777, 3), (600, (1 << 33) - 301)])
def test_kernel_f_mask_is_the_reference_mask_bitwise(n, base):
    """Odd sizes and starts, and indices past 2^33 (pair index past 2^32: the hash folds its high word)."""
    hp = ct.MaskHyper("F", 0.3, seed=12345)
    for stream, step in [(0, 1), (5, 7), (1023, 2**31 + 5)]:
        expected = _keep(hp.seed, stream, step, n, hp.reserve_p, offset=base).float() * ct.keep_scale(hp.reserve_p)
        assert torch.equal(_kernel_mask(hp, stream, step, n, base).cpu(), expected)


@pytest.mark.parametrize("n, offset", [(1, 1), (777, 3), (600, 4096), (600, (1 << 33) - 301)])
def test_kernel_f_mask_of_a_shard_keys_global_indices(n, offset):
    """A shard's element offset reaches the kernel in its descriptor (the word a D mask's address
    takes): local element ``i`` draws the bit of global element ``offset + i``, the reference's."""
    hp = ct.MaskHyper("F", 0.3, seed=12345)
    for stream, step in [(0, 1), (1023, 2**31 + 5)]:
        got = _kernel_mask(hp, stream, step, n, shard_offset=offset).cpu()
        assert torch.equal(got, _keep(hp.seed, stream, step, n, hp.reserve_p, offset=offset).float() * ct.keep_scale(hp.reserve_p))
        if offset < 1 << 16:
            # the matching slice of the whole tensor's mask
            whole = _keep(hp.seed, stream, step, offset + n, hp.reserve_p).float() * ct.keep_scale(hp.reserve_p)
            assert torch.equal(got, whole[offset:])


def test_kernel_d_mask_reads_the_stored_uint8_mask():
    """A tensor with a mask gets ``g ⊙ mask``; one without, in the same launch, the plain gradient."""
    mask = (torch.arange(300) % 3 == 0).to(torch.uint8)
    grads = [torch.empty(300, device=KERNEL_DEVICE)] * 2
    launch = _mask.prepare(grads, [{"child_mask": mask.to(KERNEL_DEVICE)}, {}], ct.MaskHyper("D"))
    assert launch.mode == int(_mask.STORED)
    for descriptor, expected in zip(launch.aux, [mask.float(), torch.ones(300)]):
        out = torch.ones(300, device=KERNEL_DEVICE)
        _masked_ones_kernel[(1,)](out, descriptor, 0, 300, *launch.args, MASK_MODE=launch.mode, BLOCK=512)
        assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_kept_fraction_and_unbiasedness(p):
    n, steps = 100_000, 4
    t = ct.keep_threshold(p)
    p_eff = t / 2**ct.KEEP_BITS
    assert abs(p_eff - p) <= RESOLUTION
    keeps = torch.stack([_keep(3, 9, step, n, p) for step in range(1, steps + 1)]).double()
    trials = n * steps
    assert abs(float(keeps.mean()) - p_eff) < SIGMAS * math.sqrt(p_eff * (1 - p_eff) / trials)
    # E[keep/p] = 1 up to the threshold's resolution; each term has variance (1 − p)/p
    ratio = float((keeps / p).mean())
    assert abs(ratio - 1) < SIGMAS * math.sqrt((1 - p) / p / trials) + RESOLUTION / p


def test_masks_are_pairwise_independent():
    """Neighbouring elements (same and different hash pair), the same element at consecutive steps,
    and two streams at one step: ``P(both kept) = p²`` within binomial bounds."""
    p, n = 0.3, 200_000
    a, b = _keep(1, 0, 1, n, p).double(), _keep(1, 0, 2, n, p).double()
    c = _keep(1, 1, 1, n, p).double()
    pairs = {"same pair": a[0::2] * a[1::2], "next pair": a[1:-1:2] * a[2::2], "next step": a * b,
             "other stream": a * c}
    q = (ct.keep_threshold(p) / 2**ct.KEEP_BITS) ** 2
    for name, both in pairs.items():
        bound = SIGMAS * math.sqrt(q * (1 - q) / both.numel())
        assert abs(float(both.mean()) - q) < bound, name


def test_same_seed_same_masks_and_every_key_part_changes_them():
    a = _keep(1, 0, 1, 1000, 0.5)
    assert torch.equal(a, _keep(1, 0, 1, 1000, 0.5))
    for seed, stream, step in [(1, 0, 2), (1, 1, 1), (2, 0, 1), (1, 0, 1 + 2**32 - 1)]:
        assert not torch.equal(a, _keep(seed, stream, step, 1000, 0.5)), (seed, stream, step)


def test_threshold_resolution_and_edges():
    assert ct.keep_threshold(1.0) == 2**16
    assert ct.keep_threshold(1 - 1e-9) == 2**16 - 1  # below 1 something is dropped, rarely
    assert ct.keep_threshold(1e-9) == 1
    assert ct.keep_threshold(0.5) == 2**15


# ---- the transform on every optimizer -------------------------------------------------------------

# an unfactored vector, a factored matrix and batch of matrices (AdaFactor), a 0-d tensor
SHAPES = [(5,), (6, 20), (2, 3, 4), ()]
OPTIMIZERS = {
    "AdamW": (optimfx.AdamW, dict(lr=1e-2)),
    "ChildTuningAdamW": (optimfx.ChildTuningAdamW, dict(lr=1e-2, weight_decay=0.01)),
    "AdaX": (optimfx.AdaX, dict(lr=1e-2, weight_decay=1e-2)),
    "AdaXW": (optimfx.AdaXW, dict(lr=1e-2)),
    "AdaFactor": (optimfx.AdaFactor, dict()),
    "AdaFactor-momentum": (optimfx.AdaFactor, dict(lr=1e-2, relative_step=False, beta1=0.9, weight_decay=0.1)),
}


def _mode_kwargs(cls, mode, p=0.3, seed=4):
    key = "mode" if cls is optimfx.ChildTuningAdamW else "child_tuning_mode"
    return {key: mode, "reserve_p": p, "seed": seed}


def _masks(params):
    gen = torch.Generator().manual_seed(7)
    # every other tensor has a D mask; the others train fully
    return {p: (torch.rand(p.shape, generator=gen) < 0.4).to(p.device) for p in params[::2]}


def _run(cls, kwargs, backend, steps=3, d_masks=False, params=None):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(KERNEL_DEVICE) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(KERNEL_DEVICE) for s in SHAPES] for _ in range(steps)]
    params = params if params is not None else [torch.nn.Parameter(x.clone()) for x in init]
    opt = cls(params, backend=backend, **kwargs)
    if d_masks:
        opt.set_gradient_mask(_masks(params))
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    return params, opt


@pytest.mark.parametrize("name, backend", [(n, "reference") for n in OPTIMIZERS]
                         + [(n, "triton") for n in ("AdamW", "AdaX", "AdaFactor")])
def test_reserve_p_one_is_the_base_optimizer_bitwise(name, backend):
    cls, kwargs = OPTIMIZERS[name]
    plain, plain_opt = _run(cls, kwargs, backend)
    masked, masked_opt = _run(cls, {**kwargs, **_mode_kwargs(cls, "F", p=1.0)}, backend)
    for a, b in zip(plain, masked):
        assert torch.equal(a, b)
        assert plain_opt.state[a].keys() == masked_opt.state[b].keys()


@pytest.mark.parametrize("name, mode", [("AdaX", "F"), ("AdaXW", "D"), ("AdaFactor", "F"),
                                        ("AdaFactor-momentum", "D")])
def test_masks_on_adax_and_adafactor_triton_matches_reference(name, mode):
    """Same masks on both backends (AdaFactor's kernels load g in three passes); the masks matter:
    the masked run is far from the unmasked one."""
    cls, kwargs = OPTIMIZERS[name]
    kwargs = {**kwargs, **_mode_kwargs(cls, mode)}
    ref, ref_opt = _run(cls, kwargs, "reference", d_masks=mode == "D")
    ker, ker_opt = _run(cls, kwargs, "triton", d_masks=mode == "D")
    plain, _ = _run(*OPTIMIZERS[name], "reference")
    for r, k, q in zip(ref, ker, plain):
        torch.testing.assert_close(k, r, **FP32)
        assert ref_opt.state[r].keys() == ker_opt.state[k].keys()
    assert max(float((r - q).detach().abs().max()) for r, q in zip(ref, plain)) > 1e-3


@pytest.mark.cpu_fast_paths
@pytest.mark.parametrize("cpu_kernel", [False, True], ids=["aten-masks", "cpu-kernel"])
def test_f_mask_acts_on_the_loss_gradient_before_l2(cpu_kernel, monkeypatch):
    """AdaX with coupled L2: masking in the optimizer equals feeding it ``g ⊙ keep / p`` unmasked.

    With the masks applied by ATen ops both runs take ATen's fused Adam kernel: bit for bit. The C
    kernel of the CPU path evaluates the same step with its own roundings: within 4 ulp of the
    largest parameter (masking after the L2 term instead would be off by 1e-3)."""
    if cpu_kernel and not cpu_adam.available():
        pytest.skip(f"CPU kernels unavailable: {cpu_build.unavailable_reason('cpu_adam')}")
    if not cpu_kernel:
        monkeypatch.setattr(aten_fused, "_step_in_cpu_kernel", lambda *args: False)
    p_keep = 0.3
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.Parameter(torch.randn(50, generator=gen))
    y = torch.nn.Parameter(x.detach().clone())
    masked = optimfx.AdaX([x], lr=1e-2, weight_decay=0.1, child_tuning_mode="F", reserve_p=p_keep, seed=9,
                          backend="reference")
    plain = optimfx.AdaX([y], lr=1e-2, weight_decay=0.1, backend="reference")
    for step in (1, 2, 3):
        g = torch.randn(50, generator=gen)
        keep = ct.bernoulli_keep(g.shape, p_keep, ct.mask_key(9, 0, step), "cpu")
        x.grad, y.grad = g.clone(), ct.apply_mask(g, keep, ct.keep_scale(p_keep))
        masked.step()
        plain.step()
        assert torch.equal(x.grad, g)
    if cpu_kernel:
        eps = torch.finfo(torch.float32).eps
        torch.testing.assert_close(x, y, rtol=0.0, atol=4 * eps * float(y.detach().abs().max()))
    else:
        assert torch.equal(x, y)


@pytest.mark.parametrize("name", ["AdaXW", "AdaFactor"])
def test_d_mode_zero_mask_leaves_only_weight_decay(name):
    cls = optimfx.AdaXW if name == "AdaXW" else optimfx.AdaFactor
    kwargs = dict(lr=1e-2, weight_decay=0.1) if name == "AdaXW" else dict(lr=1e-2, relative_step=False,
                                                                          scale_parameter=False,
                                                                          weight_decay=0.1, decay_mode="torch")
    for backend in ("reference", "triton"):
        w = torch.nn.Parameter(torch.randn(6, 4).to(KERNEL_DEVICE))
        w0 = w.detach().clone()
        opt = cls([w], child_tuning_mode="D", backend=backend, **kwargs)
        opt.set_gradient_mask({w: torch.zeros(6, 4, device=KERNEL_DEVICE)})
        for _ in range(2):
            w.grad = randn_like(w)
            opt.step()
        torch.testing.assert_close(w.detach(), w0 * (1 - 1e-2 * 0.1) ** 2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name, backend", [(n, "reference") for n in ("AdamW", "AdaX", "AdaFactor")]
                         + [(n, "triton") for n in ("AdamW", "AdaFactor")])
def test_f_mode_resume_is_bitwise(name, backend):
    """state_dict → load → continue equals the uninterrupted run: F masks need only (seed, step, stream)."""
    cls, kwargs = OPTIMIZERS[name]
    kwargs = {**kwargs, **_mode_kwargs(cls, "F")}
    full, full_opt = _run(cls, kwargs, backend, steps=3)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(KERNEL_DEVICE) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen).to(KERNEL_DEVICE) for s in SHAPES] for _ in range(3)]
    first = [torch.nn.Parameter(x.clone()) for x in init]
    opt = cls(first, backend=backend, **kwargs)
    for gs in grads[:2]:
        for p, g in zip(first, gs):
            p.grad = g.clone()
        opt.step()
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in first]
    opt2 = cls(resumed, backend=backend, **kwargs)
    opt2.load_state_dict(opt.state_dict())
    assert all(opt2.state[p]["mask_stream"].device.type == "cpu" for p in resumed)
    for gs in grads[2:]:
        for p, g in zip(resumed, gs):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(full, resumed):
        assert torch.equal(a, b)
        for key, value in full_opt.state[a].items():
            assert torch.equal(value, opt2.state[b][key]), key


def test_streams_are_parameter_positions_and_only_f_mode_stores_them():
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    opt = optimfx.AdaXW([{"params": params[:2]}, {"params": params[2:], "child_tuning_mode": "F",
                                                  "reserve_p": 0.5}])
    for p in params:
        p.grad = torch.randn(3)
    opt.step()
    assert ["mask_stream" in opt.state[p] for p in params] == [False, False, True, True]
    assert [int(opt.state[p]["mask_stream"]) for p in params[2:]] == [2, 3]


@pytest.mark.parametrize("mode", ["F", "D"])
def test_one_launch_for_every_tensor_of_a_group(monkeypatch, mode):
    """Masked and unmasked tensors of a D group, and every F tensor, share the group's one launch."""
    launches = []
    real = _launcher._enqueue
    monkeypatch.setattr(_launcher, "_enqueue", lambda k, *a, **kw: launches.append(k) or real(k, *a, **kw))
    params = [torch.nn.Parameter(torch.randn(s).to(KERNEL_DEVICE)) for s in [(3,), (2100,), (4, 5), (), (7,)]]
    opt = optimfx.AdamW(params, child_tuning_mode=mode, reserve_p=0.5, skip_nonfinite=False, backend="triton")
    opt.set_gradient_mask(_masks(params))
    for p in params:
        p.grad = randn_like(p)
    opt.step()
    assert len(launches) == 1


def test_set_gradient_mask_errors_and_no_empty_state():
    p, q = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(2))
    opt = optimfx.AdaFactor([p], child_tuning_mode="D")
    with pytest.raises(ValueError, match="mask shape"):
        opt.set_gradient_mask({p: torch.ones(3)})
    with pytest.raises(ValueError, match="not a parameter"):
        opt.set_gradient_mask({q: torch.ones(2)})
    opt.set_gradient_mask({p: torch.ones(4)})
    assert len(opt.state) == 0  # held until the parameter's first step
    with pytest.raises(ValueError, match="child_tuning_mode"):
        optimfx.AdaX([p], child_tuning_mode="E")
    with pytest.raises(ValueError, match="reserve_p"):
        optimfx.AdaFactor([p], reserve_p=1.5)
    with pytest.raises(ValueError, match="seed"):
        optimfx.AdaXW([p], seed=1.0)
