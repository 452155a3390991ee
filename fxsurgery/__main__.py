"""``python -m fxsurgery``: the command line."""

import sys

from fxsurgery.cli import main

sys.exit(main())
