"""``python -m pysched``: the command line, see :mod:`pysched.cli`."""

from pysched.cli import entry

if __name__ == "__main__":
    entry()
