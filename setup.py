"""Build the compiled kernel. Every Cython compiler directive lives here.

Environment switches:
  PYSCHED_DEBUG=1     bounds/wraparound checks on, line tracing for coverage and
                      profilers, CYTHON_TRACE_NOGIL defined.
  PYSCHED_ANNOTATE=1  write the annotated HTML (pysched/_core.html) next to the source.
"""

import os

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("PYSCHED_DEBUG", "") not in ("", "0")
ANNOTATE = os.environ.get("PYSCHED_ANNOTATE", "") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
    "linetrace": DEBUG,
    "profile": DEBUG,
}
macros = [("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")]
if DEBUG:
    macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]

extensions = [
    Extension(
        "pysched._core",
        ["pysched/_core.pyx"],
        include_dirs=[np.get_include()],
        define_macros=macros,
        extra_compile_args=["-O0", "-g"] if DEBUG else ["-O3"],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, annotate=ANNOTATE))
