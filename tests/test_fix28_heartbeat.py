"""A pause of the whole job (Ctrl-Z and fg, a VM or container frozen) is no node's silence (fuzz audit, session 45).

The driver checks heartbeats every 20 ms; after a pause longer than heartbeat_timeout_s it declared every node dead
at once on resuming ("run failed: no live prefill or decode engine left"), though none had failed."""

from test_misc_hunt8 import _service

from dualpath_jax.runtime.control import GroupReport
from dualpath_jax.runtime.scheduler_service import GroupSpec

GROUPS = [GroupSpec(0, "prefill", [0]), GroupSpec(1, "decode", [1]), GroupSpec(2, "decode", [2])]


def _fetch(svc, g):
    return svc.fetch(GroupReport(g.node_id, g.role, g.engine_ids, address={e: "a" for e in g.engine_ids}, stats={}))


def _started(timeout_s: float):
    """A service on a fake clock (`now[0]`, from 100 s) that every group has fetched from once."""
    now = [100.0]
    svc = _service(GROUPS, heartbeat_timeout_s=timeout_s, clock=lambda: now[0])
    for g in GROUPS:
        _fetch(svc, g)
    return svc, now


def _watch(svc, now, fetching, checks: int, step: float = 0.02, fetches_per_check: int = 1) -> list[int]:
    """Up to `checks` heartbeat checks, each after `fetches_per_check` steps of `step` s in which the `fetching`
    groups fetch; stops at the first check that declares a node dead and returns those nodes ([]: none)."""
    for _ in range(checks):
        for _ in range(fetches_per_check):
            now[0] += step
            for g in fetching:
                _fetch(svc, g)
        dead = svc.check_heartbeats()
        if dead:
            return dead
    return []


def test_a_pause_of_the_whole_job_declares_no_node_dead():
    svc, now = _started(3.0)
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
    svc, now = _started(3.0)
    assert _watch(svc, now, GROUPS[:2], checks=50) == []  # 1 s of checks; node 2 falls silent, the others fetch
    now[0] += 5.0  # a pause
    assert svc.check_heartbeats() == []
    dead = _watch(svc, now, GROUPS[:2], checks=100)
    assert dead == [2] and 0.4 < now[0] - 106.0 < 0.6


def test_a_silent_node_with_the_watcher_running_is_declared_dead_at_the_timeout():
    svc, now = _started(3.0)
    dead = _watch(svc, now, [GROUPS[0], GROUPS[2]], checks=1000)
    assert dead == [1] and 3.0 < now[0] - 100.0 < 3.05


def test_a_node_that_fetched_between_the_last_check_and_the_pause_is_not_declared_dead():
    """(The real run's case: a fetch ending after the watcher's last check, then everything stopped.)"""
    svc, now = _started(3.0)
    now[0] += 0.02
    assert svc.check_heartbeats() == []
    now[0] += 0.01
    _fetch(svc, GROUPS[1])
    now[0] += 5.0
    assert svc.check_heartbeats() == [] and not svc.dead_nodes


def test_a_timeout_shorter_than_the_watchers_interval_still_declares_silent_nodes_dead():
    """A heartbeat timeout of a few ms (valid: above fetch_interval_s) is shorter than the driver's 20 ms between
    checks: those gaps are no pause (below PAUSE_MIN_S), so silence still counts."""
    svc, now = _started(0.006)
    assert svc.check_heartbeats() == []
    now[0] += 0.02
    _fetch(svc, GROUPS[0])
    assert svc.check_heartbeats() == [1, 2]


def test_a_watcher_late_again_and_again_still_declares_a_silent_node_dead():
    """(review finding) Only the part of the watcher's gap past the bound is left out: checks 1.1 s apart with a 2 s
    timeout (a loaded host), node 2 silent while the others fetch every 0.1 s: dead within a few checks (it was
    never declared dead: each late check took its whole gap off the silence)."""
    svc, now = _started(2.0)
    assert svc.check_heartbeats() == []
    dead = _watch(svc, now, GROUPS[:2], checks=20, step=0.1, fetches_per_check=11)
    assert dead == [2] and now[0] - 100.0 < 3 * 2.0
