"""`python -m rlsync.cli ...` is the same as the `rlsync` console script."""

import sys

from rlsync.cli import main

sys.exit(main())
