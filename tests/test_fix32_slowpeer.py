"""Fix wave 32, audit "slowpeer": a tcp transfer that is slow but alive must not be failed, and one whose peer stops
answering must be failed within the endpoint's timeout_s, not waited for forever. Both fail on the code they were
written against (report: /work/notes/fix32_slowpeer_report.md)."""

from __future__ import annotations

import threading
import time

import pytest

from dualpath_jax.traffic import Link, Pacer
from transport.base import PeerLostError
from transport.tcp import TcpTransport

CHUNK = 16 << 10  # a slow link's quantum (`Link`: at least 16 KiB)


@pytest.fixture
def endpoints():
    made: list[TcpTransport] = []

    def make(name: str, **kw) -> TcpTransport:
        t = TcpTransport(name, **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def test_a_paced_write_whose_chunks_are_further_apart_than_timeout_s_completes(endpoints):
    """The writer's own pacer holds each 16 KiB chunk 2.5x timeout_s (a slow CNIC cap): the transfer moves, so it must
    complete. It failed after timeout_s with "peer 'B' made no progress", though the docs count a wait for this
    endpoint's pacer as progress: only the connection's clock was restarted by it, not the peer's."""
    timeout_s = 1.0  # (not less: on a loaded host the ack of the last chunk may take a while)
    rate = CHUNK / (2.5 * timeout_s)
    a = endpoints("A", pacer=Pacer([Link("cnic", rate)]), timeout_s=timeout_s)
    b = endpoints("B", timeout_s=timeout_s)
    n = 2 * CHUNK
    src, dst = bytearray(b"k" * n), bytearray(n)
    a.register("r", src)
    b.register("r", dst)
    a.connect("B", b.address)
    a.remote_region("B", "r")
    t0 = time.monotonic()
    assert a.write("B", "r", 0, "r", 0, n).result(timeout=60) == n
    assert time.monotonic() - t0 > 1.5 * timeout_s  # (it was paced: its chunks further apart than timeout_s)
    assert dst == src


class _StallingPacer:
    """Lets the first chunk of a transfer go, then holds the rest until `go` is set (a peer that stops mid-reply:
    stopped, hung, its kernel still holding the connection open)."""

    def __init__(self):
        self.go = threading.Event()

    def pace(self, nbytes: int, priority: str) -> None:
        pass

    def paced(self, nbytes: int, priority: str, check=None):
        first = min(nbytes, CHUNK)
        yield first
        while not self.go.wait(0.02):
            if check is not None:
                check()
        for o in range(first, nbytes, CHUNK):
            yield min(CHUNK, nbytes - o)


def test_a_read_whose_reply_stops_mid_payload_fails_within_timeout_s(endpoints):
    """B answers A's READ with the header and a first chunk, then sends nothing more (its connection open). A must
    fail the read after timeout_s without progress, as it fails one whose reply never starts. The read was taken out
    of the pending table when the reply's header came, so the watchdog never saw it: it waited forever."""
    stall = _StallingPacer()
    a = endpoints("A", timeout_s=0.3)
    b = endpoints("B", pacer=stall, timeout_s=30.0)
    n = 4 * CHUNK
    a.register("r", bytearray(n))
    b.register("r", bytearray(b"k" * n))
    a.connect("B", b.address)
    a.remote_region("B", "r")
    f = a.read("B", "r", 0, "r", 0, n)
    try:
        with pytest.raises(PeerLostError, match="no progress"):
            f.result(timeout=5.0)
    finally:
        stall.go.set()


def test_groups_built_slower_than_run_timeout_s_are_given_time_to_register(base, ops):
    """The in-process launcher builds every engine group in `start` (models, endpoints, `cluster.precompile`'s
    compiles), one after the other, before any may fetch. When that took longer than run_timeout_s the driver failed
    the run at once with "engine groups did not all start within ...", though every group was built and about to
    register (tiny_runtime:test with precompile on took 175 s on a loaded 2-core host: every run failed so)."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.launcher import InProcessLauncher

    cfg = base.replace(**{"workload.agents": 1, "workload.turns": 1, "run_timeout_s": 120.0})
    trajs = driver.make_trajectories(cfg)
    driver.run(cfg, trajs, model_ops=ops)  # (the steps compiled: the run below is quick)
    build_s = 3.0

    class SlowBuild(InProcessLauncher):
        def start(self, groups, service):
            time.sleep(build_s)  # (building the groups took this long: a first compile, a slow model load)
            super().start(groups, service)

    cfg = cfg.replace(run_timeout_s=build_s - 0.5)
    res = driver.run(cfg, trajs, model_ops=ops, launcher=SlowBuild(cfg, ops))
    assert len(res.records) == 1
