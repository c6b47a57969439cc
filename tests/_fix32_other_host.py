"""Another host's clock for chosen node processes of a local run (session 49, helper "offset"): no tests here.

The local launcher's node processes import the module that registered the run's batcher (`launcher.batcher_modules`),
so a run with `scheduler.batcher = BATCHER` imports this module in each of them first. Where env `ENV` names the
process's node ("<node>:<seconds>,..."), its clock (`clock.EPOCH`) runs that many seconds ahead of the driver's and
its boot id is its own, as a node on another host with an unsynced clock: the driver must estimate the offset
(`clock.Offset`). Elsewhere (the pytest process, nodes not named) it changes nothing.
"""

from __future__ import annotations

import multiprocessing as mp
import os

from dualpath_jax import clock
from schedulers import BATCHERS
from schedulers.batching import FifoBatcher

ENV = "DUALPATH_FIX32_HOST_CLOCKS"
BATCHER = "fix32_other_host_fifo"


@BATCHERS.register(BATCHER)
class OtherHostFifo(FifoBatcher):
    """fifo, registered here so that node processes import this module."""

    name = BATCHER


def host_clocks(text: str) -> dict[int, float]:
    """`ENV`'s value as {node: seconds its clock is ahead of the driver's}."""
    out = {}
    for item in filter(None, text.split(",")):
        node, _, ahead = item.partition(":")
        out[int(node)] = float(ahead)
    return out


def _as_another_host() -> None:
    name = mp.current_process().name  # "node<id>" in a local launcher's node process
    for node, ahead in host_clocks(os.environ.get(ENV, "")).items():
        if name == f"node{node}":
            clock.EPOCH += ahead
            clock.BOOT = f"fix32-emulated-host-of-node{node}"


_as_another_host()
