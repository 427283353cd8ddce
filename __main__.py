"""`python -m q8 ...` runs q8convert (the same as the `q8convert` command)."""

import sys

from .tools.convert import main

sys.exit(main())
