"""Run a C kernel over a list of tensors on several CPU threads.

A call covers ``T`` tensors, described to the kernel by an int64 table (one row per tensor: its
pointers and per-tensor values, the kernel's own columns). The work is cut into *tasks*, rows
``(tensor, start, end)`` of int64 ``[n_tasks, 3]`` tables: the elements of all tensors, in order,
split into one contiguous *share* per thread (a tensor may be split between two shares, at an even
element, or a multiple of a kernel's chunk). The number of shares is torch's thread count
(``torch.get_num_threads()``); a call under :data:`MIN_ELEMENTS_PER_THREAD` elements per thread
takes fewer, down to one.

Where the kernels are built with OpenMP (Linux: the runtime torch runs ATen's threads on, see
``cpu_build.openmp_runtime``) one call takes every share and runs them on torch's own threads;
elsewhere each share is one call on a thread of a pool here (``ctypes`` releases the GIL). Task
tables depend only on the tensors' sizes and the thread count, and are cached.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence, Union

import torch

Tensor = torch.Tensor

#: below this many elements per thread a thread's start costs more than its share of the work
MIN_ELEMENTS_PER_THREAD = 1 << 16
#: columns of the task table
TASK_COLUMNS = 3

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)


def _executor(workers: int) -> ThreadPoolExecutor:
    """A pool of at least ``workers`` threads for this process (a forked child makes its own). A
    pool too small is replaced, not shut down: another thread may still be submitting to it."""
    global _pool, _pool_key
    with _pool_lock:
        pid, size = _pool_key
        if _pool is None or pid != os.getpid() or size < workers:
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="optimfx-cpu")
            _pool_key = (os.getpid(), workers)
        return _pool


def threads_for(total: int) -> int:
    return max(1, min(torch.get_num_threads(), total // MIN_ELEMENTS_PER_THREAD))


Align = Union[int, tuple[int, ...]]


@functools.lru_cache(maxsize=256)
def task_tables(numels: tuple[int, ...], threads: int, align: Align = 2) -> tuple[Tensor, ...]:
    """One ``[n, 3]`` int64 task table per thread: all elements in order, in ``threads`` shares of
    about equal size, a tensor cut only at multiples of ``align`` elements (one value for all
    tensors, or one per tensor)."""
    total = sum(numels)
    share = -(-total // threads)
    tables: list[list[tuple[int, int, int]]] = [[] for _ in range(threads)]
    thread, room = 0, share
    aligns = align if isinstance(align, tuple) else (align,) * len(numels)
    for index, (n, unit) in enumerate(zip(numels, aligns)):
        start = 0
        while start < n:
            take = n - start
            if thread < threads - 1 and take > room:
                take = min(take, -(-room // unit) * unit)
            tables[thread].append((index, start, start + take))
            start += take
            room -= take
            if room <= 0 and thread < threads - 1:
                thread, room = thread + 1, share
    return tuple(torch.tensor(rows, dtype=torch.int64).reshape(-1, TASK_COLUMNS) for rows in tables if rows)


def run(kernel: Callable[..., None], openmp: bool, table: Tensor, numels: Sequence[int], *args: object,
        align: Align = 2) -> None:
    """Call ``kernel(table_ptr, shares_ptr, n_shares, *args)`` on the elements of tensors ``numels``
    (``table`` is the kernel's per-tensor table, kept alive for the calls), tensors cut at multiples
    of ``align`` elements (one value, or one per tensor). ``shares`` is int64 ``[n, 2]``: each
    share's task table and task count. An ``openmp`` kernel takes every share in one call and runs
    them on torch's OpenMP threads; else each share is one call, on threads of this module's pool."""
    numels = tuple(numels)
    total = sum(numels)
    if total == 0:
        return
    tasks = task_tables(numels, threads_for(total), align)
    shares = _shares(tasks)
    table_ptr = ctypes.c_void_p(table.data_ptr())
    if openmp or len(tasks) == 1:
        kernel(table_ptr, ctypes.c_void_p(shares.data_ptr()), len(tasks), *args)
        return
    calls = [(table_ptr, ctypes.c_void_p(shares[k].data_ptr()), 1, *args) for k in range(len(tasks))]
    pool = _executor(len(calls) - 1)
    futures = [pool.submit(kernel, *call) for call in calls[1:]]
    kernel(*calls[0])
    for f in futures:
        f.result()


@functools.lru_cache(maxsize=256)
def _shares(tasks: tuple[Tensor, ...]) -> Tensor:
    """int64 ``[n, 2]``: the address and row count of each task table (cached with the tables)."""
    return torch.tensor([[t.data_ptr(), t.shape[0]] for t in tasks], dtype=torch.int64)
