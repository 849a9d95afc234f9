"""Developer tools: the ``pysched`` command line, the fleet simulator and the benchmark.

None of this is the library: ``import pysched`` does not load it, and the
library never imports it. :mod:`pysched.tools.cli` is the ``pysched``
command; :mod:`pysched.tools.simulate` is ``pysched simulate`` (a simulated
fleet against a real scheduler); :mod:`pysched.tools.bench` is ``pysched
bench`` (pysched side by side with a pure-Python indexed peer and a model of
the legacy design, both modules of it); :mod:`pysched.tools.argtypes` holds
the argparse types every subcommand shares.
"""
