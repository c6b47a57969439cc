"""The optional compiled hot paths (setup.py builds them with Cython) and the switch to run without them.

Compiled when the package is installed with its build (`pip install -e .` on a machine with a C compiler):
- `dualpath_jax.sim.network`: network.py itself, compiled in Cython's pure Python mode (types in network.pxd);
- `dualpath_jax.sim._heap`: the simulator's event queue and the network's completion heap (`heap.TimeHeap`);
- `schedulers._phase1`: DualPath DE phase 1's assignment loop (`DualPathPolicy._phase1_ints`).
Each has a Python twin that gives the same results (tests/test_compiled.py checks it). Set the environment
variable DUALPATH_PURE_PYTHON=1 to run the Python twins (debugging, or the same-run baseline of a speed
benchmark); `status()` says which of them run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

PURE_PYTHON = os.environ.get("DUALPATH_PURE_PYTHON", "0").strip() not in ("", "0")


def load(module_name: str):
    """The module `module_name`; with DUALPATH_PURE_PYTHON set and the module compiled, its Python source
    instead, loaded once as `<module_name>_py`."""
    mod = importlib.import_module(module_name)
    path = getattr(mod, "__file__", "") or ""
    if not PURE_PYTHON or path.endswith(".py"):
        return mod
    name = module_name + "_py"
    if name not in sys.modules:
        source = os.path.join(os.path.dirname(path), module_name.rsplit(".", 1)[-1] + ".py")
        spec = importlib.util.spec_from_file_location(name, source)
        py_mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = py_mod
        spec.loader.exec_module(py_mod)
    return sys.modules[name]


def status() -> dict[str, bool]:
    """Which compiled hot paths this process runs (False: the Python twin)."""
    from dualpath_jax.sim import heap
    from schedulers import policies

    network = load("dualpath_jax.sim.network")
    return {
        "network": not (getattr(network, "__file__", "") or "").endswith(".py"),
        "heap": heap.COMPILED,
        "phase1": policies._heapreplace_run is not None,
    }
