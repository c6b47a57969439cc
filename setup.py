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

Each build records the sha256 of every built module's sources (.py, .pxd, .pyx), of the C files it builds from
besides them (`includes`: its C sources and the headers they and its `cdef extern from` include, e.g. the vendored
xxHash; each extension's `depends`, so an edit of one also rebuilds it) and of the built file in
`_compiled_sources.json` beside it (per package directory; `dualpath_jax/compiled.py` reads it): a source that
is only newer than the build, with the same bytes, does not make the build stale.
"""

import hashlib
import json
import multiprocessing
import os
import platform
import re

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# dualpath_jax/compiled.py reads these records (SOURCES_RECORD, SOURCE_SUFFIXES there)
_SOURCES_RECORD = "_compiled_sources.json"
_SOURCE_SUFFIXES = (".py", ".pxd", ".pyx")

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


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _module_sources(name: str) -> dict[str, str]:
    """The sha256 of each source (.py, .pxd, .pyx) of the module `name`, by file name."""
    stem = os.path.join(*name.split("."))
    paths = [stem + s for s in _SOURCE_SUFFIXES if os.path.exists(stem + s)]
    return {os.path.basename(p): _sha256(p) for p in paths}


_C_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"', re.M)  # (not the `<...>` system headers)
_CDEF_EXTERN = re.compile(r'^[ \t]*cdef[ \t]+extern[ \t]+from[ \t]+"([^"]+)"', re.M)


def _c_files(sources: list[str], include_dirs: list[str]) -> list[str]:
    """The C files an extension of `sources` builds from besides its Cython sources: its C sources and every header
    that one of them, or a `cdef extern from` of its .pyx / .pxd, includes in quotes (found beside the file that
    includes it, or in `include_dirs`; one found nowhere is the compiler's own), recursively."""

    def found(name: str, beside: str) -> list[str]:
        for d in (beside, *include_dirs):
            if os.path.isfile(os.path.join(d, name)):
                return [os.path.normpath(os.path.join(d, name))]
        return []

    todo, headers = [], {}
    for src in sources:
        if src.endswith(_SOURCE_SUFFIXES):
            for cython in {src, os.path.splitext(src)[0] + ".pxd"}:
                if os.path.exists(cython):
                    with open(cython) as f:
                        todo += [p for n in _CDEF_EXTERN.findall(f.read()) for p in found(n, os.path.dirname(src))]
        else:
            todo.append(os.path.normpath(src))
    while todo:
        path = todo.pop()
        if path in headers:
            continue
        headers[path] = None
        with open(path, errors="replace") as f:
            todo += [p for n in _C_INCLUDE.findall(f.read()) for p in found(n, os.path.dirname(path))]
    return sorted(headers)


def _module_includes(ext: Extension) -> dict[str, str]:
    """The sha256 of each of `ext`'s C files (`_c_files`), by path relative to the module's directory."""
    home = os.path.dirname(os.path.join(*ext.name.split(".")))
    return {os.path.relpath(p, home): _sha256(p) for p in ext.depends}


for _ext in _EXTENSIONS:  # (depends: setuptools rebuilds a module when one of them is newer than its build)
    _ext.depends = sorted(set(_ext.depends) | set(_c_files(_ext.sources, _ext.include_dirs)))
# the sources as cythonize reads them next (an edit during the build then shows as stale, not as built)
_SOURCES = {ext.name: _module_sources(ext.name) for ext in _EXTENSIONS}
_INCLUDES = {ext.name: _module_includes(ext) for ext in _EXTENSIONS}


class _RecordingBuildExt(build_ext):
    """build_ext that records what each module was built from in `_compiled_sources.json` beside the built
    file: in the package directories for `--inplace` and `pip install -e .`, in the build directory (so the
    wheel) otherwise. A module whose build failed loses its entry (the times decide for it, as before)."""

    def run(self):
        self._built = set()
        super().run()  # (for --inplace: builds in the build directory, then copies the built files over)
        by_dir: dict[str, dict[str, dict | None]] = {}
        for ext in self.extensions:
            built = self.get_ext_fullpath(ext.name)  # where the built file is now (inplace again after run)
            entry = None
            if ext.name in self._built and os.path.exists(built):
                entry = {
                    "built": os.path.basename(built),
                    "built_sha256": _sha256(built),
                    "sources": _SOURCES[ext.name],
                    **({"includes": _INCLUDES[ext.name]} if _INCLUDES[ext.name] else {}),
                }
            by_dir.setdefault(os.path.dirname(built), {})[ext.name.rsplit(".", 1)[-1]] = entry
        for directory, entries in by_dir.items():
            _write_record(os.path.join(directory, _SOURCES_RECORD), entries)

    def build_extension(self, ext):
        super().build_extension(ext)  # (an optional one that fails raises here: not recorded)
        self._built.add(ext.name)


def _write_record(path: str, entries: dict[str, dict | None]) -> None:
    """Updates the record at `path` with `entries` (None: drop the module's entry), written whole, atomically."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        record = {}
    if not isinstance(record, dict):
        record = {}
    for module, entry in entries.items():
        record.pop(module, None)
        if entry is not None:
            record[module] = entry
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


# cythonized and compiled in parallel: one at a time took ~80 s of the install on the 2-core dev VM, ~42 s on both
_JOBS = os.cpu_count() or 1
# (cythonize's worker processes re-import this script where they do not fork)
_CYTHON_JOBS = _JOBS if multiprocessing.get_start_method() == "fork" else 0
_MODULES = cythonize(_EXTENSIONS, compiler_directives=_DIRECTIVES, nthreads=_CYTHON_JOBS)
for _ext in _MODULES:  # cythonize makes new Extension objects and drops `optional`: set it again
    _ext.optional = True

setup(ext_modules=_MODULES, cmdclass={"build_ext": _RecordingBuildExt}, options={"build_ext": {"parallel": _JOBS}})
