"""Run a function on 2 gloo ranks (CPU) from a test, and the small models the distributed tests share.

Processes are forked, not spawned: the children inherit the imported torch and optimfx, which saves
seconds of start-up per test file (the costly part of a 2-rank test on a 2-core machine).
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., None], port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., None], *args: Any) -> None:
    """``fn(rank, *args)`` on ``WORLD`` gloo ranks; an exception in any rank fails the caller."""
    mp.start_processes(_entry, args=(fn, _free_port(), args), nprocs=WORLD, join=True, start_method="fork")


def _save_result(rank: int, fn: Callable[[int], Any], out_dir: str) -> None:
    torch.save(fn(rank), os.path.join(out_dir, f"rank{rank}.pt"))


def collect_ranks(fn: Callable[[int], Any]) -> list[Any]:
    """``fn(rank)`` on ``WORLD`` gloo ranks; what each returned (tensors, lists, dicts), in rank order."""
    with tempfile.TemporaryDirectory() as out_dir:
        run_ranks(_save_result, fn, out_dir)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
