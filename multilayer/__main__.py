"""``python -m multilayer``: the same as the ``multilayer`` command."""

import sys

from .cli import main

sys.exit(main())
