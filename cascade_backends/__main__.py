"""`python -m cascade_backends [--json] [--device D]`: the device doctor (`python -m cascade backends` adds the
engine's per-stage dtypes)."""

import sys

from .doctor import main

sys.exit(main())
