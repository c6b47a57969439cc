"""The lookahead of a paced transfer (`Link.lookahead`, LOOKAHEAD_S), checked on a simulated clock.

test_fix26_trafficfix's 99:1 test measures it with real threads, whose shares on a loaded 2-core host depend on how
long the OS deschedules them (it failed a CI run as the best of 3, so it is marked slow). Here the same flows run on
a clock the test moves: each flow keeps `lookahead()` chunks queued as `Link.paced` does (a new one queued as the
head is granted; the thread sleeps until the head's slot) and the high flow's thread is away for 10 ms after every
16th chunk, which a busy host does now and then.
"""

from __future__ import annotations

import collections
import types

import pytest

from dualpath_jax import traffic
from dualpath_jax.traffic import Link


def _low_share(monkeypatch, lookahead_s: float, away_s: float = 0.010, every: int = 16, seconds: float = 0.6):
    """low's share of a 10 GB/s 99:1 link (8 MiB chunks, 0.84 ms) over `seconds` after 0.1 s, both classes
    backlogged, the high flow's thread away `away_s` after each `every` chunks."""
    now = [1000.0]
    monkeypatch.setattr(traffic, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(traffic, "LOOKAHEAD_S", lookahead_s)
    link = Link("cnic/engine0", 1e10, {"high": 99, "low": 1}, per_class_names=True)
    assert link.quantum == 8 << 20
    ahead = link.lookahead()
    flows = {
        cls: {"queued": collections.deque(link.enqueue(link.quantum, cls) for _ in range(ahead)), "at": now[0], "n": 0}
        for cls in ("high", "low")
    }
    start, end = now[0] + 0.1, now[0] + 0.1 + seconds
    before = None
    while now[0] < end:
        if before is None and now[0] >= start:
            before, t0 = dict(link.bytes_by_class), now[0]
        for cls, f in flows.items():
            if f["at"] > now[0]:
                continue
            with link.lock:
                link._dispatch()  # (what `Link.wait` does each time its thread wakes)
            head = f["queued"][0]
            if head.slot is None:  # (it waits until the link's next grant time, at least 0.5 ms: `Link.wait`)
                f["at"] = now[0] + max(link._wake - now[0], 0.0005)
                continue
            f["queued"].popleft()
            f["queued"].append(link.enqueue(link.quantum, cls))
            f["n"] += 1
            away = away_s if cls == "high" and f["n"] % every == 0 else 0.0
            f["at"] = max(head.slot, now[0]) + away  # (asleep until its slot; then the chunk moves)
        now[0] = min(f["at"] for f in flows.values())
    return (link.bytes_by_class["low"] - before["low"]) / (now[0] - t0) / link.rate, ahead


def test_a_high_thread_away_for_10ms_now_and_then_leaves_low_its_1_percent(monkeypatch):
    # 20 ms of the link queued ahead (24 chunks) rides out the high thread's absence: low gets its 1% and no more
    share, ahead = _low_share(monkeypatch, traffic.LOOKAHEAD_S)
    assert ahead == 24
    assert share == pytest.approx(0.01, abs=0.001)


def test_the_same_absence_with_four_chunks_ahead_gives_low_a_third(monkeypatch):
    # (what the 99:1 test saw before the lookahead: the high queue ran dry while its thread was away, so low took
    # the slots; this keeps the test above from passing with no absence at all)
    share, ahead = _low_share(monkeypatch, 0.0)
    assert ahead == traffic.LOOKAHEAD == 4
    assert share > 0.2
