"""FSDP2 + DCP and ZeRO-1 (ChildTuning-F included) with optimfx. Run by tests/docs/test_docs.py.

Launch with ``torchrun --nproc_per_node 2 distributed_fsdp2.py`` (any backend); started without
torchrun, the script runs itself on 2 CPU processes with gloo.
"""

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

import optimfx


def build(mesh):
    torch.manual_seed(0)  # the same initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(16, 33), torch.nn.GELU(), torch.nn.Linear(33, 4))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # the optimizer is built on the DTensor parameters, after fully_shard
    return model, optimfx.AdaFactor(model.parameters(), beta1=0.9)


def train(model, opt, steps):
    rank, world = dist.get_rank(), dist.get_world_size()
    for step in steps:
        gen = torch.Generator().manual_seed(step)  # this step's global batch; each rank takes a slice
        x, y = torch.randn(8 * world, 16, generator=gen), torch.randn(8 * world, 4, generator=gen)
        x, y = x[8 * rank:8 * (rank + 1)], y[8 * rank:8 * (rank + 1)]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def save(model, opt, path):
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(state, checkpoint_id=path)


def load(model, opt, path):
    # on a fresh optimizer, get_optimizer_state_dict first runs one step with zero gradients and lr 0
    # to create the state it loads into; optimfx moves no parameter there
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])


def fsdp2_and_dcp(path):
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))  # "cuda" on GPUs
    model, opt = build(mesh)
    train(model, opt, range(6))
    expected = [p.full_tensor() for p in model.parameters()]

    model, opt = build(mesh)
    train(model, opt, range(3))
    save(model, opt, path)
    model, opt = build(mesh)  # a new job: fresh model and optimizer
    load(model, opt, path)
    train(model, opt, range(3, 6))
    assert all(torch.equal(p.full_tensor(), e) for p, e in zip(model.parameters(), expected))

    # the factored statistics of the (33, 16) weight: rows sharded with it, columns replicated
    state = opt.state[model[0].weight]
    assert isinstance(state["exp_avg_sq_row"], DTensor) and state["exp_avg_sq_row"].shape == (33,)
    assert state["exp_avg_sq_row"].placements[0].is_shard()
    assert state["exp_avg_sq_col"].placements[0].is_replicate() and state["exp_avg_sq_col"].shape == (16,)


def zero_redundancy():
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)))
    # each rank keeps the AdaFactor state of the whole parameters it owns, factored as usual
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimfx.AdaFactor, beta1=0.9)
    train(model, opt, range(3))
    weights = [p.detach().clone() for p in model.parameters()]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, weights)
    assert all(torch.equal(a, b) for a, b in zip(gathered[0], gathered[-1]))


def zero_redundancy_child_tuning():
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)))
    # F-mode masks are keyed by a parameter's number: number them as one optimizer over the model would
    optimfx.set_mask_streams(model.parameters())
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimfx.ChildTuningAdamW,
                                  lr=1e-2, mode="ChildTuning-F", reserve_p=0.3)
    train(model, opt, range(3))
    # the masks a single process draws: one ChildTuningAdamW over a copy of the model, full batches
    torch.manual_seed(0)
    single = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    reference = optimfx.ChildTuningAdamW(single.parameters(), lr=1e-2, mode="ChildTuning-F", reserve_p=0.3)
    world = dist.get_world_size()
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(8 * world, 16, generator=gen), torch.randn(8 * world, 4, generator=gen)
        reference.zero_grad()
        torch.nn.functional.mse_loss(single(x), y).backward()
        reference.step()
    for p, q in zip(model.parameters(), single.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)  # DDP averages half-batch means


def main(path):
    dist.init_process_group()  # rank and world size from torchrun's environment
    try:
        fsdp2_and_dcp(path)
        zero_redundancy()
        zero_redundancy_child_tuning()
    finally:
        dist.destroy_process_group()


def _local(rank, port, path):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    main(path)


if __name__ == "__main__":
    if "RANK" in os.environ:
        main(os.path.join(tempfile.gettempdir(), "optimfx-dcp-recipe"))
    else:
        with socket.socket() as s, tempfile.TemporaryDirectory() as tmp:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            s.close()
            torch.multiprocessing.start_processes(_local, args=(port, os.path.join(tmp, "ckpt")), nprocs=2,
                                                  start_method="fork")
