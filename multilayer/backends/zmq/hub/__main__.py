"""``python -m multilayer.backends.zmq.hub``: the same as ``multilayer hub``."""

import sys

from .main import main

sys.exit(main())
