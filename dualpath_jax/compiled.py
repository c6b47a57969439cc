"""The optional compiled hot paths (setup.py builds them with Cython) and the switch to run without them.

Compiled when the package is installed with its build (`pip install -e .` on a machine with a C compiler):
- `dualpath_jax.sim.simulator`: simulator.py itself, compiled in Cython's pure Python mode (types in
  simulator.pxd: the engines, requests and the simulator become extension types);
- `dualpath_jax.sim.network`: network.py itself, compiled in Cython's pure Python mode (types in network.pxd);
- `dualpath_jax.sim._heap`: the simulator's event queue and the network's completion heap (`heap.TimeHeap`);
- `schedulers._dualpath`: the DualPath policy's fetch (`DualPathPolicy._schedule_c`: DE phase 1 whole, group sums
  included (`phase1`, twin of `_Scratch` + `DualPathPolicy._phase1_ints`), the placement loop after it
  (`Placement`), the PE and DE choices, a node's least-loaded PE) and every policy's duplicate-id check of a
  QueueWindow;
- `dualpath_jax.sim._csvrows`: the results' CSV rows (turns.csv, links.csv) formatted in C;
- `dualpath_jax.store._verify`: the KV store's verified reads of xxh3 blocks (read or copy, then hash each Layer
  Block while it is in cache) with the GIL released.
Each has a Python twin that gives the same results (tests/test_compiled.py checks it). Set the environment
variable DUALPATH_PURE_PYTHON=1 to run the Python twins (debugging, or the same-run baseline of a speed
benchmark; 0 or unset: the compiled modules; true/false, yes/no and on/off work too, any other value is an
error at import); `status()` says which of them run.

A compiled module whose source was edited after the build would run the old code: `load` then runs the Python
source instead and logs a warning saying to rebuild (`pip install -e .`, or `python setup.py build_ext
--inplace`). Edited means a different content: setup.py records the sha256 of each module's sources (.py, .pxd,
.pyx), of the C files it builds from besides them (its `includes`: the store's `_verify_c.h` and vendored
`_xxhash/`) and of the built file in `_compiled_sources.json` beside it, so a source that is only newer (a `cp` back,
a `git checkout` or `git stash pop` that restores the same bytes, a save without change) keeps the compiled
module. A build without that record (before it existed) falls back to the times: a source newer than the built
file is an edit. `stale_modules()` says which built modules run as Python, and why.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys

from absl import logging


def _pure_python(value: str) -> bool:
    """DUALPATH_PURE_PYTHON: 1/true/yes/on runs the Python twins, ''/0/false/no/off the compiled modules; anything
    else is an error naming it (`false` and `no` used to turn the compiled modules off, any non-"0" value did)."""
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(f"DUALPATH_PURE_PYTHON={value!r}: use 1 (run the Python twins) or 0 (the compiled modules)")


PURE_PYTHON = _pure_python(os.environ.get("DUALPATH_PURE_PYTHON", ""))


def _built_file(module_name: str) -> str:
    """The compiled file the module was imported from; '' when it is not importable or is a .py file."""
    try:
        path = getattr(importlib.import_module(module_name), "__file__", "") or ""
    except ImportError:
        return ""
    return "" if path.endswith(".py") else path


def _source(built: str, module_name: str, suffix: str) -> str:
    """The source file `<module>.<suffix>` next to the compiled file."""
    return os.path.join(os.path.dirname(built), module_name.rsplit(".", 1)[-1] + suffix)


# the compiled modules (setup.py's extensions)
MODULES = (
    "dualpath_jax.sim.simulator",
    "dualpath_jax.sim.network",
    "dualpath_jax.sim._heap",
    "schedulers._dualpath",
    "dualpath_jax.sim._csvrows",
    "dualpath_jax.store._verify",
)
# setup.py's record of each build, one per package directory: {module: {"built": file name, "built_sha256": ...,
# "sources": {file name: sha256}, "includes": {path: sha256}}} (the module's last name; the sources are the .py, .pxd,
# .pyx it has; the includes, where it has any, the C files it builds from, by path relative to its directory)
SOURCES_RECORD = "_compiled_sources.json"
SOURCE_SUFFIXES = (".py", ".pxd", ".pyx")

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str) -> str:
    """The sha256 of a file's bytes (hex); cached while its size and mtime stay the same."""
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _DIGESTS:
        with open(path, "rb") as f:
            _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _DIGESTS[key]


def _build_record(built: str, module_name: str) -> dict | None:
    """setup.py's record of the build of `module_name` beside `built`; None where there is none (a build before
    records, or one whose build of this module failed) or it is unreadable."""
    try:
        with open(os.path.join(os.path.dirname(built), SOURCES_RECORD)) as f:
            record = json.load(f).get(module_name.rsplit(".", 1)[-1])
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(record, dict) and isinstance(record.get("sources"), dict)
    return record if ok else None


def stale_reason(module_name: str) -> str:
    """Why the module's build is older than its sources ('' when it is not, or the module is not compiled).

    Only where a source (.py, .pxd, .pyx, or a C file the record lists as included) is newer than the built file
    (5 s of slack: an installer may write the sources a moment after it) are contents compared: with setup.py's
    record of the build, the sources are edited when one differs from what was built (or one was added or removed);
    without it, newer is edited."""
    built = _built_file(module_name)
    if not built:
        return ""
    home = os.path.dirname(built)
    # name (the record's: a file name, or an include's path from `home`) -> path
    sources = {os.path.basename(p): p for p in (_source(built, module_name, s) for s in SOURCE_SUFFIXES)}
    record = _build_record(built, module_name)
    includes = record.get("includes") if record is not None else None
    includes = includes if isinstance(includes, dict) else {}
    sources.update({name: os.path.join(home, name) for name in includes})
    sources = {name: p for name, p in sources.items() if os.path.exists(p)}
    newer = [name for name, p in sources.items() if os.path.getmtime(p) > os.path.getmtime(built) + 5.0]
    if not newer:
        return ""
    names = ", ".join(newer)
    if record is None:
        return f"{names} newer than the build, which has no record of its sources ({SOURCES_RECORD})"
    if record.get("built") != os.path.basename(built) or record.get("built_sha256") != file_sha256(built):
        return f"{names} newer than the build, and {SOURCES_RECORD} records another build of it"
    recorded = {**record["sources"], **includes}
    edited = [name for name, p in sources.items() if recorded.get(name) != file_sha256(p)]
    gone = sorted(set(recorded) - set(sources))
    if edited or gone:
        return "edited since the build: " + ", ".join(edited + [f"{n} (removed)" for n in gone])
    return ""


def stale(module_name: str) -> bool:
    """True when the module is compiled and its sources were edited after the build (`stale_reason`)."""
    return bool(stale_reason(module_name))


def stale_modules() -> dict[str, str]:
    """The compiled modules that run as their Python twins because their build is older than their sources,
    with the reason (empty: none; DUALPATH_PURE_PYTHON=1 is not counted: the twins run on purpose)."""
    if PURE_PYTHON:
        return {}
    reasons = {name: stale_reason(name) for name in MODULES}
    return {name: why for name, why in reasons.items() if why}


_WARNED: set[str] = set()


def use(module_name: str) -> bool:
    """Whether to run the compiled module `module_name` (importable, compiled, DUALPATH_PURE_PYTHON unset,
    not older than its source); a stale one is refused with a warning saying to rebuild."""
    if PURE_PYTHON:
        return False
    path = _built_file(module_name)
    if not path:
        return False
    why = stale_reason(module_name)
    if why:
        if module_name not in _WARNED:
            _WARNED.add(module_name)
            logging.warning(
                "%s: %s, so its Python twin runs instead of the compiled %s (slower); rebuild with "
                "`pip install -e .` or `python setup.py build_ext --inplace`",
                module_name,
                why,
                path,
            )
        return False
    return True


def load(module_name: str):
    """The module `module_name`, or its Python source loaded once as `<module_name>_py` where `use` says
    not to run the compiled one (DUALPATH_PURE_PYTHON, or a stale build)."""
    mod = importlib.import_module(module_name)
    built = _built_file(module_name)
    if not built or use(module_name):
        return mod
    name = module_name + "_py"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _source(built, module_name, ".py"))
        py_mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = py_mod
        spec.loader.exec_module(py_mod)
    return sys.modules[name]


def status() -> dict[str, bool]:
    """Which compiled hot paths this process runs (False: the Python twin)."""
    from dualpath_jax.sim import heap
    from schedulers import policies

    def runs_compiled(module_name: str) -> bool:
        return not (getattr(load(module_name), "__file__", "") or "").endswith(".py")

    return {
        "simulator": runs_compiled("dualpath_jax.sim.simulator"),
        "network": runs_compiled("dualpath_jax.sim.network"),
        "heap": heap.COMPILED,
        "policy": policies._dualpath_c is not None,
        "csv": use("dualpath_jax.sim._csvrows"),
        "store_verify": use("dualpath_jax.store._verify"),
    }
