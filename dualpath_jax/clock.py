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

A node on another host keeps its own clock, off the driver's by whatever its host's is (NTP's tens of ms, an unsynced
VM's seconds). `Offset` estimates that offset from the node's fetches (Cristian / NTP: the driver stamps when it got a
report and when it replied, the node when it sent it and got the reply) and the scheduler puts every stamp a node
reports in the driver's timebase with it. A node of the driver's boot takes the exact difference of the two readings
(`BOOT`, `EPOCH`: 0.0 where it inherited the driver's), so a single-host run has no estimation noise.
"""

from __future__ import annotations

import collections
import math
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


BOOT = _boot_id()  # this boot's id (None where unknown): `EPOCH`s of one boot differ by no monotonic offset
EPOCH = _epoch()


def now() -> float:
    """Seconds since the epoch as this process tree's first reading took them, on the monotonic clock (never steps)."""
    return EPOCH + time.monotonic()


#: Seconds of exchanges `Offset` picks its best from: the newest round trips only, so the estimate follows the hosts'
#: drift (100 ppm, an unsynced clock's: 1 ms per 10 s) and not only the best exchange ever seen.
OFFSET_WINDOW_S = 10.0


class Offset:
    """How far another process's clock (the driver's `now`) is ahead of this one's, from request/reply exchanges.

    Each exchange gives t1 (this process sent), tr and ts (the other got it, replied) and t2 (this process got the
    reply): offset ((tr - t1) + (ts - t2)) / 2, exact if both ways took as long, and off by at most half its round
    trip (t2 - t1) - (ts - tr) if not. The estimate is the offset of the exchange with the smallest round trip among
    those of the last `window_s` seconds (a sliding-window minimum: O(1) per exchange at any fetch rate).
    `same_boot(offset)` fixes it instead (`exact`): the two processes read one monotonic clock."""

    def __init__(self, window_s: float = OFFSET_WINDOW_S):
        if not window_s > 0:
            raise ValueError(f"Offset window_s must be > 0 s, got {window_s!r}")
        self.window_s = window_s
        self.seconds = 0.0  # add to a stamp of this process to get the other's time (0.0 until an exchange)
        self.rtt_s: float | None = None  # the round trip `seconds` comes from (None: exact, or no exchange yet)
        self.exact = False
        self.exchanges = 0
        self._best: collections.deque = collections.deque()  # (t2, rtt, offset), rtt increasing: the window's minima

    def add(self, t1: float, tr: float, ts: float, t2: float) -> None:
        """One exchange (t1, t2 on this process's clock, tr, ts on the other's)."""
        if self.exact:
            return
        if not all(math.isfinite(t) for t in (t1, tr, ts, t2)):
            raise ValueError(f"clock exchange with a stamp that is not a finite number: {(t1, tr, ts, t2)!r}")
        rtt = max(0.0, (t2 - t1) - (ts - tr))
        best = self._best
        while best and best[-1][1] >= rtt:  # (never the minimum again: this one is newer and no slower)
            best.pop()
        best.append((t2, rtt, ((tr - t1) + (ts - t2)) / 2))
        while t2 - best[0][0] > self.window_s:
            best.popleft()
        self.exchanges += 1
        _, self.rtt_s, self.seconds = best[0]

    def same_boot(self, seconds: float) -> None:
        """The other process runs on this boot: its clock is this one's plus `seconds` (the two `EPOCH`s' difference)
        exactly, whatever the exchanges say."""
        self.exact, self.seconds, self.rtt_s = True, float(seconds), None
        self._best.clear()
