"""``python -m nonlocal_net.verify``: the same as ``vnl-verify``."""

import sys

from .cli import main

sys.exit(main())
