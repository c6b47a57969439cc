"""The event clock of the runtime and its links: wall-clock seconds that never step.

Engines stamp their events, and the scheduler times a run, with `now()`: the wall clock as read once, carried on by
the monotonic clock. A step of the host's wall clock during a run (an NTP step, `date -s`, a VM resumed) moves no
stamp: with `time.time()` it went into every turn in flight (a TTFT of -3597 s, a turn finished before its first
token) and into when the next turns arrived. The values stay wall-clock-like (seconds since the epoch, > 1e9:
`GlobalScheduler._absolute`), so processes on hosts whose clocks are synced (NTP) still agree to within their offset
as read at their start (README "Multi-host runs (Ray)").

The reading is shared down a process tree on one host: the first process to import this module puts it in the
environment (`ENV`, with the host's boot id), and a process started from it on the same boot (the local launcher's
node processes, spawned while the driver starts) takes that reading instead of its own. So a step of the wall clock
while node processes start (the ~70 s of their compiles) does not become an offset between a node and the driver;
a process on another host, or after a reboot, reads its own.
"""

from __future__ import annotations

import os
import time

ENV = "DUALPATH_JAX_CLOCK_EPOCH"  # "<epoch>@<boot id>": the reading this process tree shares


def _boot_id() -> str | None:
    """This boot's id (Linux), or None: CLOCK_MONOTONIC counts from the boot, so a reading is only valid within one."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _epoch() -> float:
    """The wall clock's reading of monotonic time 0: the environment's, if it is of this boot, else this process's
    own (then put in the environment for the processes it starts)."""
    boot = _boot_id()
    text, _, env_boot = os.environ.get(ENV, "").partition("@")
    if boot is not None and env_boot == boot:
        try:
            return float(text)
        except ValueError:
            pass
    epoch = time.time() - time.monotonic()
    if boot is not None:
        os.environ[ENV] = f"{epoch!r}@{boot}"
    return epoch


EPOCH = _epoch()


def now() -> float:
    """Seconds since the epoch as this process tree's first reading took them, on the monotonic clock (never steps)."""
    return EPOCH + time.monotonic()
