"""`round_robin`'s `read_side="shorter"`: engines in turn, the read side chosen as DualPath chooses it (the node with
the shorter read queue, ties: PE). PAPER.md's "w/o scheduling" is "DualPath with round-robin assignment" and leaves
open whether the read path keeps DualPath's rule; the ablation can run either reading
(`configs/paper_ds660b.py:dualpath_rr,policy.read_side=shorter`)."""

from __future__ import annotations

import pytest
from test_schedulers_policies import req, snapshot

from schedulers import make_policy


def test_the_read_side_follows_the_shorter_read_queue_as_queues_fill():
    # PE node 0 has 1,000 hit tokens queued, DE node 1 has none: the first request reads on the DE side (900 hit
    # tokens there now), the second too (900 < 1000), the third on the PE side (1800 > 1000), the fourth on the DE
    # side (1800 < 1900)
    snap = snapshot({0: (1000, [{"id": 0}, {"id": 1}])}, {1: (0, [{"id": 10}, {"id": 11}])})
    out = make_policy("round_robin", read_side="shorter").schedule(snap, [req(i) for i in range(4)])
    assert [a.read_side for a in out] == ["de", "de", "pe", "de"]
    assert [a.de_read_fraction for a in out] == [1.0, 1.0, 0.0, 1.0]
    # the engines still rotate, whatever the loads
    assert [(a.prefill_engine, a.decode_engine) for a in out] == [(0, 10), (1, 11), (0, 10), (1, 11)]


def test_equal_queues_read_on_the_pe_side():
    snap = snapshot({0: (0, [{"id": 0}])}, {1: (0, [{"id": 10}])})
    out = make_policy("round_robin", read_side="shorter").schedule(snap, [req(0)])
    assert [a.read_side for a in out] == ["pe"]


def test_an_unknown_read_side_names_the_choices():
    with pytest.raises(ValueError, match="alternate/pe/de/shorter, got 'longer'"):
        make_policy("round_robin", read_side="longer")
