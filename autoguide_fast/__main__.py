"""``python -m autoguide_fast ...``: the ``autoguide-fast`` command (toy, demo, generate)."""

import sys

from .cli import main

sys.exit(main())
