"""Progress bars (tqdm) that read well both in a terminal and in a log file.

In a terminal a bar redraws itself in place. Written to a file or a pipe (`... 2> run.log`, a batch system's log,
`tee`), tqdm's in-place redraws are carriage returns: the whole run's bar became one line of thousands of
`\\r`-separated states (a viewer shows the last, `grep` matches all). There `bar` writes each redraw as a line of
its own, at most one per `LOG_INTERVAL_S` seconds (plus the first and the last).
"""

from __future__ import annotations

import functools
import sys
import time

LOG_INTERVAL_S = 30.0  # seconds between a bar's lines in a log file (a terminal redraws every 0.1 s)


class _Lines:
    """A file for tqdm that turns each in-place redraw ("\\r" + state + padding) into one line of its own; the
    clearing writes (only "\\r" and spaces) and the closing "\\n" write nothing."""

    def __init__(self, inner):
        self.inner = inner

    def write(self, s: str) -> None:
        line = s.replace("\r", "").rstrip()
        if line:
            self.inner.write(line + "\n")

    def flush(self) -> None:
        getattr(self.inner, "flush", lambda: None)()

    def __getattr__(self, name):  # encoding, fileno, ... as the wrapped file has them
        return getattr(self.inner, name)


def is_terminal(file) -> bool:
    """Whether `file` is an interactive terminal (a closed or odd stream counts as not one)."""
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def bar(file=None, **kwargs):
    """A tqdm bar on `file` (default: stderr), drawn in place on a terminal and as one line per redraw, at most one
    per `LOG_INTERVAL_S` (or the `mininterval` given, if longer), elsewhere. `kwargs` go to tqdm."""
    file = sys.stderr if file is None else file
    if is_terminal(file):
        return _monotonic_tqdm()(file=file, **kwargs)
    kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.1)), LOG_INTERVAL_S)
    kwargs.setdefault("dynamic_ncols", False)
    return _monotonic_tqdm()(file=_Lines(file), **kwargs)


@functools.cache
def _monotonic_tqdm():
    """tqdm timed on the monotonic clock. tqdm times itself with `time.time` (set per bar in its `__init__`): a step
    of the host's clock back an hour froze the bar for that hour ("[-59:58<-06:39, -0.03it/s]"), one forward showed
    an hour elapsed and the rate that goes with it. (No monitor thread: it compares a bar's times with its own
    `time.time`, and would redraw every bar every 10 s.)"""
    from tqdm import tqdm

    class MonotonicTqdm(tqdm):
        monitor_interval = 0
        _time = property(lambda self: time.monotonic, lambda self, value: None)  # (tqdm's own assignment: ignored)

    return MonotonicTqdm
