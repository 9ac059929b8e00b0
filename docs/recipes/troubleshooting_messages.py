"""Produce every message quoted on the troubleshooting page. Run by tests/docs/test_docs.py.

``MESSAGES`` holds the exact text the page shows; each ``expect`` below triggers the real error or
warning and checks it word for word, and the docs test checks that the page quotes exactly these.
"""

import os
import sys
import warnings
from unittest import mock

import torch

import optimfx

MESSAGES = {
    "no-triton": "RuntimeError: backend='triton' cannot run: Triton is not installed "
                 "(pip install 'optimfx[triton]', Linux only)",
    "not-cuda": "RuntimeError: backend='triton' cannot run: the Triton kernels need CUDA tensors "
                "(or TRITON_INTERPRET=1 on CPU), got cpu",
    "float64": "RuntimeError: backend='triton' cannot run: the Triton kernels take "
               "float32/bfloat16/float16 parameters, got torch.float64",
    "bad-backend": "ValueError: Invalid backend: 'cuda' (must be one of 'auto', 'reference', "
                   "'triton', 'compiled')",
    "skipped": "RuntimeWarning: AdamW: gradients hold inf/NaN; the step was skipped for that "
               "parameter group (parameters and state unchanged). This warning is shown once.",
    "groups": "ValueError: loaded state dict has a different number of parameter groups",
    "group-size": "ValueError: loaded state dict contains a parameter group that doesn't match "
                  "the size of optimizer's group",
    "adapter": "ValueError: ChildTuning: the state of parameter 0 holds ['exp_avg', 'exp_avg_sq'], "
               "neither ChildTuning's state nor its base's ('base/<key>'): load what ChildTuning.state_dict() "
               "saved, not the base optimizer's state dict",
    "eg-base": "ValueError: EGStepSize: the state of parameter 0 holds ['exp_avg', 'exp_avg_sq', 'step'], "
               "neither EGStepSize's state nor its base's ('base/<key>'): load what EGStepSize.state_dict() "
               "saved, not the base optimizer's state dict",
    "adafactor-lr": "ValueError: Invalid lr: a manual lr cannot be combined with relative_step=True "
                    "(leave lr=None, or pass relative_step=False, or lr_mode='rho_max')",
    "complex": "RuntimeError: AdaFactor does not support complex parameters or gradients",
    "group-betas": "ValueError: Invalid betas[0]: 1.0 (must be in [0.0, 1.0))",
    "ct-twice": "ValueError: ChildTuning: the AdamW already masks its gradients (child_tuning_mode='F'); "
                "masking them twice would drop and rescale twice",
    "ct-wrapper": "ValueError: ChildTuning: this EGStepSize wraps AdaX, whose ChildTuning options its param "
                  "groups hold; wrap that optimizer instead (e.g. EGStepSize(ChildTuning(AdaX(...), ...))) or "
                  "pass child_tuning_mode= to it",
}


def expect(key, action):
    """Run ``action`` and check the error it raises against ``MESSAGES[key]``."""
    try:
        action()
    except Exception as err:  # noqa: BLE001 - the message is what is checked
        seen = f"{type(err).__name__}: {err}"
        assert seen == MESSAGES[key], f"{key}: the page quotes\n  {MESSAGES[key]}\nbut the code says\n  {seen}"
        return
    raise AssertionError(f"{key}: no error")


def stepped(opt):
    """Give every parameter a gradient of ones and step."""
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()


model = torch.nn.Linear(4, 2)

# -- "backend='triton' cannot run" ----------------------------------------------------------------
# a machine without Triton (macOS, Windows, or Linux without the extra): hide it from the import system
with mock.patch.dict(sys.modules, {"triton": None}):
    assert not optimfx.triton_available()
    expect("no-triton", lambda: stepped(optimfx.AdamW(model.parameters(), backend="triton")))
    stepped(optimfx.AdamW(model.parameters()))  # "auto" runs the reference backend instead

if optimfx.triton_available():
    # CPU tensors outside Triton's interpreter mode
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
        expect("not-cuda", lambda: stepped(optimfx.AdamW(model.parameters(), backend="triton")))
    double = torch.nn.Linear(4, 2).double()
    expect("float64", lambda: stepped(optimfx.AdamW(double.parameters(), backend="triton")))

expect("bad-backend", lambda: optimfx.AdamW(model.parameters(), backend="cuda"))

# -- inf/NaN gradients: the step is skipped, once with a warning ----------------------------------
opt = optimfx.AdamW(model.parameters())
stepped(opt)
weight = model.weight.detach().clone()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        model.weight.grad = torch.full_like(model.weight, float("nan"))
        model.bias.grad = torch.zeros_like(model.bias)
        opt.step()
assert [f"{w.category.__name__}: {w.message}" for w in caught] == [MESSAGES["skipped"]]
assert torch.equal(model.weight, weight)
assert int(opt.state[model.weight]["step"]) == 1  # the counter shows how many steps were taken

# -- resuming ---------------------------------------------------------------------------------------
saved = optimfx.AdamW(model.parameters()).state_dict()
two_groups = optimfx.AdamW([{"params": [model.weight]}, {"params": [model.bias]}])
expect("groups", lambda: two_groups.load_state_dict(saved))
bigger = optimfx.AdamW(torch.nn.Sequential(model, torch.nn.Linear(2, 2)).parameters())
expect("group-size", lambda: bigger.load_state_dict(saved))
# the adapter's checkpoint holds its own and its base's state: load the adapter's, not the base's
adapter = optimfx.ChildTuning(torch.optim.AdamW(torch.nn.Linear(4, 2).parameters()), mode="F", reserve_p=0.3)
stepped(adapter)
expect("adapter", lambda: adapter.load_state_dict(adapter.base.state_dict()))
adapter.load_state_dict(adapter.state_dict())
# EGStepSize keeps its base's state in its own per-parameter entries, as "base/<key>"
eg = optimfx.EGStepSize(torch.optim.AdamW(torch.nn.Linear(4, 2).parameters()))
stepped(eg)
expect("eg-base", lambda: eg.load_state_dict(eg.base.state_dict()))
eg.load_state_dict(eg.state_dict())

# -- AdaFactor arguments ------------------------------------------------------------------------------
expect("adafactor-lr", lambda: optimfx.AdaFactor(model.parameters(), lr=1e-3))
optimfx.AdaFactor(model.parameters(), lr=1e-3, relative_step=False)  # an external lr
cplx = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
expect("complex", lambda: stepped(optimfx.AdaFactor([cplx])))

# -- param groups and ChildTuning around another optimizer -----------------------------------------
# a group's own hyperparameters are checked as the constructor's are, also in add_param_group
expect("group-betas", lambda: optimfx.AdamW([{"params": [model.weight], "betas": (1.0, 0.999)}]))
# the adapter around an optimfx optimizer sets that optimizer's own mask options...
masked = optimfx.AdamW(model.parameters(), child_tuning_mode="F", reserve_p=0.3)
expect("ct-twice", lambda: optimfx.ChildTuning(masked, "F", 0.3))
stepped(optimfx.ChildTuning(optimfx.AdamW(model.parameters()), "F", 0.3))  # fine: AdamW masks, once
# ...which a wrapper in between would share with it
expect("ct-wrapper", lambda: optimfx.ChildTuning(optimfx.EGStepSize(optimfx.AdaX(model.parameters())), "D"))
stepped(optimfx.EGStepSize(optimfx.ChildTuning(optimfx.AdaX(model.parameters()), "D")))  # the order that works

# -- low precision: a bf16 weight ignores updates below half its spacing, silently ----------------
p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
stepped(optimfx.AdamW([p], lr=1e-3, weight_decay=0.0))  # a step of 1e-3 on 1.0
assert torch.equal(p, torch.ones(4, dtype=torch.bfloat16))  # bf16 spacing at 1.0 is 2**-7
p32 = torch.nn.Parameter(torch.ones(4))
stepped(optimfx.AdamW([p32], lr=1e-3, weight_decay=0.0))
assert p32.detach().sub(0.999).abs().max() < 1e-6  # fp32 keeps it
