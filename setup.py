"""Build the compiled kernel. Every Cython compiler directive and C flag lives here.

Everything else about the distribution (metadata, version, packages, package
data) is declared in pyproject.toml; the sdist's contents in MANIFEST.in.

Environment switches:
  PYSCHED_DEBUG=1     bounds/wraparound checks on, line tracing for coverage and
                      profilers, CYTHON_TRACE_NOGIL defined, debug symbols kept.
  PYSCHED_ANNOTATE=1  write the annotated HTML (pysched/_core.html) next to the source.

Release builds (the default) are optimised and carry no debug information:
the wheel's extension is stripped on Linux (the linker's ``-s``; only the
dynamic symbol ``PyInit__core`` is needed to import it), and never has DWARF
sections elsewhere (``-g0``; MSVC keeps its debug information in a separate
PDB that is not packaged anyway).

Cythonization runs inside ``build_ext``, not when this file is imported, so
making the sdist (or reading metadata) never writes ``pysched/_core.c``: the
sdist ships the ``.pyx``/``.pxd``/``.pxi`` sources and every build generates
the C with the Cython that ``[build-system]`` pins.
"""

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

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
    # The kernel's objects hold C pointers into one process's tables:
    # pickling them could never be meaningful, so Cython generates no
    # __reduce__ (the stub, checked by stubtest, has none either).
    "auto_pickle": False,
}
macros = [("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION")]
if DEBUG:
    macros += [("CYTHON_TRACE", "1"), ("CYTHON_TRACE_NOGIL", "1")]

# C flags per compiler family (build_ext.compiler.compiler_type): GCC and clang
# ("unix", and MinGW) understand the same flags, MSVC its own. (compile, link)
FLAGS = {
    "unix": (["-O0", "-g"], []) if DEBUG else (["-O3", "-g0"], ["-s"] if sys.platform.startswith("linux") else []),
    "msvc": (["/Od", "/Zi"], ["/DEBUG"]) if DEBUG else (["/O2"], []),
}
FLAGS["mingw32"] = FLAGS["cygwin"] = FLAGS["unix"]


class BuildExt(build_ext):
    """Cythonize with the directives above, then compile with the flags of the compiler in use.

    Cythonization happens here, when extensions are built, and not in
    ``finalize_options``: making the sdist finalizes ``build_ext`` (to list the
    sources) and must neither need Cython nor generate C.
    """

    def build_extensions(self) -> None:
        # Imported here, not at the top: only building the extension needs Cython and numpy.
        import numpy as np
        from Cython.Build import cythonize

        # cythonize regenerates the C only when a source is newer than it, but
        # the C also depends on the directives (PYSCHED_DEBUG switches them):
        # a stamp of the directives the C was generated with forces the rerun.
        stamp = Path(self.build_temp, "cython-directives.txt")
        mode = repr(sorted(directives.items()))
        force = bool(self.force) or not stamp.is_file() or stamp.read_text(encoding="utf-8") != mode
        compile_args, link_args = FLAGS.get(self.compiler.compiler_type, ([], []))
        for ext in self.extensions:
            (generated,) = cythonize([ext], compiler_directives=directives, annotate=ANNOTATE, force=force)
            ext.sources, ext.depends = generated.sources, generated.depends
            ext.include_dirs = [*ext.include_dirs, np.get_include()]
            ext.extra_compile_args = [*ext.extra_compile_args, *compile_args]
            ext.extra_link_args = [*ext.extra_link_args, *link_args]
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(mode, encoding="utf-8")
        super().build_extensions()


extensions = [Extension("pysched._core", ["pysched/_core.pyx"], define_macros=macros)]

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
