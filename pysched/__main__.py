"""``python -m pysched``: the command line, see :mod:`pysched.cli`."""

import os

# numpy's OpenBLAS worker threads otherwise spin and steal one of the two
# cores from the dispatch threads. Caveat: `python -m pysched` runs the
# package's __init__ (which imports numpy) before this file, so this only
# helps when numpy was not imported yet.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import sys  # noqa: E402

from pysched.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
