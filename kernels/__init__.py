"""optimfx's kernels, installed as ``optimfx._kernels``.

* Triton kernels for CUDA tensors: kernel modules hold per-element maths and a host launcher each;
  grids, pointer tables, chunking and dtype grouping live in :mod:`._launcher`. Import a Triton
  kernel module only after checking Triton is available; set ``TRITON_INTERPRET=1`` *before* the
  first import to run them on CPU tensors.
* C kernels for the CPU path (``cpu_*.c``, with their host modules ``cpu_adam`` and ``cpu_eg``):
  built on first use with the system C compiler by :mod:`.cpu_build`, run over a tensor list by
  :mod:`.cpu_launcher`; they need neither Triton nor a GPU.
"""
