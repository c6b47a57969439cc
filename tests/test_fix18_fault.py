"""Fix wave 18, the runtime when things go wrong: SIGTERM of `experiments.run`, a node lost in a policy's run, a peer
that cannot be reached while its node is alive, the failure when the last DE dies, a node process that never ends its
run. Each test failed on the code before its fix (checked on a copy of the tree with the fixes taken out)."""

import json
import logging
import os
import subprocess
import sys
import threading
import time

import pytest
from test_runtime import assert_matches_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


# ---- 1. SIGTERM of experiments.run: what finished is written, as for Ctrl-C -------------------------------------------

# A stand-in for the runs (no model): policy `stop_at` gets SIGTERM while it runs, as from `kill`, `timeout` or a batch
# scheduler ending the job.
_STUB_SIGTERM = """
import os, signal, sys, time, types
from absl import app
from dualpath_jax.runtime import driver
from experiments import parse_flags_or_exit

results_dir, stop_at = sys.argv[1], sys.argv[2]

def fake_run(cfg, ts, **kw):
    if cfg.scheduler.name == stop_at:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    s = {"jct_s": 2.0, "pe_read_bytes": 1, "de_read_bytes": 0, "snic_max_over_avg": 1.5, "link_bytes": {}}
    dead = {1: "its process or thread exited"} if cfg.scheduler.name == "dualpath" else {}
    return types.SimpleNamespace(summary=s, records=[], links=[], requeued=3 if dead else 0, schedule_time_s=0.0,
                                 node_stats={}, startup_s=0.0, tokens={}, dead_nodes=dead)

driver.prepare = lambda cfg, *a, **k: ([types.SimpleNamespace(turns=[0, 1])] * 8, None)
driver.measure_prefill_tokens_per_s = lambda ops, cfg, *a, **k: 1000.0
driver.run = fake_run
from experiments import run as job
sys.argv = [sys.argv[0], "--config=configs/tiny_runtime.py:test", "--config.results_dir=" + results_dir,
            "--config.policies=basic,dualpath"]
app.run(job.main, flags_parser=parse_flags_or_exit)
"""


def test_sigterm_of_the_run_keeps_the_finished_policies(tmp_path):
    """SIGTERM (kill, `timeout`, a batch scheduler) while the second policy ran ended the process at once (exit -15):
    the first policy's results.json, table.txt and run.json were never written (only turns_basic.json), and nothing
    said why. Contract: as for Ctrl-C, the finished policy's files are written, the table ends with a line naming
    SIGTERM and the policies left out, and the exit is a failing one (1)."""
    results = tmp_path / "results"
    out = _launch("-c", _STUB_SIGTERM, str(results), "dualpath")
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    (run_dir,) = list(results.iterdir())
    assert sorted(os.listdir(run_dir)) == ["results.json", "run.json", "table.txt", "turns_basic.json"]
    line = "interrupted (SIGTERM) (results of basic only, not of dualpath)"
    assert json.loads((run_dir / "results.json").read_text())["failed"] == line
    assert (run_dir / "table.txt").read_text().rstrip().splitlines()[-1] == line
    assert out.stderr.rstrip().splitlines()[-1] == line


def test_sigterm_before_any_policy_finished_leaves_no_results_directory(tmp_path):
    """SIGTERM in the first policy's run left an empty results/<timestamp>/ and no word. Contract: the Ctrl-C line,
    naming SIGTERM; no directory left; a failing exit."""
    results = tmp_path / "results"
    out = _launch("-c", _STUB_SIGTERM, str(results), "basic")
    assert out.returncode == 1, out.stderr[-2000:]
    assert os.listdir(results) == []
    assert out.stderr.rstrip().splitlines()[-1] == "interrupted (SIGTERM) before any policy finished; nothing written"


def test_a_node_that_died_in_a_policys_run_is_named_under_the_table(tmp_path):
    """A node that died in a policy's run (killed, OOM, declared dead) re-ran its requests on the others: only a log
    warning said so, while the table compared that policy's JCT, on fewer engines, with the others' as if alike.
    Contract: a note under the table names the policy, the node and why, and results.json has `dead_nodes`."""
    results = tmp_path / "results"
    out = _launch("-c", _STUB_SIGTERM, str(results), "none")
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = list(results.iterdir())
    note = (
        "note: dualpath's run lost node 1 (its process or thread exited); it ran on fewer engines than configured "
        "from then on (3 requests re-ran on the others)"
    )
    assert note in (run_dir / "table.txt").read_text().splitlines()
    summary = json.loads((run_dir / "results.json").read_text())
    assert summary["dead_nodes"] == {"basic": {}, "dualpath": {"1": "its process or thread exited"}}


# ---- 2. a peer that cannot be reached while its node is alive -----------------------------------------------------


def _failing_once(engine, peer: int, method: str, made: list) -> None:
    """Make `engine`'s transport `method` ("write" or "send") to engine `peer` raise once, as a TCP link on which nothing
    moved for the transport's `timeout_s` (PeerLostError) while both nodes stay alive and keep fetching."""
    from transport.base import PeerLostError

    transport = engine.transport
    original = getattr(transport, method)

    def failing(name, *args, **kwargs):
        if name == f"engine{peer}" and not made:
            made.append((engine.engine_id, peer))
            raise PeerLostError(f"peer {name!r} made no progress for 30.0 s with 1 transfers pending (injected)")
        return original(name, *args, **kwargs)

    setattr(transport, method, failing)


def _arm(node: int, engine: int, peer: int, method: str, made: list):
    """A `driver.run` fault that arms `_failing_once` on the engine once its node is built."""

    def fault(service, launcher):
        if not hasattr(fault, "armed") and node in getattr(launcher, "groups", {}):
            fault.armed = True
            _failing_once(launcher.groups[node].engines[engine], peer, method, made)

    return fault


def test_kv_that_cannot_reach_a_live_decode_engine_is_rerun_on_another(base, ops, trajs, reference, caplog):
    """A PE whose KV writes to a DE failed (the transport gave up on the link: PeerLostError) dropped the request with a
    warning, "the scheduler re-runs the request elsewhere": it did only when the DE's node had died. With the DE alive
    (a lost link, a stalled peer, a transport timeout of 0.001 s) nothing re-ran it, and the run waited out
    run_timeout_s (900 s by default), then failed naming only the timeout. Contract: the PE reports the peer it could
    not reach; the scheduler declares that engine's node dead (naming who could not reach it and why) and re-runs its
    requests on the others: every turn once, the reference's tokens, well before the timeout."""
    from dualpath_jax.runtime import driver

    cfg = base.replace(**{"scheduler.name": "round_robin", "run_timeout_s": 20.0})
    made: list = []
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        res = driver.run(cfg, trajs, model_ops=ops, fault=_arm(0, 0, 2, "write", made))
    assert made == [(0, 2)]
    assert time.monotonic() - t0 < cfg.run_timeout_s
    assert res.requeued > 0
    assert "node 2 (decode) is dead (engine 0 (node 0) could not reach it: PeerLostError" in caplog.text
    assert_matches_reference(res, reference, trajs)


def test_a_decode_engine_that_cannot_reach_the_only_prefill_engine_fails_the_run_naming_both(base, ops, trajs):
    """The DE side: a DE whose message to its PE failed (here: where the PE is to write the KV, its first) logged it
    and went on waiting for the PE's KV, which never came: the run waited out run_timeout_s. Contract: the only PE's
    node is declared dead, so the run fails at once with the scheduler's reason, naming the DE that could not reach
    it and the transport's error."""
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.scheduler_service import RunFailed

    cfg = base.replace(**{"scheduler.name": "de_only", "run_timeout_s": 20.0})
    made: list = []
    t0 = time.monotonic()
    arm1, arm2 = _arm(1, 1, 0, "send", made), _arm(2, 2, 0, "send", made)  # (whichever DE sends first fails)

    def fault(service, launcher):
        arm1(service, launcher)
        arm2(service, launcher)

    with pytest.raises(RunFailed, match=r"node 0: engine ([12]) \(node \1\) could not reach it: PeerLostError"):
        driver.run(cfg, trajs, model_ops=ops, fault=fault)
    assert made in ([(1, 0)], [(2, 0)])
    assert time.monotonic() - t0 < cfg.run_timeout_s


@pytest.fixture
def sched_store(tmp_path):
    from test_runtime_scheduler import BS

    from dualpath_jax.kv_layout import BlockLayout
    from dualpath_jax.kv_store import LocalDirStore

    s = LocalDirStore(tmp_path / "kv", BlockLayout(2, BS, 8, "test-model"))
    yield s
    s.close()


def test_the_scheduler_takes_a_lost_peer_for_a_dead_node_once(sched_store):
    """The service's side of `peer_lost` (no jax): the peer's node is declared dead naming the reporter and the error,
    its requests re-run on the other DE; a report of a stale attempt, or about a node already dead, changes nothing."""
    from test_runtime_scheduler import Clock, fetch, make_service

    from dualpath_jax.runtime.control import Event
    from dualpath_jax.workloads.types import Trajectory, Turn

    svc = make_service(sched_store, [Trajectory(i, [Turn(6, 2)]) for i in range(4)], Clock())
    fetch(svc, 1), fetch(svc, 2)
    tasks = fetch(svc, 0).tasks
    on2 = [t for t in tasks if t.decode_engine == 2]
    assert on2
    lost = {"engine": 0, "peer": 2, "error": "PeerLostError('no progress')"}
    stale = Event("peer_lost", on2[0].request_id, on2[0].attempt + 1, svc.t0, lost)
    fetch(svc, 0, [stale])  # (an attempt that does not exist: ignored)
    assert 2 not in svc.dead_nodes
    again = fetch(svc, 0, [Event("peer_lost", on2[0].request_id, on2[0].attempt, svc.t0, lost)]).tasks
    assert svc.death_reasons == {2: "engine 0 (node 0) could not reach it: PeerLostError('no progress')"}
    assert svc.requeued == len(on2) and svc.failure is None
    assert {t.request_id for t in again} == {t.request_id for t in on2}
    assert all(t.decode_engine == 1 and t.attempt == 1 for t in again)
    fetch(svc, 0, [Event("peer_lost", again[0].request_id, 1, svc.t0, {**lost, "peer": 2})])  # node 2: dead already
    assert svc.requeued == len(on2) and svc.dead_nodes == {2}


def test_the_last_decode_node_dying_keeps_the_reasons_in_the_failure(sched_store):
    """With requests queued, the PE's next fetch after the last DE node died overwrote the failure (each dead node and
    why, `_declare_dead`) with the bare "no live prefill or decode engine left": the run named neither the nodes nor
    the cause (seen as "run failed: no live prefill or decode engine left" for DEs lost to a transport timeout)."""
    from test_runtime_scheduler import Clock, fetch, make_service

    from dualpath_jax.workloads.types import Trajectory, Turn

    svc = make_service(sched_store, [Trajectory(i, [Turn(6, 2)]) for i in range(4)], Clock())
    fetch(svc, 1), fetch(svc, 2)
    assert fetch(svc, 0).tasks
    svc.declare_dead(1)
    svc.declare_dead(2)
    why = (
        "no live prefill or decode engine left (dead: [1, 2]): node 1: its process or thread exited; "
        "node 2: its process or thread exited"
    )
    assert svc.failure == why
    assert fetch(svc, 0).shutdown  # (the PE's fetch, with the re-run requests queued)
    assert svc.failure == why


# ---- 3. a node process that never ends its run (stopped, deadlocked) ------------------------------------------------


def test_a_hung_node_process_is_killed_after_the_run_not_the_job(monkeypatch, caplog):
    """A DE node process stopped mid-run (SIGSTOP, a debugger, a deadlock) was declared dead by its heartbeat and its
    requests re-ran: the run finished every turn. Then the session waited 15 s for the node to end its run and raised
    RuntimeError("node(s) [1] did not finish their run"): `experiments.run` ended with that traceback and wrote nothing,
    the finished run lost. Contract: the hung process is killed with a warning naming it, the run's result stands, and
    later runs go on without it (a dead process gets no run: declared dead at their start)."""
    import multiprocessing as mp

    from dualpath_jax.runtime.launcher import LocalCluster
    from dualpath_jax.runtime.scheduler_service import GroupSpec

    ctx = mp.get_context("spawn")
    hung = ctx.Process(target=time.sleep, args=(60,), name="node1", daemon=True)  # never says "done"
    hung.start()
    parent, _child = ctx.Pipe()
    cluster = LocalCluster.__new__(LocalCluster)  # (its node processes without a model: one that never ends a run)
    cluster.groups, cluster.netns, cluster.failures = [GroupSpec(1, "decode", [1])], False, {}
    cluster.procs, cluster.conns, cluster._busy = {1: hung}, {1: parent}, {1}
    cluster._recv_lock = threading.Lock()
    monkeypatch.setattr(LocalCluster, "END_TIMEOUT_S", 0.2)
    try:
        with caplog.at_level(logging.WARNING):
            cluster.end()
        hung.join(5.0)
        assert not hung.is_alive() and cluster.finished(1)
        assert "node 1's process did not end its run within 0.2 s of the run's end" in caplog.text
    finally:
        if hung.is_alive():
            hung.kill()


_STUB_BENCH_SIGTERM = """
import os, signal, sys, time, types
from absl import app
from dualpath_jax.runtime import driver
from experiments import parse_flags_or_exit

def measure(ops, cfg, *a, **k):  # SIGTERM while the prefill rate is measured (as from `timeout`)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

driver.measure_prefill_tokens_per_s = measure
from experiments import bench_runtime as job
sys.argv = [sys.argv[0], "--config=configs/tiny_runtime.py:test", "--config.results_dir=" + sys.argv[1], "--skip_sim",
            "--skip_overhead"]
app.run(job.main, flags_parser=parse_flags_or_exit)
"""


def test_sigterm_of_bench_runtime_is_its_ctrl_c_line(tmp_path):
    """experiments.bench_runtime had the SIGTERM behaviour experiments.run had: the process ended at once (exit -15),
    an empty results directory left, no word. Contract: as for Ctrl-C, one line naming SIGTERM, no directory left, a
    failing exit."""
    results = tmp_path / "results"
    out = _launch("-c", _STUB_BENCH_SIGTERM, str(results))
    assert out.returncode == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and os.listdir(results) == []
    assert out.stderr.rstrip().splitlines()[-1] == (
        "interrupted (SIGTERM) while measuring the prefill throughput; nothing ran"
    )
