"""The code a process runs, as one short id: the package version plus a digest of the project's own Python sources.

Runtime nodes started from another install (Ray on several hosts, each host its own checkout or wheel) could run
other code than the driver; their first report carries `code_id()` and the driver refuses a node whose id differs
(`runtime.control.ControlServer`). Unlike the git commit (`metrics.git_state`), it is known outside a checkout too.
Kept free of heavy imports (no jax).
"""

from __future__ import annotations

import functools
import hashlib
import os

#: The top-level packages whose .py sources the id covers (the runtime's code and what it runs).
PACKAGES = ("dualpath_jax", "models", "transport", "schedulers")


def sources_digest(roots: dict[str, str]) -> str:
    """sha256 (hex) over each .py file under the directories `roots` ({package name: directory}): its path relative
    to the package's parent, then its bytes, in sorted order (the same on every host whatever the install path).
    A file that cannot be read counts as its path alone."""
    h = hashlib.sha256()
    for name in sorted(roots):
        files = []
        for d, dirs, names in os.walk(roots[name]):
            dirs[:] = sorted(x for x in dirs if x != "__pycache__")
            rel = os.path.relpath(d, roots[name])
            files += [os.path.normpath(os.path.join(name, rel, n)) for n in names if n.endswith(".py")]
        for f in sorted(files):
            h.update(f.replace(os.sep, "/").encode() + b"\0")
            try:
                with open(os.path.join(roots[name], os.path.relpath(f, name)), "rb") as src:
                    h.update(hashlib.sha256(src.read()).digest())
            except OSError:
                h.update(b"unreadable")
    return h.hexdigest()


@functools.cache
def code_id() -> str:
    """`code_id_now()` as this process first computed it, then kept (a node's reports carry it: free after the first)."""
    return code_id_now()


def code_id_now() -> str:
    """`<package version>+<12 hex of sources_digest over PACKAGES>` of the sources as they are now, e.g.
    "0.1.0+3f2a9c41d07e" (~25 ms: ~80 files, 1.7 MB)."""
    import importlib.util

    import dualpath_jax

    roots = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots[name] = list(spec.submodule_search_locations)[0]
    return f"{dualpath_jax.__version__}+{sources_digest(roots)[:12]}"
