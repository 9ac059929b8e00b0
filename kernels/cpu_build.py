"""Build the C kernels of optimfx's CPU fast path on first use, with the system C compiler.

The sources ship in the package (``optimfx/_kernels/*.c``). The first call of :func:`load` compiles
one into a shared library (well under a second) in a cache directory and loads it with ``ctypes``;
later calls, and later processes, load the cached library. The library is named by a hash of the
source, the compiler's identity, the flags and the machine, so an upgrade or another compiler
builds a new one. Compiling to a temporary file and renaming it makes concurrent first uses (the
ranks of a data-parallel job) safe.

Nothing here is needed: without a compiler (or with ``OPTIMFX_CPU_KERNELS=0``) :func:`load` returns
``None``, :func:`unavailable_reason` says why, and the callers keep their plain-PyTorch path.

Environment:
    ``OPTIMFX_CPU_KERNELS=0``: never build or load (the plain-PyTorch path everywhere).
    ``OPTIMFX_CACHE_DIR``: where libraries are kept (default ``$XDG_CACHE_HOME/optimfx`` or
    ``~/.cache/optimfx``).
    ``CC``: the compiler (default: Python's configured compiler, else ``cc``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

import torch

from . import cpu_launcher

#: IEEE semantics kept (no fast-math): ``errno`` and traps are not needed, and ``a*b + c`` is never
#: contracted into an FMA (only an explicit ``fmaf`` fuses), so the vectorised body and the scalar
#: tail of a loop round alike
BASE_FLAGS = ("-O3", "-std=c11", "-shared", "-fPIC", "-fno-math-errno", "-fno-trapping-math",
              "-ffp-contract=off")
_SOURCES = Path(__file__).resolve().parent
_lock = threading.Lock()
_loaded: dict[str, Optional[ctypes.CDLL]] = {}
_reasons: dict[str, str] = {}


def enabled() -> bool:
    """Whether the CPU kernels may be used (``OPTIMFX_CPU_KERNELS`` is not ``0``)."""
    return os.environ.get("OPTIMFX_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("OPTIMFX_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "optimfx"


def compiler() -> Optional[list[str]]:
    """The compiler command (``CC``, Python's configured ``CC``, then ``cc``), or ``None``."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc"):
        if candidate:
            words = shlex.split(candidate)
            if words and shutil.which(words[0]):
                return words
    return None


def isa_flags() -> tuple[str, ...]:
    """Vector instructions to compile for: AVX2 where torch found them on this CPU (x86-64), else
    the architecture's baseline (SSE2 on x86-64, NEON on arm64)."""
    if platform.machine().lower() in ("x86_64", "amd64"):
        try:
            capability = torch.backends.cpu.get_cpu_capability()
        except (AttributeError, RuntimeError):
            capability = "DEFAULT"
        if capability.startswith("AVX2") or capability.startswith("AVX512"):
            # torch's AVX2 kernels use FMA too (its lerp among them, which the kernels match)
            return ("-mavx2", "-mfma")
    return ()


def openmp_runtime() -> Optional[str]:
    """The GNU OpenMP runtime torch has loaded (Linux builds of torch run ATen's threads on it), or
    ``None``. Kernels built with ``-fopenmp`` name it by its soname, ``libgomp.so.1``, which the
    loader resolves to the copy already in the process: they run on torch's own worker threads,
    warm and not competing with them for the cores. A runtime under another file name (a wheel's
    renamed copy) would not be the one found, so then there is none to share."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return None
    shared = sorted(p for p in paths if Path(p).name == "libgomp.so.1")
    return shared[0] if shared and len(paths) == len(shared) else None


def _compiler_identity(cc: list[str]) -> str:
    try:
        out = subprocess.run(cc + ["--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def load(name: str) -> Optional[ctypes.CDLL]:
    """The library built from ``<name>.c`` beside this module, or ``None`` when it cannot be had
    (the reason is kept for :func:`unavailable_reason`). Built at most once per process."""
    if not enabled():
        _reasons[name] = "OPTIMFX_CPU_KERNELS=0"
        return None
    if name in _loaded:
        return _loaded[name]
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = _build_and_load(name)
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _reasons[name] = str(exc)
                _loaded[name] = None
        return _loaded[name]


def unavailable_reason(name: str) -> Optional[str]:
    """Why :func:`load` returned ``None`` for ``name`` (``None`` if it loaded or was not tried)."""
    if not enabled():
        return "OPTIMFX_CPU_KERNELS=0"
    return _reasons.get(name)


#: the C kernels of the CPU path
KERNELS = ("cpu_adam", "cpu_adafactor", "cpu_eg")


def status() -> dict[str, str]:
    """``{kernel: "ready" or why it is not}`` for every CPU kernel, building them if needed."""
    return {name: "ready" if load(name) is not None else (unavailable_reason(name) or "unavailable")
            for name in KERNELS}


def _build_and_load(name: str) -> ctypes.CDLL:
    if sys.platform == "win32":
        raise RuntimeError("the CPU kernels are built with a Unix C compiler; none on Windows")
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    source = (_SOURCES / f"{name}.c").read_bytes()
    headers = [h.read_bytes() for h in sorted(_SOURCES.glob("*.h"))]
    identity = [source, *headers, " ".join(cc).encode(), _compiler_identity(cc).encode(), platform.machine().encode()]
    openmp = ("-fopenmp",) if openmp_runtime() is not None else ()
    errors = []
    # with OpenMP where torch's runtime can be shared, and again without it if that does not build
    for extra in dict.fromkeys([openmp, ()]):
        flags = BASE_FLAGS + isa_flags() + extra
        digest = hashlib.sha256(b"\0".join(identity + [" ".join(flags).encode()])).hexdigest()
        target = cache_dir() / f"{name}-{digest[:20]}.so"
        try:
            if not target.exists():
                _compile(cc, flags + (f"-I{_SOURCES}",), source, target)
            return ctypes.CDLL(str(target))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
    raise RuntimeError("; ".join(errors))


def uses_openmp(lib: ctypes.CDLL) -> bool:
    """Whether ``lib`` runs its shares on OpenMP threads itself (else one call per thread)."""
    return bool(lib.optimfx_openmp())


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain(t: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)) -> bool:
    """Whether a kernel can read ``t`` through its pointer: a contiguous CPU tensor of one of
    ``dtypes``, not a subclass (a DTensor, ...) that may not hold its elements at ``data_ptr()``."""
    return t.is_cpu and t.dtype in dtypes and t.is_contiguous() and type(t) in _PLAIN_TYPES


def written(tensors: list[torch.Tensor]) -> None:
    """Tell autograd that a kernel wrote ``tensors`` in place through their pointers: a graph that
    saved one of them then refuses to run backward, as after any in-place op."""
    torch.autograd.graph.increment_version(tensors)


#: a C function's ctypes signature: argument types and result type
Signature = tuple[list[Any], Any]


class Library:
    """The functions of one kernel library (``<name>.c``), bound with their ctypes signatures on
    first use (building the library then, if needed).

    Attributes:
        openmp: whether the library runs its shares on torch's OpenMP threads itself (set when the
            library is bound; the launcher then makes one call per pass).
    """

    def __init__(self, name: str, signatures: dict[str, Signature]) -> None:
        self.name = name
        self.signatures = signatures
        self.openmp = False
        self._functions: dict[str, ctypes._CFuncPtr] = {}

    def function(self, fn_name: str) -> Optional[ctypes._CFuncPtr]:
        """The bound C function ``fn_name``, or ``None`` when the library cannot be had."""
        if not self._functions:
            lib = load(self.name)
            if lib is None:
                return None
            functions = {}
            for name, (argtypes, restype) in self.signatures.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = argtypes, restype
                functions[name] = fn
            self.openmp = uses_openmp(lib)
            # published whole: another thread sees an empty or a complete table
            self._functions = functions
        return self._functions[fn_name]

    def available(self) -> bool:
        """Whether the library is built (building it on the first call) and enabled."""
        return enabled() and self.function(next(iter(self.signatures))) is not None

    def threads(self, numel: int) -> int:
        """Threads for one call of a function that splits ``numel`` elements itself (one when the
        library has no OpenMP)."""
        return cpu_launcher.threads_for(numel) if self.openmp else 1


def _compile(cc: list[str], flags: tuple[str, ...], source: bytes, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "kernel.c"
        src.write_bytes(source)
        out = Path(tmp) / target.name
        done = subprocess.run(cc + list(flags) + [str(src), "-o", str(out), "-lm"], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"compiling {target.stem.rsplit('-', 1)[0]}.c failed: {done.stderr.strip()[:2000]}")
        os.replace(out, target)
