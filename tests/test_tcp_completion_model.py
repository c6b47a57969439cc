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
