"""A hung engine thread or storage-NIC store call while its node keeps fetching (fix26 "stallfix", race audit F1/F2).

The node's fetch loop was the only heartbeat: a DE stuck in one step (or a SNIC in one store.read) was never noticed,
its requests never re-ran, and the run failed on run_timeout_s. Contract: the node reports the part that made no
progress for scheduler.stall_timeout_s, the scheduler declares the node dead naming it, its requests re-run elsewhere.
"""

import logging
import threading
import time

import numpy as np
import pytest
from test_runtime import assert_matches_reference
from test_runtime_scheduler import GROUPS, Clock, fetch, make_service

from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.runtime.config import DEFAULT_STALL_TIMEOUT_S, ConfigError, stall_timeout_s, validate
from dualpath_jax.runtime.control import GroupReport
from dualpath_jax.runtime.storage_nic import ReadJob, StorageNIC
from dualpath_jax.store import LocalDirStore


def test_a_decode_engine_stuck_in_a_step_is_declared_dead_and_its_requests_rerun(base, ops, trajs, reference, caplog):
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.launcher import InProcessLauncher

    cfg = base.replace(**{"scheduler.name": "round_robin", "run_timeout_s": 20.0, "scheduler.stall_timeout_s": 10.0})
    launcher = InProcessLauncher(cfg, ops)
    release = threading.Event()
    hung = []

    def fault(service, launcher):
        if hung or service.progress()[0] < 3:
            return
        group = launcher.groups[2]
        assert group.stall_timeout_s == 10.0  # (the config's)
        # Short on the hung node only: a mid-run compile elsewhere (precompile off) on a loaded host is no stall here.
        group.stall_timeout_s = 1.5
        eng = next(iter(group.engines.values()))
        step = eng.batch.step

        def stuck(*a, **k):  # a device step that never returns (until the test ends)
            release.wait(60)
            return step(*a, **k)

        eng.batch.step = stuck
        hung.append(eng)

    t0 = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING):
            res = driver.run(cfg, trajs, model_ops=ops, fault=fault, launcher=launcher)
    finally:
        release.set()
        for eng in hung:
            eng.join(10.0)
    assert hung
    assert time.monotonic() - t0 < cfg.run_timeout_s
    assert list(res.dead_nodes) == [2]
    why = res.dead_nodes[2]
    assert why.startswith("decode engine 2 made no progress for ") and "scheduler.stall_timeout_s=1.5)" in why, why
    assert res.requeued > 0
    assert_matches_reference(res, reference, trajs)
    # The inprocess launcher says which thread it left running under the closed store.
    assert "thread(s) ['de2'] did not end within the shutdown's 5 s" in caplog.text


def test_the_stall_timeout_in_force_and_its_checks(base):
    assert base.scheduler.stall_timeout_s is None and base.run_timeout_s > DEFAULT_STALL_TIMEOUT_S
    assert stall_timeout_s(base) == DEFAULT_STALL_TIMEOUT_S  # (the :test runs: nothing there stalls for 2 min)
    short = base.replace(run_timeout_s=20.0)
    assert stall_timeout_s(short) is None  # (the run's timeout comes first: off, not an error)
    validate(short)
    validate(short.replace(**{"scheduler.stall_timeout_s": 10}))
    assert stall_timeout_s(short.replace(**{"scheduler.stall_timeout_s": 10})) == 10.0
    for value, words in [
        (2.0, "must exceed scheduler.heartbeat_timeout_s (3.0)"),
        (float("nan"), "must exceed scheduler.heartbeat_timeout_s"),
        (20.0, "must be below config.run_timeout_s (20.0)"),
        (float("inf"), "must be below config.run_timeout_s"),
        ("60", "must be a number of seconds or None"),
        (True, "must be a number of seconds or None"),
    ]:
        with pytest.raises(ConfigError, match="config.scheduler.stall_timeout_s") as e:
            validate(short.replace(**{"scheduler.stall_timeout_s": value}))
        assert words in str(e.value), (value, e.value)


def test_the_scheduler_declares_a_node_reporting_a_stall_dead_and_reruns_its_requests(tmp_path):
    from dualpath_jax.workloads.types import Trajectory, Turn

    store = LocalDirStore(tmp_path / "kv", BlockLayout(2, 4, 8, "test-model"))
    try:
        svc = make_service(store, [Trajectory(i, [Turn(6, 2)]) for i in range(4)], Clock())
        fetch(svc, 1), fetch(svc, 2)
        on2 = [t for t in fetch(svc, 0).tasks if t.decode_engine == 2]
        assert on2
        g = GROUPS[2]
        stats = {"stalled": {"storage NIC's store.read": 130.2}, "stall_timeout_s": 120.0}
        reply = svc.fetch(GroupReport(2, g.role, g.engine_ids, address={2: "addr2"}, stats=stats))
        assert reply.shutdown and svc.dead_nodes == {2} and svc.failure is None
        assert svc.death_reasons[2] == (
            "storage NIC's store.read made no progress for 130.2 s (> scheduler.stall_timeout_s=120)"
        )
        assert svc.requeued == len(on2)
        again = fetch(svc, 0).tasks
        assert {t.request_id for t in again} == {t.request_id for t in on2}
        assert all(t.decode_engine == 1 and t.attempt == 1 for t in again)
        assert svc.silent_dead_nodes() == []  # (told to stop at that fetch)
    finally:
        store.close()


def test_a_storage_nic_reports_a_store_read_that_does_not_return(tmp_path):
    layout = BlockLayout(2, 4, 8, "test-model")
    store = LocalDirStore(tmp_path / "kv", layout)
    entered, release = threading.Event(), threading.Event()

    def stuck_read(key, out):
        entered.set()
        release.wait(30)
        return False

    store.read = stuck_read
    snic = StorageNIC(0, store, 4, pace=lambda n: None)
    try:
        assert snic.stalled(time.monotonic() + 1e3, 1.0) == {}  # (idle: no stall, however long)
        area = np.zeros((2, 4, 8), np.uint8)
        snic.submit_read(ReadJob(1, 0, [b"k" * 32], 0, area, lambda *a: None))
        assert entered.wait(10)
        now = time.monotonic()
        assert snic.stalled(now, 5.0) == {}
        late = snic.stalled(now + 10.0, 5.0)
        assert list(late) == ["storage NIC's store.read"] and 10.0 <= late["storage NIC's store.read"] < 15.0
    finally:
        release.set()
        snic.close()
        store.close()
    assert snic.busy_since == {"read": None, "write": None}
