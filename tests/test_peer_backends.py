"""`transport.peer.spawn_peer` with a backend of one's own: the spawned peer imports the module that registered it
(as the runtime's node processes do, `launcher.transport_modules`). Before 2026-12-05 the peer knew only the built-in
backends and failed to start ("unknown transport 'NAME'; known: inproc, rdma, tcp")."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from test_fix14_follow import MY_TCP, _user_module

from transport.peer import PeerProcess, pattern, registering_modules, spawn_peer
from transport.tcp import TcpTransport


def test_a_spawned_peer_builds_a_backend_of_ones_own(tmp_path, monkeypatch):
    _user_module(tmp_path, monkeypatch, "fix15_peer_transports", MY_TCP.replace("fix14f_", "fix15p_"))
    config = {"backend": "fix15p_mytcp", "name": "remote15"}
    assert registering_modules(config) == ("fix15_peer_transports",)
    me = TcpTransport("driver15")
    peer = spawn_peer(config, {"buf": 4096}, timeout=60)
    try:
        src = pattern(4096, seed=3)
        me.register("src", src)
        me.connect("remote15", peer.address)
        peer.start()
        me.write("remote15", "src", 0, "buf", 0, 4096).result(30)
        got = PeerProcess.call(me, "remote15", {"op": "digest", "region": "buf", "offset": 0, "length": 4096})
        assert got["sha256"] == hashlib.sha256(np.asarray(src).tobytes()).hexdigest()
        PeerProcess.call(me, "remote15", {"op": "quit"})
        peer.join()
    finally:
        peer.kill()
        me.close()


def test_built_in_and_unknown_backends_need_no_module():
    assert registering_modules({"backend": "tcp", "name": "x"}) == ()
    assert registering_modules({"backend": "nope", "name": "x"}) == ()
    with pytest.raises(RuntimeError, match=r"unknown transport 'nope'; known: inproc, rdma, tcp"):
        spawn_peer({"backend": "nope", "name": "x"}, {"buf": 8}, timeout=60)
