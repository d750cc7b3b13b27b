"""`python -m serving ...`: the command line (predict, validate)."""

import sys

from serving.cli import main

sys.exit(main())
