"""``python -m pysched.tools.bench``: ``pysched bench`` on its own."""

import sys

from pysched.tools.bench.command import main

if __name__ == "__main__":
    sys.exit(main())
