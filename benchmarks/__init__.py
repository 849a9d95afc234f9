"""Benchmark scripts run from a source checkout (the Redis backend, the network service).

``pysched bench`` and its baselines are not here: they are :mod:`pysched.tools.bench`.
"""
