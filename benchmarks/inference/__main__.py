"""``python -m benchmarks.inference [options]``: see :mod:`benchmarks.inference.run`."""

import sys

from benchmarks.inference.run import main

main(sys.argv[1:])
