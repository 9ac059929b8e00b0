"""AdaFactor settings for T5-style fine-tuning, on a small T5. Run by tests/docs/test_docs.py."""

import math

import torch
import transformers

import optimfx

# a T5 with the real architecture, small enough for CPU (randomly initialised)
config = transformers.T5Config(
    vocab_size=256, d_model=128, d_kv=16, num_heads=8, d_ff=256, num_layers=2,
    num_decoder_layers=2, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)


def make_model():
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config)


gen = torch.Generator().manual_seed(0)
inputs = torch.randint(1, 256, (8, 12), generator=gen)
batch = {"input_ids": inputs, "labels": inputs.flip(1)}  # learn to reverse


def rms(t):
    return t.square().mean().sqrt().item()


def state_bytes(opt):
    return sum(t.numel() * t.element_size() for s in opt.state.values()
               for k, t in s.items() if k != "step")


# [factoring]
# min_dim_size_to_factor=128 (T5, mesh-tensorflow, optax): factor only
# matrices whose last two dimensions are both >= 128. Without it, T5's
# relative_attention_bias [32 buckets, 8 heads] is factored too.
model = make_model()
opt = optimfx.AdaFactor(model.parameters(), min_dim_size_to_factor=128)
model(**batch).loss.backward()
opt.step()
bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
query = model.encoder.block[0].layer[0].SelfAttention.q.weight
assert "exp_avg_sq" in opt.state[bias]            # [32, 8]: full statistic
assert "exp_avg_sq_row" in opt.state[query]       # [128, 128]: row + column
n_params = sum(p.numel() for p in model.parameters())
print(f"state: {state_bytes(opt) / n_params:.3f} bytes/param (Adam: 8)")
assert state_bytes(opt) < 0.05 * 8 * n_params

# beta1 (momentum) costs a full fp32 tensor per parameter, 4 bytes/param
with_momentum = optimfx.AdaFactor(model.parameters(), beta1=0.9,
                                  min_dim_size_to_factor=128)
with_momentum.step()
assert state_bytes(with_momentum) > 4 * n_params
# [/factoring]

# [relative]
# Relative step (the paper; lr=None): each step is at most
# min(1e-2, 1/sqrt(t)) times the parameter's RMS, with update clipping
# (clip_threshold=1.0) bounding the update's RMS.
model = make_model()
opt = optimfx.AdaFactor(model.parameters(), min_dim_size_to_factor=128)
for step in range(10):
    q = model.encoder.block[0].layer[0].SelfAttention.q.weight
    start = q.detach().clone()
    opt.zero_grad()
    model(**batch).loss.backward()
    opt.step()
    rho = min(1e-2, 1 / math.sqrt(step + 1))
    assert rms(q - start) <= rho * max(1e-3, rms(start)) * (1 + 1e-5)
relative_loss = model(**batch).loss.item()
# [/relative]

# [external]
# External lr (the transformers docstring's T5 fine-tuning setting):
# lr is the step size itself, scheduled by any LR scheduler; no extra
# gradient clipping.
model = make_model()
first_loss = model(**batch).loss.item()
opt = optimfx.AdaFactor(model.parameters(), lr=1e-3, relative_step=False,
                        scale_parameter=False, warmup_init=False,
                        min_dim_size_to_factor=128)
warmup = 5
sched = torch.optim.lr_scheduler.LambdaLR(
    opt, lambda step: min(1.0, (step + 1) / warmup))
for step in range(10):
    q = model.encoder.block[0].layer[0].SelfAttention.q.weight
    start = q.detach().clone()
    lr = sched.get_last_lr()[0]
    opt.zero_grad()
    model(**batch).loss.backward()
    opt.step()
    sched.step()
    # clipped update: its RMS never exceeds the lr
    assert rms(q - start) <= lr * (1 + 1e-5)
external_loss = model(**batch).loss.item()
# [/external]

print(f"loss {first_loss:.2f} -> relative step {relative_loss:.2f}, "
      f"external lr {external_loss:.2f}")
assert relative_loss < first_loss and external_loss < first_loss
