"""The optimizers under test: one :class:`~optimfx.bench.registry.Impl` per entry.

Each entry carries a name, a factory ``params -> optimizer`` (``lr`` = ``BENCH_LR``, tiny, so
repeated steps stay finite) and its byte model (minimum bytes moved per parameter per step: 28
for fp32 Adam/AdaX); state bytes are measured from the state tensors after the warm-up step. The
entries themselves are defined once, in :mod:`optimfx.bench.registry`, and shared with
``optimfx bench``:

* ``torch.Adam:single`` (``foreach=False``, the CPU default), ``torch.Adam:foreach``,
  ``torch.Adam:fused``;
* every optimfx optimizer with its default backend (``AdaX:auto``, ``AdaXW:auto``, ... — "auto"
  is the reference on CPU, Triton on CUDA), so new optimizers join when they are exported;
* ``AdaX:compiled`` (skipped in smoke runs: compiling costs seconds per tensor shape).

``OPTIMFX_BENCH_OPTIMIZERS`` (comma-separated names, as ``optimfx bench --optimizers``) narrows it.
"""

from __future__ import annotations

import os

from optimfx.bench.registry import BENCH_LR, Impl, select, state_bytes, torch_adam_default

#: Entries added to the defaults; kept out of smoke runs.
EXTRA = ("AdaX:compiled",)
_ENV = os.environ.get("OPTIMFX_BENCH_OPTIMIZERS")

CASES: list[Impl] = (select([n.strip() for n in _ENV.split(",") if n.strip()]) if _ENV
                     else select() + select(EXTRA))


def slow_to_warm(impl: Impl) -> bool:
    """Entries a smoke run skips (compilation)."""
    return impl.variant == "compiled"


__all__ = ["BENCH_LR", "CASES", "Impl", "slow_to_warm", "state_bytes", "torch_adam_default"]
