"""`python -m serving ...`: the command line (predict, validate, train, weights), started from model.py."""

import sys

from model import families
from serving.cli.main import main

sys.exit(main(families=families))
