"""`python -m backends [--json] [--device D]`: the backend doctor (same as `python -m cascade backends`)."""

import sys

from .doctor import main

sys.exit(main())
