"""``python -m genrefine.cli``."""

import sys

from . import main

sys.exit(main())
