"""``python -m pysched``: the command line, see :mod:`pysched.tools.cli`."""

from pysched.tools.cli import entry

if __name__ == "__main__":
    entry()
