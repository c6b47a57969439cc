"""The optional compiled hot paths (setup.py builds them with Cython) and the switch to run without them.

Compiled when the package is installed with its build (`pip install -e .` on a machine with a C compiler):
- `dualpath_jax.sim.simulator`: simulator.py itself, compiled in Cython's pure Python mode (types in
  simulator.pxd: the engines, requests and the simulator become extension types);
- `dualpath_jax.sim.network`: network.py itself, compiled in Cython's pure Python mode (types in network.pxd);
- `dualpath_jax.sim._heap`: the simulator's event queue and the network's completion heap (`heap.TimeHeap`);
- `schedulers._dualpath`: the DualPath policy's inner loops (DE phase 1 in `DualPathPolicy._phase1_ints`, the
  placement loop after it (`Placement`), the PE and DE choices, a node's least-loaded PE) and every policy's
  duplicate-id check of a QueueWindow;
- `dualpath_jax.sim._csvrows`: the results' CSV rows (turns.csv, links.csv) formatted in C;
- `dualpath_jax.store._verify`: the KV store's verified reads of xxh3 blocks (read or copy, then hash each Layer
  Block while it is in cache) with the GIL released.
Each has a Python twin that gives the same results (tests/test_compiled.py checks it). Set the environment
variable DUALPATH_PURE_PYTHON=1 to run the Python twins (debugging, or the same-run baseline of a speed
benchmark; 0 or unset: the compiled modules; true/false, yes/no and on/off work too, any other value is an
error at import); `status()` says which of them run.

A compiled module whose source was edited after the build (its .py, .pxd or .pyx newer than the built file)
would run the old code: `load` then runs the Python source instead and logs a warning saying to
rebuild (`pip install -e .`, or `python setup.py build_ext --inplace`).
"""

from __future__ import annotations

import importlib
import importlib.util
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


def stale(module_name: str) -> bool:
    """True when the module is compiled and one of its sources (.py, .pxd, .pyx) is newer than the built file."""
    built = _built_file(module_name)
    if not built:
        return False
    sources = [p for p in (_source(built, module_name, s) for s in (".py", ".pxd", ".pyx")) if os.path.exists(p)]
    # 5 s of slack: an installer may write the sources a moment after the built file (a wheel's extraction)
    return any(os.path.getmtime(p) > os.path.getmtime(built) + 5.0 for p in sources)


_WARNED: set[str] = set()


def use(module_name: str) -> bool:
    """Whether to run the compiled module `module_name` (importable, compiled, DUALPATH_PURE_PYTHON unset,
    not older than its source); a stale one is refused with a warning saying to rebuild."""
    if PURE_PYTHON:
        return False
    path = _built_file(module_name)
    if not path:
        return False
    if stale(module_name):
        if module_name not in _WARNED:
            _WARNED.add(module_name)
            logging.warning(
                "%s: its source is newer than the compiled %s, so the Python twin runs instead (slower); "
                "rebuild with `pip install -e .` or `python setup.py build_ext --inplace`",
                module_name,
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
