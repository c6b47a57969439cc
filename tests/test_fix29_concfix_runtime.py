"""Fix wave 29, "concfix": the concurrency audit's runtime findings (/work/notes/fix29_concurrent_report.md).

- 7: `driver.remove_stores_of_killed_runs` removed a live run's temporary store when that run's pid is gone here (a
  run in another PID namespace sharing /tmp): a run now holds its temp store's (and netns control directory's) flock
  for its life, and the sweeper keeps a directory whose lock is held.
- 8: a SIGKILLed driver's local node processes went on (compiling, holding their memory) until they next talked to
  it: they now end with it (Linux parent-death signal, or a thread polling the parent pid).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gone_pid() -> int:
    """A pid with no process (one that ran and was reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from dualpath_jax.runtime import driver
path, fd = driver.held_temp_dir({prefix!r}, {tmp!r})
print(path, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["dualpath_store_{pid}_", "dpj-control-{pid}-"])
def test_a_store_whose_run_lives_elsewhere_is_kept_and_an_unheld_one_removed(tmp_path, kind):
    """The holder's pid in the name is one that is gone here, as a run in another PID namespace looks. Before: its
    directory was removed while it ran. A directory of a gone pid that nobody holds (an old-style store, a killed
    run's) is removed as before."""
    from dualpath_jax.runtime import driver

    gone = _gone_pid()
    prefix = kind.format(pid=gone)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(repo=REPO, prefix=prefix, tmp=str(tmp_path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        held = holder.stdout.readline().strip()
        assert held.startswith(str(tmp_path / prefix)), held
        (tmp_path / (prefix + "old1") / "blocks").mkdir(parents=True)  # (no holder: a killed run's)
        removed = driver.remove_stores_of_killed_runs(str(tmp_path))
        assert removed == [str(tmp_path / (prefix + "old1"))]
        assert os.path.isdir(held)
    finally:
        holder.kill()
        holder.wait()
    assert driver.remove_stores_of_killed_runs(str(tmp_path)) == [held]  # (its run gone: removed)


_DRIVER = """
import os, sys, threading, time
from dualpath_jax.runtime import launcher
from dualpath_jax.runtime.scheduler_service import GroupSpec


def busy(spec, *args):  # a node compiling its steps: it talks to no one for a while
    # (one write: with PYTHONUNBUFFERED=1, print's parts were separate writes, and the two nodes' lines interleaved
    # into "busybusy  123\\n456\\n" now and then: neither line seen, the test waited out the driver)
    os.write(1, f"busy {os.getpid()}\\n".encode())
    time.sleep(60)


if __name__ == "__mp_main__":  # (each spawned node process imports this file as __mp_main__ first)
    launcher._serve_session = busy

if __name__ == "__main__":
    groups = [GroupSpec(0, "prefill", [0]), GroupSpec(1, "decode", [1])]
    if sys.argv[1] == "thread":  # started by a thread that then ends: the nodes must outlive it
        t = threading.Thread(target=lambda: globals().update(cluster=launcher.LocalCluster(groups)))
        t.start()
        t.join()
    else:
        cluster = launcher.LocalCluster(groups)
    for p in cluster.procs.values():  # (a node that ends before the test kills this driver: its exit code)
        threading.Thread(target=lambda p=p: (p.join(), print("node", p.pid, "exited", p.exitcode, file=sys.stderr, flush=True)), daemon=True).start()
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # (a zombie has ended)
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
@pytest.mark.parametrize("started_by", ["main", "thread"])
def test_the_node_processes_of_a_sigkilled_driver_end_with_it(tmp_path, started_by):
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    env = {**os.environ, "PYTHONPATH": REPO}
    log = tmp_path / "driver.stderr"
    with open(log, "w") as err:
        drv = subprocess.Popen(
            [sys.executable, str(script), started_by], cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, env=env
        )
    nodes: list[int] = []
    try:
        while len(nodes) < 2:
            line = drv.stdout.readline()
            assert line, f"the driver ended before its nodes were busy: {log.read_text()[-3000:]}"
            if line.startswith("busy "):
                nodes.append(int(line.split()[1]))
        time.sleep(1.0)  # (a thread that started them ended long ago: they are still there)
        assert all(_alive(p) for p in nodes)
        drv.send_signal(signal.SIGKILL)
        drv.wait()
        deadline = time.time() + 10  # (before: they slept on, 60 s)
        while time.time() < deadline and any(_alive(p) for p in nodes):
            time.sleep(0.1)
        assert not [p for p in nodes if _alive(p)], "node processes outlived their SIGKILLed driver"
    finally:
        if drv.poll() is None:
            drv.kill()
            drv.wait()
        for p in nodes:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


_KEEPER = """
import sys, time
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from test_kv_store import LAYOUT
from dualpath_jax.runtime.scheduler_service import StoreKeeper
from dualpath_jax.store import LocalDirStore
keeper = StoreKeeper(LocalDirStore({root!r}, LAYOUT, capacity_bytes=1 << 20))
print("keeping", flush=True)
time.sleep(60)
"""


def _keeper(root):
    from test_kv_store import LAYOUT

    from dualpath_jax.runtime.scheduler_service import StoreKeeper
    from dualpath_jax.store import LocalDirStore

    return StoreKeeper(LocalDirStore(root, LAYOUT, capacity_bytes=1 << 20))


def test_a_run_keeping_a_bounded_store_another_live_run_keeps_warns_once(tmp_path, caplog):
    """Before: two runs keeping one bounded store each kept the capacity for its own view (the directory held up to
    2 x capacity_bytes, each evicting the other's blocks) and nothing said so."""
    root = str(tmp_path / "store")
    _keeper(root).finish()  # (made; alone: no warning)
    assert "another live run keeps" not in caplog.text
    other = subprocess.Popen(
        [sys.executable, "-c", _KEEPER.format(repo=REPO, tests=os.path.join(REPO, "tests"), root=root)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout.readline().split() == ["keeping"]
        with caplog.at_level("WARNING", logger="dualpath_jax.runtime.scheduler_service"):
            keeper = _keeper(root)
            keeper.finish()
        lines = [r.getMessage() for r in caplog.records if "another live run keeps" in r.getMessage()]
        assert len(lines) == 1 and root in lines[0] and "N x capacity_bytes (1,048,576 bytes each)" in lines[0]
        assert keeper.shared_with_another_run
    finally:
        other.kill()
        other.wait()
    caplog.clear()
    after = _keeper(root)  # (the other run gone: its lock went with it)
    after.finish()
    assert not after.shared_with_another_run and "another live run keeps" not in caplog.text


def test_the_run_that_started_first_warns_at_its_end(tmp_path, caplog):
    root = str(tmp_path / "store")
    first = _keeper(root)
    with caplog.at_level("WARNING", logger="dualpath_jax.runtime.scheduler_service"):
        second = _keeper(root)
        assert sum("another live run keeps" in r.getMessage() for r in caplog.records) == 1
        first.finish()  # (the second still keeps it)
        second.finish()
    assert sum("another live run keeps" in r.getMessage() for r in caplog.records) == 2  # (once each)
    assert first.shared_with_another_run and second.shared_with_another_run


def test_netns_runs_share_the_cluster_lock_and_a_second_one_is_warned(tmp_path, caplog):
    """9: two netns runs at once share every engine's shaped CNIC (each measured about half the rate its table
    states) and nothing said so. The lock on a temp path (a test must not touch the real cluster)."""
    from dualpath_jax.runtime import netns

    lock = str(tmp_path / "netns.lock")
    with caplog.at_level("WARNING", logger="dualpath_jax.runtime.netns"):
        first, alone = netns.hold_cluster(lock)
        assert first is not None and not alone and "another netns run" not in caplog.text
        second, shared = netns.hold_cluster(lock)
    try:
        assert shared and "another netns run uses the network namespaces now" in caplog.text and lock in caplog.text
    finally:
        os.close(second)
        os.close(first)


def _lock_holder(path: str, how: str) -> subprocess.Popen:
    """A process that holds `path`'s flock (`how`: LOCK_EX or LOCK_SH) until killed; it prints "held" once it does.
    (flock(1) -c left its command's shell holding the lock after flock itself was killed.)"""
    code = (
        f"import fcntl, os, time; fd = os.open({path!r}, os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.{how}); "
        "print('held', flush=True); time.sleep(60)"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_a_netns_run_is_refused_while_up_or_down_holds_the_lock(tmp_path):
    from dualpath_jax.runtime import netns

    lock = str(tmp_path / "netns.lock")
    holder = _lock_holder(lock, "LOCK_EX")  # (as netns_cluster.sh up / down holds it)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(netns.ClusterBusy, match="up or down is changing the network namespaces now"):
            netns.hold_cluster(lock)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.geteuid() != 0, reason="netns_cluster.sh needs root")
def test_netns_cluster_up_and_down_refuse_while_a_run_holds_the_lock(tmp_path):
    """`down` deleted the veths under a running netns run. Checked with `up 0` (a NODES it refuses before making
    anything), never a real `down`: other tests use the cluster."""
    lock = str(tmp_path / "netns.lock")
    env = {**os.environ, "DUALPATH_NETNS_LOCK": lock}
    script = os.path.join(REPO, "experiments", "netns_cluster.sh")
    run = _lock_holder(lock, "LOCK_SH")
    try:  # (a run holds it shared: `netns.hold_cluster`)
        assert run.stdout.readline().strip() == "held"
        done = subprocess.run(["bash", script, "up", "0"], capture_output=True, text=True, env=env, timeout=30)
    finally:
        run.kill()
        run.wait()
    assert done.returncode == 1 and f"uses the cluster now (it holds {lock})" in done.stderr, done.stderr
    done = subprocess.run(["bash", script, "up", "0"], capture_output=True, text=True, env=env, timeout=30)
    assert done.returncode == 1 and "NODES must be a whole number" in done.stderr, done.stderr  # (the lock taken)
