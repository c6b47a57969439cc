"""Session 51, twins in the transports and control plane: the accept loops of `TcpTransport` and the driver's
`ControlServer` had the same "once a spell" logic written twice; both now use `dualpath_jax.checks.FailureSpell`.
These tests pin what each loop says (its own lines, word for word) and how the spell counts and backs off; and
`transport.base.check_message`, the payload check of every backend's `send`."""

from __future__ import annotations

import errno
import logging
import re
import resource
import socket

import numpy as np
import pytest
from test_fix26_wirefix1 import KEY, _fetch_in_thread

from dualpath_jax.checks import FailureSpell
from dualpath_jax.runtime.control import ControlServer, GroupReply
from transport.base import check_message
from transport.tcp import TcpTransport

# EMFILE three times, then another cause twice: two spells' first lines, then one line when accepting works again
FAILURES = [errno.EMFILE] * 3 + [errno.ECONNABORTED] * 2


class _FailingAccepts:
    """Stands for a listener: its next accepts fail with FAILURES, then it is the real one again."""

    def __init__(self, real):
        self.real, self.left = real, list(FAILURES)

    def accept(self):
        if self.left:
            code = self.left.pop(0)
            raise OSError(code, "Too many open files" if code == errno.EMFILE else "Software caused connection abort")
        return self.real.accept()

    def __getattr__(self, name):
        return getattr(self.real, name)


def _check_said(records: list[logging.LogRecord], line: str, who: str, again: str) -> None:
    """The loop's lines about accepting: `line` (its `why` the cause) for each spell's first failure, then `again`
    with the count and length of the spell; no other."""
    said = [r.getMessage() for r in records if "accept" in r.getMessage()]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = f"RLIMIT_NOFILE {soft}, hard limit {hard}: raise it, `ulimit -n`"
    out = f"{who} is out of file descriptors ({limit}) ([Errno 24] Too many open files)"
    aborted = f"[Errno {errno.ECONNABORTED}] Software caused connection abort"
    assert len(said) == 3 and said[:2] == [line.format(why=out), line.format(why=aborted)], said
    assert re.fullmatch(re.escape(f"{again} ({len(FAILURES)} accepts failed over ") + r"\d+\.\d s\)", said[2]), said


def test_the_tcp_accept_loop_says_each_spell_once_and_its_end(caplog):
    srv = TcpTransport("srv")
    srv.register("dst", np.zeros(4096, np.uint8))
    real = srv._listener
    peer = TcpTransport("peer")
    try:
        peer.register("src", np.ones(4096, np.uint8))
        with caplog.at_level(logging.WARNING, logger="transport.tcp"):
            srv._listener = _FailingAccepts(real)
            socket.create_connection(srv.address).close()  # (taken by the accept running now: the next ones fail)
            peer.connect("srv", srv.address, timeout=10)  # (accepted once the failures are spent)
            assert peer.write("srv", "src", 0, "dst", 0, 4096).result(10) == 4096
        _check_said(
            caplog.records,
            "srv: accept failed: {why}; still accepting: the connected peers are served on, new connections wait in "
            "the listen backlog, accept is tried again every 1 s at most (said once a spell)",
            "this process",
            "srv: accepting connections again",
        )
    finally:
        srv._listener = real
        peer.close()
        srv.close()


def test_the_control_servers_accept_loop_says_each_spell_once_and_its_end(caplog):
    srv = ControlServer(lambda report: GroupReply(), KEY)
    real = srv._listener
    try:
        with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.control"):
            srv._listener = _FailingAccepts(real)
            socket.create_connection(srv.address).close()  # (taken by the accept running now: the next ones fail)
            got, _ = _fetch_in_thread(srv.address)
        assert got == GroupReply()
        _check_said(
            caplog.records,
            "control server: accept failed ({why}); still accepting: the connected nodes are served on, new "
            "connections wait in the listen backlog, accept is tried again every 1 s at most (said once a spell)",
            "the driver",
            "control server: accepting connections again",
        )
    finally:
        srv._listener = real
        srv.close()


def test_a_failure_spell_backs_off_and_counts_one_spell_per_cause():
    spell = FailureSpell(0.05)
    assert spell.ended() is None  # (no failure: nothing to say)
    assert spell.failed(errno.EMFILE) and not spell.failed(errno.EMFILE)
    assert [spell.pause() for _ in range(4)] == [0.01, 0.02, 0.04, 0.05]  # 10 ms doubling, capped at most_s
    assert spell.failed(errno.ENOBUFS)  # a new cause is said, its back-off kept
    assert spell.pause() == 0.05
    failures, seconds = spell.ended()
    assert failures == 3 and seconds >= 0
    assert spell.pause() == 0.01 and spell.ended() is None  # a success starts over
    assert spell.failed(errno.EMFILE) and spell.ended() is None  # one failure (an aborted connection) is no spell


def test_every_backends_send_checks_its_payload_with_check_message():
    """inproc, tcp and rdma checked a `send` payload with the same lines written three times; now `check_message`."""
    assert check_message(memoryview(b"abc")) == b"abc" and type(check_message(bytearray(b"ab"))) is bytes
    with pytest.raises(TypeError, match="^message payload must be bytes, got str$"):
        check_message("abc")
    with pytest.raises(ValueError, match="^message of 4 bytes exceeds max_message_bytes=3$"):
        check_message(b"abcd", 3)
    assert check_message(b"abcd") == b"abcd"  # (no limit: inproc)
