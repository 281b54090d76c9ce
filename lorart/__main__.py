"""``python -m lorart`` runs the ``lorart`` command."""

import sys

from .cli import main

sys.exit(main())
