"""experiments.tcp_completion_model: the plain-socket model of the TCP transport's completion structure runs every
case to the end (no window deadlocks: the receiver acknowledges whenever its socket drains) and reports each beside
the raw socket of the same run."""

from __future__ import annotations

import pytest

from experiments import tcp_completion_model as model


@pytest.mark.parametrize("window", [1, 3])
def test_every_case_runs_and_is_reported_beside_the_raw_socket(window):
    rows = model.run(size=5000, count=60, window=window, repeats=1, transport=window == 3)
    names = [r["case"] for r in rows]
    assert names[:3] == ["raw socket", "ack thread", "waiter polls"]
    assert ("TcpTransport" in names) == (window == 3)
    raw = rows[0]
    assert raw["ratio"] == pytest.approx(1.0)
    for r in rows:
        assert r["GBps"] > 0 and r["ratio"] == pytest.approx(r["GBps"] / raw["GBps"])


def test_variants_are_reported_with_their_acknowledgement_frames():
    """--variants (2026-12-06): the batched ack thread and the senders whose writes ask for their acknowledgements run
    to the end beside the raw socket, with each side paying a per-ack CPU cost, and report ack frames per write."""
    rows = model.run(size=5000, count=60, window=4, repeats=1, transport=False, variants=True, ack_cost_us=2.0)
    names = [r["case"] for r in rows]
    assert names == [
        "raw socket",
        "ack thread",
        "waiter polls",
        "ack thread, every 2th asks",
        "ack thread, batched",
        "ack thread, batched, every 2th asks",
        "waiter polls, every 2th asks",
        "waiter polls, the window's last asks",
    ]
    assert rows[0]["acks_per_write"] is None
    for r in rows[1:]:  # at least the round's last write is acknowledged; at most one ack frame per write
        assert 1 / 60 <= r["acks_per_write"] <= 1, r


def test_the_writer_sets_the_acknowledgement_rate():
    """A receiver told to acknowledge only what was asked for sends no more ack frames than frames that asked (every
    20th write of 60, the last included: 3), however often its socket drains; every write still completes."""
    assert [i for i in range(60) if model.Model._asks(20, i, 60, False)] == [19, 39, 59]
    assert [i for i in range(5) if model.Model._asks(-1, i, 5, i == 2)] == [2, 4]  # the window's last, and the last
    assert not any(model.Model._asks(0, i, 5, True) for i in range(5))  # never: the receiver acks when drained
    m = model.Model()
    try:
        payload = memoryview(bytes(3000))
        for send in (m.ack_thread, m.ack_batch, m.waiter_polls):
            assert send(payload, 60, 20, 20) > 0
            assert 1 <= m.acks <= 3, (send.__name__, m.acks)
    finally:
        m.close()
