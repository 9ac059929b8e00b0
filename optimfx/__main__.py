"""``python -m optimfx``: the ``optimfx`` command."""

import sys

from .cli import main

sys.exit(main())
