"""pytest-benchmark suite for optimizer steps (run explicitly: ``pytest benches``), and the scripts
run as ``python -m benches.<name>``.

Both put the repository root first on ``sys.path``, where the ``kernels/`` source folder (installed
as ``optimfx._kernels``) would shadow the PyPI package ``kernels`` (Hugging Face's kernel hub, which
recent ``transformers`` imports for its models). The root is dropped again here: this package's
modules are found through the package itself, and ``optimfx`` is the installed one.
"""

import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _ROOT]
