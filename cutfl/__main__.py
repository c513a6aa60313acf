"""`python -m cutfl ...` is `cutfl ...`."""

import sys

from cutfl.cli import main

sys.exit(main())
