"""Fix wave 31, "resources" (report only: these tests fail on the code they were written against, for the lead).

Many runs in one process (a notebook, a sweep script): a `LocalCluster` session's node processes must outlive a
failed run; an engine out of file descriptors must not take a live peer for a dead node; a store's mapped reads
must not miss for good once the process cannot map any more (vm.max_map_count, RLIMIT_AS); a one-run `local`
launcher must not leave its node processes' pipes open until the garbage collector finds them; a Ctrl-C while a run
removes its temporary store must not leave that directory's lock held for the process's life.
"""

from __future__ import annotations

import errno
import gc
import os
import subprocess
import sys
import textwrap

import pytest
from test_fix11_runtimepol import registered  # noqa: F401 -- the fixture registering fix11rp_raises

from dualpath_jax.runtime import driver
from dualpath_jax.runtime.launcher import LocalCluster
from dualpath_jax.runtime.scheduler_service import RunFailed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _turns(trajs) -> int:
    return sum(len(t.turns) for t in trajs)


def test_a_failed_run_leaves_a_local_cluster_sessions_node_processes_serving(registered, base, trajs):  # noqa: F811
    """What was wrong: a run whose policy raised failed (RunFailed, right), but the control server dropped the
    fetching node's connection and that node's *session* process took it for its driver's end (DriverLost) and
    exited; every later run of the session then failed at once: "no live prefill or decode engine left (dead: [0])
    ... exited with code 1: its run raised DriverLost(...) before this run". Contract: the failed run raises naming
    the policy; the session's processes are all alive after it, and the next run completes every turn with no dead
    node."""
    cfg = base.replace(**{"launcher": "local", "transport": "tcp", "cluster.decode_nodes": 1, "run_timeout_s": 120.0})
    bad = cfg.replace(**{"scheduler.name": "fix11rp_raises"})
    with LocalCluster(driver.layout_groups(cfg)) as cluster:
        with pytest.raises(RunFailed, match="policy 'fix11rp_raises' raised"):
            driver.run(bad, trajs, launcher=cluster.launcher(bad))
        dead = {n: p.exitcode for n, p in cluster.procs.items() if not p.is_alive()}
        assert not dead, f"session node processes ended by the failed run (node: exit code): {dead}"
        res = driver.run(cfg, trajs, launcher=cluster.launcher(cfg))
    assert not res.dead_nodes and len(res.records) == _turns(trajs)


def test_an_engine_out_of_file_descriptors_fails_the_run_naming_the_limit(base, ops, trajs, monkeypatch):
    """What was wrong: an engine whose process was out of file descriptors (EMFILE from socket(): RLIMIT_NOFILE, e.g.
    `ulimit -n 256` with 2P6D x 2 engines in process) reported the *peer* it could not connect to as lost, and the
    scheduler declared that live node dead ("node 5 (decode) is dead (engine 1 (node 0) could not reach it:
    PeerLostError(... [Errno 24] Too many open files))"): its requests re-ran elsewhere and the run "finished" on
    fewer nodes, or failed with "no live prefill or decode engine left" blaming the nodes. Contract: the run fails
    naming RLIMIT_NOFILE (the limit, and to raise it); no node is declared dead for it."""
    import transport.tcp as tcp

    real = tcp.socket.create_connection
    calls = []

    def out_of_fds(*args, **kwargs):  # the first connection of the run: this process has no descriptor left
        calls.append(args[0])
        if len(calls) == 1:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(*args, **kwargs)

    monkeypatch.setattr(tcp.socket, "create_connection", out_of_fds)
    cfg = base.replace(**{"transport": "tcp", "run_timeout_s": 60.0})
    with pytest.raises(RunFailed, match=r"RLIMIT_NOFILE"):
        res = driver.run(cfg, trajs, model_ops=ops)
        pytest.fail(f"the run finished; dead nodes: {res.dead_nodes}")
    assert calls, "no connection was made: the test did not reach the transport"


_MAPPED_READS = """
import resource, re, sys
import numpy as np
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import LocalDirStore

lay = BlockLayout(num_layers=4, block_tokens=16, bytes_per_token_per_layer=4096, fingerprint="fix31-resources")
key = lambda i: i.to_bytes(2, "little") + bytes(14)
s = LocalDirStore(sys.argv[1], lay, read_method="mmap", mmap_after_reads=0)
for i in range(40):
    s.write(key(i), np.full(lay.full_block_nbytes, i, np.uint8))
out = np.zeros(lay.full_block_nbytes, np.uint8)
s.read(key(0), out)  # (every code path once, before the limit)
vm = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (4 << 20), resource.RLIM_INFINITY))  # room for ~15 block mappings
hits = sum(bool(s.read(key(i), out)) and int(out[-1]) == i for i in range(40))
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print("hits", hits, "read_errors", s.stats().read_errors)
s.close()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, RLIMIT_AS")
def test_mapped_reads_that_cannot_map_read_through_preadv(tmp_path):
    """What was wrong: a mapped read (read_method="mmap", the default) whose mmap failed with ENOMEM (the process at
    RLIMIT_AS, `ulimit -v`; or at vm.max_map_count, 65530 by default, with a large fd_cache of kept mappings) was
    a miss counted in read_errors, "[Errno 12] Cannot allocate memory" once, naming no limit; and since the files
    already mapped stay mapped, every block not mapped yet missed on every later read, for good. A preadv read of
    the same file needs no mapping. Contract: such a read reads through preadv: every block a hit, bit-exact."""
    script = tmp_path / "mapped.py"
    script.write_text(textwrap.dedent(_MAPPED_READS))
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "kv")], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[:4] == ["hits", "40", "read_errors", "0"], out.stdout + out.stderr[-2000:]


def test_a_one_run_local_launcher_leaves_no_pipe_of_its_node_processes_open(base, trajs):
    """What was wrong: `LocalProcessLauncher.shutdown` joined its node processes but did not close their
    `multiprocessing.Process` objects, and the launcher sits in a reference cycle (the scheduler holds its
    `exit_reason`, its control server the scheduler's `fetch`): each node's sentinel pipe (2 fds) stayed open until
    a full garbage collection, 6 fds a run of 1P2D (13, 19, 25 fds after three runs in one process). Contract: after
    a run, with the collector off, this process holds no more descriptors than before it."""
    cfg = base.replace(**{"launcher": "local", "transport": "tcp", "cluster.decode_nodes": 1, "run_timeout_s": 120.0})
    from dualpath_jax.runtime.launcher import LocalProcessLauncher

    driver.run(cfg, trajs)  # (a first run: whatever a first run opens for good, e.g. multiprocessing's tracker)
    launcher = LocalProcessLauncher(cfg)
    gc.collect()
    before = _open_fds()
    gc.disable()
    try:
        driver.run(cfg, trajs, launcher=launcher)
        opened = _new_fds(before)
    finally:
        gc.enable()
    assert not opened, f"descriptors left open by the run: {opened}"
    # (a closed Process answers nothing: what the driver may still ask of the launcher after its shutdown holds)
    assert launcher.errors == {} and not any(launcher.alive(n) for n in launcher.procs)
    assert all("exited with code 0" in launcher.exit_reason(n) for n in launcher.procs), launcher.procs


def _open_fds() -> dict[str, str]:
    """This process's open descriptors: number -> what it is (the listing's own descriptor left out: closed by then)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def _new_fds(before: dict[str, str]) -> dict[str, str]:
    return {fd: what for fd, what in _open_fds().items() if before.get(fd) != what}


def test_a_ctrl_c_while_a_runs_store_is_removed_leaves_no_lock_held(base, ops, trajs, monkeypatch, tmp_path):
    """What was wrong: `driver.run` removed its temporary store (`cleanup_store`, seconds for a real model's
    gigabytes) and only then closed the descriptor holding the directory's flock. A second Ctrl-C during the removal
    (a notebook's interrupt pressed again) skipped the close: the descriptor leaked and its lock was held for the
    process's life, so the half-removed directory was never removed (`remove_stores_of_killed_runs` keeps a held
    one, and a directory of this pid). Contract: the interrupt propagates; no descriptor of the run is left open."""
    import shutil

    real = shutil.rmtree
    stores = []

    def interrupted(path, *args, **kwargs):  # a Ctrl-C half way through the run's store removal
        if os.path.basename(str(path)).startswith("dualpath_store_"):
            stores.append(path)
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    cfg = base.replace(**{"run_timeout_s": 60.0})
    driver.run(cfg, trajs, model_ops=ops)  # (a first run: whatever a first run opens for good)
    before = _open_fds()
    monkeypatch.setattr(shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        driver.run(cfg, trajs, model_ops=ops)
    monkeypatch.undo()
    assert stores, "the run's store was not removed through shutil.rmtree: the test did not reach the removal"
    opened = _new_fds(before)
    for path in stores:
        real(path, ignore_errors=True)
    assert not opened, f"descriptors left open by the interrupted run: {opened}"
