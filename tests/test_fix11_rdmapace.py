"""rdma: a paced transfer waiting for its pacer ends when its peer dies or the endpoint closes (tcp's fix10 rule).

A paced RDMA transfer is posted by its class's sender thread, each work request once the pacer let all its bytes go
(`RdmaTransport._post_wrs`). The wait passed the pacer no `check`, so once the peer died (`close`, `disconnect`, a lost
peer: the transfer itself is failed there) the sender thread still sat in the wait until the pacer granted the next
chunk, however far away (a slow or contended link), holding up the class's later transfers, with the transfer's
chunks queued on the link ahead of other flows. Now the wait calls `_check_posting`, so it ends within
~CHECK_INTERVAL_S and the chunks not moved are taken back from the link.

No RDMA device here: these tests drive `_post_wrs` of an endpoint made without `__init__` (no device, no QPs). The
wait comes before anything touches verbs (pyverbs is imported at the first work request), so the path tested is the
real one up to the first post.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from dualpath_jax.traffic import TrafficManager
from transport.base import PeerLostError, TransportClosedError
from transport.rdma import RdmaTransport, _RdmaPeer, _Transfer

N = 300_000  # one work request of 300 kB over three 100 kB pacer chunks at 1 kB/s: the 2nd is ~100 s away
CHUNK = 100_000


def _endpoint(link_name: str):
    tm = TrafficManager()
    link = tm.add_link(link_name, 1000.0, {"high": 1.0, "low": 1.0}, quantum=CHUNK, burst_s=0.0)
    ep = object.__new__(RdmaTransport)  # (no device: only what `_post_wrs` reads before its first post)
    ep.name, ep.pacer, ep.chunk_bytes, ep.timeout_s, ep._closed = "fix11-rdma", tm.pacer(link_name), N, 30.0, None
    ep._e = SimpleNamespace(IBV_WR_RDMA_READ=4)
    ep._mrs = {"src": SimpleNamespace(lkey=1)}
    p = _RdmaPeer("fix11-peer")
    p.qps["low"] = object()
    return ep, p, link


@pytest.mark.parametrize("how", ["peer lost", "endpoint closed"])
def test_rdma_a_paced_wait_ends_when_the_peer_goes(how):
    ep, p, link = _endpoint(f"fix11/rdma-{how.replace(' ', '-')}")
    t = _Transfer(Future(), p.name, N, 1)
    poster = threading.Thread(
        target=ep._post_wrs, args=(t, p, "low", 0, SimpleNamespace(name="src"), 0, 0, 0), daemon=True
    )
    poster.start()
    deadline = time.monotonic() + 30  # the first chunk is granted at once, the second waits ~100 s
    while link.bytes_by_class["low"] < CHUNK and time.monotonic() < deadline:
        time.sleep(0.01)
    assert link.bytes_by_class["low"] == CHUNK and poster.is_alive()
    if how == "peer lost":
        p.dead = PeerLostError("fix11: peer lost")
    else:
        ep._closed = TransportClosedError("fix11: closed")
    poster.join(10)  # (generous: it takes ~CHECK_INTERVAL_S; it took ~100 s, the next grant)
    assert not poster.is_alive(), "the sender thread still waits for its pacer after the peer went"
    # the chunks not moved are taken back from the link (left queued, they were granted later for nothing)
    assert not link._queues["low"] and link.bytes_by_class["low"] == CHUNK
