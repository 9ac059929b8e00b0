"""Progress bars and log lines for ``optimfx bench``, on stderr.

Bars come from ``tqdm`` (in the ``bench`` extra) when it is installed and bars are enabled;
otherwise :func:`bar` returns a silent stand-in, so callers never branch on it. :func:`log` prints
through ``tqdm.write`` when tqdm is present, so a message never tears a bar apart.
"""

from __future__ import annotations

import sys
from typing import Any


class _Silent:
    """The part of ``tqdm``'s interface the benchmark uses, doing nothing."""

    def __enter__(self) -> "_Silent":
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        return None


def bar(total: int, desc: str, *, enabled: bool = True, unit: str = "it") -> Any:
    """A context-managed progress bar over ``total`` units (a silent one when disabled)."""
    if not enabled:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, mininterval=0.5)


def log(message: str) -> None:
    """One line on stderr that does not disturb an active bar."""
    try:
        from tqdm import tqdm
    except ImportError:
        print(message, file=sys.stderr, flush=True)
        return
    tqdm.write(message, file=sys.stderr)
