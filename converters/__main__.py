"""``python -m nonlocal_net.converters``: the ``vnl-convert`` command line."""

import sys

from .cli import main

sys.exit(main())
