"""``python -m fedagg``: the same as the ``fedagg`` command."""

import sys

from .cli import main

sys.exit(main())
