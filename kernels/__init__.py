"""Triton kernels for optimfx, installed as ``optimfx._kernels``.

Kernel modules hold per-element maths and a host launcher each; grids, pointer tables, chunking and
dtype grouping live in :mod:`._launcher`. Import a kernel module only after checking Triton is
available; set ``TRITON_INTERPRET=1`` *before* the first import to run kernels on CPU tensors.
"""
