"""Findings of the static-analysis hunt (session 52: mypy, pyright, ruff's bug-class rules); each test failed on the
commit before.

- tcp: a WRITE frame's region was looked up twice, by the reader (`regions.get`) and, where that missed or the range
  did not fit, by `_region_for_frame`, whose answer was dropped: a region registered again under its id between the
  two lookups (a deregister / register while a peer's write arrived) was found by the second and the reader went on
  with the first's None, `AttributeError` -> the whole connection set lost ("'NoneType' object has no attribute
  'view'") instead of the write landing in the region registered again.
- inproc: a transfer's copy cached each region's bytes by `id(region)` without holding the region: a region
  deregistered mid-transfer was freed, and the one registered next under its name could get its id, so the next
  chunks went to the deregistered buffer (a name registered again twice during one write: 75 of 200 writes here)
  instead of the new one, which `_copy` promises ("one it registered again under the name takes the bytes").
"""

from __future__ import annotations

import numpy as np

from transport import inproc
from transport.base import make_transport
from transport.inproc import InProcFabric, InProcTransport

_names = iter(range(10**6))


class _MissOnce(dict):
    """A region table whose first `get` of `rid` misses: the reader's lookup fell between a deregister and the
    register again of the same name (it keeps its id); every later lookup finds it."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rid, self.missed = None, 0

    def get(self, key, default=None):
        if key == self.rid and not self.missed:
            self.missed += 1
            return default
        return super().get(key, default)


def test_tcp_write_lands_when_its_region_is_found_on_the_second_lookup():
    n = next(_names)
    a = make_transport({"backend": "tcp", "name": f"s35a{n}"})
    b = make_transport({"backend": "tcp", "name": f"s35b{n}"})
    try:
        table = a._regions_by_id = _MissOnce(a._regions_by_id)  # (before a's readers start: they hold the table)
        dst = np.zeros(4096, np.uint8)
        table.rid = a.register("dst", dst).region_id
        b.register("src", np.full(4096, 7, np.uint8))
        b.connect(a.name, a.address)
        a.wait_for_peer(b.name, timeout=10)
        b.write(a.name, "src", 0, "dst", 0, 4096).result(10)  # (was PeerLostError: the set closed)
        assert table.missed == 1  # the reader's lookup did miss
        assert (dst == 7).all()
        assert b.name in a.peers() and a.name in b.peers()
    finally:
        b.close()
        a.close()


class _BetweenChunks:
    """A pacer that lets a transfer go in 1 KiB chunks and calls `between()` before every chunk but the first."""

    def __init__(self):
        self.between = lambda: None

    def pace(self, nbytes, priority):
        pass

    def paced(self, nbytes, priority):
        for o in range(0, nbytes, 1024):
            if o:
                self.between()
            yield min(1024, nbytes - o)


def test_inproc_chunks_land_in_the_region_registered_last(monkeypatch):
    # Twice during one write the peer registers "dst" again (a new buffer each time): every chunk lands in the buffer
    # registered when it moves. CPython gives a freed object's id to the next one allocated (a real run: chunk 3 went
    # to the first buffer in 41-75 of 200 writes); here every "dst" region gets one id, as such a reuse makes it.
    real_id = id
    monkeypatch.setattr(inproc, "id", lambda o: 1 if getattr(o, "name", None) == "dst" else real_id(o), raising=False)
    fabric, pacer = InProcFabric(), _BetweenChunks()
    a, b = InProcTransport("a", fabric, pacer=pacer), InProcTransport("b", fabric)
    try:
        a.connect("b")
        want = np.arange(3072, dtype=np.uint16).astype(np.uint8)
        a.register("src", want.copy())
        bufs = [np.zeros(3072, np.uint8)]
        b.register("dst", bufs[0])

        def again():
            b.deregister("dst")
            bufs.append(np.zeros(3072, np.uint8))
            b.register("dst", bufs[-1])

        pacer.between = again
        a.write("b", "src", 0, "dst", 0, 3072).result(10)
        assert len(bufs) == 3
        for k, buf in enumerate(bufs):  # chunk k in buffer k, nothing else anywhere
            assert (buf[k * 1024 : (k + 1) * 1024] == want[k * 1024 : (k + 1) * 1024]).all(), (
                f"chunk {k} not in buffer {k}"
            )
            assert not buf[: k * 1024].any() and not buf[(k + 1) * 1024 :].any(), f"buffer {k} got another chunk"
    finally:
        a.close()
        b.close()
