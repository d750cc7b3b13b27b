"""`python -m serving.cli ...`: the command line without model families (validate); `python -m serving` has them."""

import sys

from serving.cli.main import main

sys.exit(main())
