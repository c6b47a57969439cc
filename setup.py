"""Builds the simulator's compiled hot paths with Cython; the package metadata is in setup.cfg.

- `dualpath_jax/sim/simulator.py` and `dualpath_jax/sim/network.py` compiled in Cython's pure Python mode with
  the types of `simulator.pxd` / `network.pxd` (the same sources run as plain Python where the extensions are
  missing);
- `dualpath_jax/sim/_heap.pyx`, the event and completion heaps in C (fallback: `heap.PyTimeHeap`);
- `schedulers/_dualpath.pyx`, the DualPath policy's inner loops (DE phase 1, the placement loop with the PE and
  DE choices) and the policies' duplicate-id check, on int64 (fallback: the same loops in Python);
- `dualpath_jax/sim/_csvrows.pyx`, the results' CSV rows formatted in C (fallback: `csv.writer`, the same bytes);
- `dualpath_jax/store/_verify.pyx`, the KV store's verified reads (pread or copy, then XXH3 of each Layer Block
  while it is in cache) in C with the GIL released, on the xxHash library vendored in
  `dualpath_jax/store/_xxhash/` (fallback: the store's Python loops over python-xxhash).

All are optional: a machine without a C compiler installs the pure-Python package (a warning says so).
`-ffp-contract=off` keeps a*b+c from becoming one rounded FMA, so compiled and Python results are equal.
"""

import multiprocessing
import os
import platform

from Cython.Build import cythonize
from setuptools import Extension, setup

_ARGS = ["-O2", "-ffp-contract=off"]
_EXTENSIONS = [
    Extension("dualpath_jax.sim.network", ["dualpath_jax/sim/network.py"], extra_compile_args=_ARGS),
    Extension("dualpath_jax.sim.simulator", ["dualpath_jax/sim/simulator.py"], extra_compile_args=_ARGS),
    Extension("dualpath_jax.sim._heap", ["dualpath_jax/sim/_heap.pyx"], extra_compile_args=_ARGS),
    Extension("schedulers._dualpath", ["schedulers/_dualpath.pyx"], extra_compile_args=_ARGS),
    Extension("dualpath_jax.sim._csvrows", ["dualpath_jax/sim/_csvrows.pyx"], extra_compile_args=_ARGS),
]
# xxHash's x86 dispatcher (SSE2 / AVX2 / AVX-512 chosen at run time) builds with baseline flags on x86 only
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
_EXTENSIONS.append(
    Extension(
        "dualpath_jax.store._verify",
        ["dualpath_jax/store/_verify.pyx"] + (["dualpath_jax/store/_xxhash/xxh_x86dispatch.c"] if _X86 else []),
        include_dirs=["dualpath_jax/store"],
        define_macros=[("DP_XXH_X86_DISPATCH", "1")] if _X86 else [],
        extra_compile_args=["-O3"],
    )
)
_DIRECTIVES = {"language_level": 3, "annotation_typing": False, "boundscheck": False, "wraparound": False}

# cythonized and compiled in parallel: one at a time took ~80 s of the install on the 2-core dev VM, ~42 s on both
_JOBS = os.cpu_count() or 1
# (cythonize's worker processes re-import this script where they do not fork)
_CYTHON_JOBS = _JOBS if multiprocessing.get_start_method() == "fork" else 0
_MODULES = cythonize(_EXTENSIONS, compiler_directives=_DIRECTIVES, nthreads=_CYTHON_JOBS)
for _ext in _MODULES:  # cythonize makes new Extension objects and drops `optional`: set it again
    _ext.optional = True

setup(ext_modules=_MODULES, options={"build_ext": {"parallel": _JOBS}})
