"""A Ctrl-C that Python would lose: raised again in the main thread.

A SIGINT that lands while the main thread runs a callback whose exceptions Python only prints (JAX's gc callback:
"Exception ignored in: <function _xla_gc_callback ...>", a traceback, "KeyboardInterrupt") was lost there: a node
process went on with its run while the others stopped (the driver waited for it), and a launcher's own process ran
on to the end, its results written, as if no one had pressed Ctrl-C (`experiments.run` with the in-process launcher,
a SIGINT in its warm-up: 1 in ~10 here). `catch_lost_ctrl_c` installs the hook in a node process (`launcher`) and in
every launcher (their flag parsers, `experiments`).
"""

from __future__ import annotations

import _thread
import functools
import sys
import time


def raise_lost_ctrl_c_again(unraisable, previous=sys.__unraisablehook__) -> None:
    """`sys.unraisablehook`: a KeyboardInterrupt is raised again in the main thread once it is out of the callback
    (from a thread of its own, started without waiting on anything: raised here, it would be lost the same way), as
    if the SIGINT came then (`_thread.interrupt_main`: whatever SIGINT handler is installed runs). Anything else goes
    to `previous` (the hook installed before: Python's own, or pytest's)."""
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        _thread.start_new_thread(_interrupt_main_soon, ())
        return
    previous(unraisable)


def _interrupt_main_soon() -> None:
    time.sleep(0.01)
    _thread.interrupt_main()


def catch_lost_ctrl_c() -> None:
    """Install `raise_lost_ctrl_c_again` as this process's `sys.unraisablehook`, before the hook installed now (once:
    a second call keeps the first)."""
    if isinstance(sys.unraisablehook, functools.partial) and sys.unraisablehook.func is raise_lost_ctrl_c_again:
        return
    sys.unraisablehook = functools.partial(raise_lost_ctrl_c_again, previous=sys.unraisablehook)
