"""`python -m serving serve|batch ...`: the same commands as `python -m cascade serve|batch`."""

import sys

from .cli import main

sys.exit(main())
