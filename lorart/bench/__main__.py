"""``python -m lorart.bench``: the same as ``lorart bench``."""

import sys

from lorart.commands.bench import main

sys.exit(main())
