"""`python -m serving.weights ...`: the older spelling of `python -m serving weights ...` (serving/cli/weights.py).

It runs the entry module, which starts from the composition root (serving/ must not import it).
"""

import runpy
import sys

if __name__ == "__main__":
    sys.argv = ["python -m serving", "weights", *sys.argv[1:]]
    runpy.run_module("serving", run_name="__main__", alter_sys=True)
