"""optimfx as a DeepSpeed client optimizer. Run by tests/docs/test_docs.py.

Started directly, the script runs itself on 2 CPU processes with gloo; under a launcher that sets
``RANK`` (``deepspeed``, ``torchrun``) it runs as one of its ranks. DeepSpeed is imported inside the
rank processes.
"""

import os
import socket
import warnings

import torch

import optimfx


def model_and_data(rank):
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    gen = torch.Generator().manual_seed(rank)  # each rank its own batches
    batches = [(torch.randn(8, 16, generator=gen), torch.randn(8, 4, generator=gen)) for _ in range(3)]
    return model, batches


def train(optimizer_cls, stage, rank, **kwargs):
    import deepspeed

    model, batches = model_and_data(rank)
    opt = optimizer_cls(model.parameters(), **kwargs)
    config = {
        "train_micro_batch_size_per_gpu": 8,
        "zero_optimization": {"stage": stage},
        # DeepSpeed asserts on client optimizers it does not know unless this is set
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    for x, y in batches:
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()
    return opt


def adafactor_stage0(rank):
    # stage 0 hands the client optimizer the model's own parameters: AdaFactor factors as usual
    opt = train(optimfx.AdaFactor, 0, rank, beta1=0.9)
    assert all("exp_avg_sq_row" in opt.state[p] for p in opt.param_groups[0]["params"] if p.dim() == 2)


def adax_stage2(rank):
    # ZeRO-1/2 give each rank a flat fp32 partition: fine for pointwise optimizers
    opt = train(optimfx.AdaX, 2, rank, lr=1e-2)
    assert [p.dim() for p in opt.param_groups[0]["params"]] == [1]


def adafactor_stage2(rank):
    # AdaFactor cannot factor a flat partition: it says so once and keeps a full-size statistic
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = train(optimfx.AdaFactor, 2, rank)
    assert any("cannot factor such a partition" in str(w.message) for w in caught)
    assert all("exp_avg_sq" in s for s in opt.state.values())


def main(rank):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # rank and world size from the environment
    adafactor_stage0(rank)
    adax_stage2(rank)
    adafactor_stage2(rank)


def _local(rank, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    main(rank)


if __name__ == "__main__":
    if "RANK" in os.environ:
        main(int(os.environ["RANK"]))
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.multiprocessing.start_processes(_local, args=(port,), nprocs=2, start_method="fork")
