"""A pause of the whole job (Ctrl-Z and fg, a VM or container frozen) is no node's silence (fuzz audit, session 45).

The driver checks heartbeats every 20 ms; after a pause longer than heartbeat_timeout_s it declared every node dead
at once on resuming ("run failed: no live prefill or decode engine left"), though none had failed."""

from test_misc_hunt8 import _service

from dualpath_jax.runtime.control import GroupReport
from dualpath_jax.runtime.scheduler_service import GroupSpec

GROUPS = [GroupSpec(0, "prefill", [0]), GroupSpec(1, "decode", [1]), GroupSpec(2, "decode", [2])]


def _fetch(svc, g):
    return svc.fetch(GroupReport(g.node_id, g.role, g.engine_ids, address={e: "a" for e in g.engine_ids}, stats={}))


def test_a_pause_of_the_whole_job_declares_no_node_dead():
    now = [100.0]
    svc = _service(GROUPS, heartbeat_timeout_s=3.0, clock=lambda: now[0])
    for g in GROUPS:
        _fetch(svc, g)
    now[0] += 0.02
    assert svc.check_heartbeats() == []
    now[0] += 5.0  # everything stopped 5 s: no fetch, no check
    assert svc.check_heartbeats() == [] and not svc.dead_nodes
    _fetch(svc, GROUPS[0])  # (one node fetches first on resuming)
    now[0] += 0.02
    assert svc.check_heartbeats() == [] and not svc.dead_nodes


def test_a_node_silent_across_a_pause_is_still_declared_dead_after_the_timeout():
    """Only the gap past the bound (max(PAUSE_MIN_S, timeout / 2) = 1.5 s) is left out: node 2, silent 1 s before a
    5 s pause, has 2.5 s of silence after it and is declared dead 0.5 s later."""
    now = [100.0]
    svc = _service(GROUPS, heartbeat_timeout_s=3.0, clock=lambda: now[0])
    for g in GROUPS:
        _fetch(svc, g)
    for _ in range(50):  # 1 s of checks; node 2 falls silent, the others fetch
        now[0] += 0.02
        _fetch(svc, GROUPS[0]), _fetch(svc, GROUPS[1])
        assert svc.check_heartbeats() == []
    now[0] += 5.0  # a pause
    assert svc.check_heartbeats() == []
    dead = []
    for _ in range(100):
        now[0] += 0.02
        _fetch(svc, GROUPS[0]), _fetch(svc, GROUPS[1])
        dead += svc.check_heartbeats()
        if dead:
            break
    assert dead == [2] and 0.4 < now[0] - 106.0 < 0.6


def test_a_silent_node_with_the_watcher_running_is_declared_dead_at_the_timeout():
    now = [100.0]
    svc = _service(GROUPS, heartbeat_timeout_s=3.0, clock=lambda: now[0])
    for g in GROUPS:
        _fetch(svc, g)
    dead = []
    while not dead:
        now[0] += 0.02
        _fetch(svc, GROUPS[0]), _fetch(svc, GROUPS[2])
        dead = svc.check_heartbeats()
    assert dead == [1] and 3.0 < now[0] - 100.0 < 3.05


def test_a_node_that_fetched_between_the_last_check_and_the_pause_is_not_declared_dead():
    """(The real run's case: a fetch ending after the watcher's last check, then everything stopped.)"""
    now = [100.0]
    svc = _service(GROUPS, heartbeat_timeout_s=3.0, clock=lambda: now[0])
    for g in GROUPS:
        _fetch(svc, g)
    now[0] += 0.02
    assert svc.check_heartbeats() == []
    now[0] += 0.01
    _fetch(svc, GROUPS[1])
    now[0] += 5.0
    assert svc.check_heartbeats() == [] and not svc.dead_nodes


def test_a_timeout_shorter_than_the_watchers_interval_still_declares_silent_nodes_dead():
    """A heartbeat timeout of a few ms (valid: above fetch_interval_s) is shorter than the driver's 20 ms between
    checks: those gaps are no pause (below PAUSE_MIN_S), so silence still counts."""
    now = [100.0]
    svc = _service(GROUPS, heartbeat_timeout_s=0.006, clock=lambda: now[0])
    for g in GROUPS:
        _fetch(svc, g)
    assert svc.check_heartbeats() == []
    now[0] += 0.02
    _fetch(svc, GROUPS[0])
    assert svc.check_heartbeats() == [1, 2]


def test_a_watcher_late_again_and_again_still_declares_a_silent_node_dead():
    """(review finding) Only the part of the watcher's gap past the bound is left out: checks 1.1 s apart with a 2 s
    timeout (a loaded host), node 2 silent while the others fetch every 0.1 s: dead within a few checks (it was
    never declared dead: each late check took its whole gap off the silence)."""
    now = [100.0]
    svc = _service(GROUPS, heartbeat_timeout_s=2.0, clock=lambda: now[0])
    for g in GROUPS:
        _fetch(svc, g)
    assert svc.check_heartbeats() == []
    dead = []
    for _ in range(20):
        for _ in range(11):
            now[0] += 0.1
            _fetch(svc, GROUPS[0]), _fetch(svc, GROUPS[1])
        dead += svc.check_heartbeats()
        if dead:
            break
    assert dead == [2] and now[0] - 100.0 < 3 * 2.0
