"""LocalDirStore across processes: a writer killed with SIGKILL mid-write, two processes on one directory, a fork
after reads; with both read methods (mmap: every verified read mapped, however small, from the first on; preadv).

The child processes run this file as a script (`python tests/test_kv_store_procs.py MODE ...`).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# (noqa E402: child processes run this file as a script, so the repo goes on sys.path first)
from dualpath_jax.block_keys import keys_from_hash_ids, root_key  # noqa: E402
from dualpath_jax.kv_layout import BlockLayout  # noqa: E402
from dualpath_jax.store import LocalDirStore  # noqa: E402

# Big blocks (4 MiB) so that a kill lands mid-write often.
BIG = BlockLayout(num_layers=16, block_tokens=64, bytes_per_token_per_layer=4096, fingerprint="procs-test/big")
SMALL = BlockLayout(num_layers=8, block_tokens=16, bytes_per_token_per_layer=256, fingerprint="procs-test/small")
METHODS = {
    "mmap": {"read_method": "mmap", "mmap_min_bytes": 0, "mmap_after_reads": 0},
    "preadv": {"read_method": "preadv"},
}


def content(key: bytes, layout: BlockLayout) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.integers(0, 256, size=layout.full_block_nbytes, dtype=np.uint8)


def keys_of(owner: int, n: int, layout: BlockLayout) -> list[bytes]:
    return keys_from_hash_ids([owner * 1_000_000 + i for i in range(n)], parent=root_key(layout.fingerprint))


def _child(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *args], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )


# ---- child processes ------------------------------------------------------------------------------------
def _writer_main(root: str, owner: int) -> None:
    """Write big blocks forever (until killed)."""
    store = LocalDirStore(root, BIG)
    for i, key in enumerate(keys_of(owner, 100_000, BIG)):
        block = content(key, BIG)
        store.write(key, block)
        print(i, flush=True)


def _mixed_main(root: str, me: int, other: int, n: int, method: str) -> None:
    """Write my blocks and shared ones while reading and checking the other process's blocks as they appear."""
    store = LocalDirStore(root, SMALL, io_threads=2, **METHODS[method])
    mine, theirs, shared = keys_of(me, n, SMALL), keys_of(other, n, SMALL), keys_of(7, n, SMALL)
    verified, bad = set(), 0
    out = np.zeros(SMALL.full_block_nbytes, np.uint8)
    deadline = time.monotonic() + 60
    i = 0
    while (len(verified) < n or i < n) and time.monotonic() < deadline:
        if i < n:
            store.write(mine[i], content(mine[i], SMALL))
            store.write(shared[i], content(shared[i], SMALL))  # both processes write these
            i += 1
        hit = store.lookup(theirs)
        for k in theirs[:hit]:
            if k in verified:
                continue
            if store.read(k, out):
                if (out == content(k, SMALL)).all():
                    verified.add(k)
                else:
                    bad += 1
        for k in shared[:i]:
            if store.read(k, out, layers=None) and not (out == content(k, SMALL)).all():
                bad += 1
    st = store.stats()
    print(json.dumps({"verified": len(verified), "bad": bad, "corrupt": st.read_corrupt}), flush=True)


def _churn_main(root: str, me: int, n: int, capacity_blocks: int, method: str) -> None:
    """Write, look up, read and evict blocks of a shared key set under a small capacity: every read that
    succeeds must return exactly the block's bytes (other processes evict and rewrite them meanwhile)."""
    from dualpath_jax.store import block_file

    cap = capacity_blocks * block_file.file_nbytes(SMALL)
    store = LocalDirStore(root, SMALL, capacity_bytes=cap, **METHODS[method])
    keys = keys_of(3, n, SMALL)
    rng = np.random.default_rng(me)
    out = np.zeros(SMALL.full_block_nbytes, np.uint8)
    layer_out = np.zeros(SMALL.layer_block_nbytes, np.uint8)
    ok = bad = 0
    for _ in range(600):
        i = int(rng.integers(n))
        if rng.random() < 0.4:
            store.write(keys[i], content(keys[i], SMALL))
        else:
            hit = store.lookup(keys[i : i + 3])
            for k in keys[i : i + hit]:
                want = content(k, SMALL)
                if rng.random() < 0.5:
                    if store.read(k, out):
                        ok += 1
                        bad += not (out == want).all()
                else:  # a Layer Block read
                    layer = int(rng.integers(SMALL.num_layers))
                    if store.read(k, layer_out, layers=[layer]):
                        ok += 1
                        off = SMALL.layer_offset(layer)
                        bad += not (layer_out == want[off : off + SMALL.layer_block_nbytes]).all()
    st = store.stats()
    print(json.dumps({"ok": ok, "bad": bad, "corrupt": st.read_corrupt, "evictions": st.evictions}), flush=True)


# ---- tests -----------------------------------------------------------------------------------------------
def _temp_files(root: str) -> list[str]:
    out = []
    for d, _, files in os.walk(os.path.join(root, "blocks")):
        out += [os.path.join(d, f) for f in files if f.startswith(".tmp.")]
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
def test_writer_killed_mid_write_leaves_the_store_consistent(tmp_path, method):
    root = str(tmp_path / "kv")
    LocalDirStore(root, BIG).close()
    partial_kills = kills = 0
    last_leftovers = 0
    # Kill writers until at least two kills landed mid-write (left a partial temp file); a kill just after a
    # rename is fine too, just less interesting. Each new writer's open also cleans its predecessors' leftovers.
    while partial_kills < 2 and kills < 12:
        proc = _child("writer", root, str(kills))
        try:
            for _ in range(2):  # let it finish a couple of blocks first
                assert proc.stdout.readline(), "writer child died before writing"
            deadline = time.monotonic() + 20
            while not _temp_files(root) and time.monotonic() < deadline:
                time.sleep(0.0002)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        last_leftovers = len(_temp_files(root))
        partial_kills += last_leftovers > 0
    assert partial_kills >= 1, f"none of {kills} kills landed mid-write"
    store = LocalDirStore(root, BIG, **METHODS[method])
    assert store.stats().temp_files_removed == last_leftovers, "temp files of dead writers are removed at open"
    assert not _temp_files(root)
    keys = store.keys()
    assert len(keys) >= 2 * kills
    out = np.zeros(BIG.full_block_nbytes, np.uint8)
    for k in keys:  # every listed block reads correctly (a miss would also be allowed, but none happen here)
        assert store.read(k, out), k.hex()
        np.testing.assert_array_equal(out, content(k, BIG))
    assert store.stats().corrupt_blocks == 0
    print(f"killed {kills} writers, {partial_kills} mid-write; {len(keys)} whole blocks read back")
    store.close()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_read_and_write_one_directory(tmp_path, method):
    root = str(tmp_path / "kv")
    n = 40
    a = _child("mixed", root, "1", "2", str(n), method)
    b = _child("mixed", root, "2", "1", str(n), method)
    results = []
    for p in (a, b):
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
        results.append(json.loads(out.strip().splitlines()[-1]))
    for r in results:
        assert r == {"verified": n, "bad": 0, "corrupt": 0}
    store = LocalDirStore(root, SMALL, **METHODS[method])
    assert len(store.keys()) == 3 * n
    out = np.zeros(SMALL.full_block_nbytes, np.uint8)
    for owner in (1, 2, 7):
        ks = keys_of(owner, n, SMALL)
        assert store.lookup(ks) == n
        for k in ks:
            assert store.read(k, out)
            np.testing.assert_array_equal(out, content(k, SMALL))
    store.close()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_processes_evicting_and_rewriting_shared_blocks_never_read_wrong_kv(tmp_path, method):
    root = str(tmp_path / "kv")
    LocalDirStore(root, SMALL).close()
    procs = [_child("churn", root, str(me), "24", "6", method) for me in range(3)]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(results)
    assert all(r["bad"] == 0 and r["corrupt"] == 0 for r in results)
    assert sum(r["ok"] for r in results) > 0 and sum(r["evictions"] for r in results) > 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_fork_after_reads(tmp_path, method):
    """A child forked after reads (open files cached, blocks mapped, the I/O pool's threads started) reads, writes
    and detects damage with the inherited store, also through read_many and submit_write (pools of its own); the
    parent keeps reading right afterwards. The forking process is a fresh interpreter (this test process has JAX's
    threads, which make os.fork() unsafe here)."""
    p = _child("fork", str(tmp_path / "kv"), method)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    assert out.strip().splitlines()[-1] == "fork ok", out


def _fork_main(root: str, method: str) -> None:
    """test_fork_after_reads, in a fresh interpreter; prints "fork ok" when every check passed."""
    store = LocalDirStore(root, SMALL, **METHODS[method])
    keys = keys_of(5, 6, SMALL)
    out = np.zeros(SMALL.full_block_nbytes, np.uint8)
    layer = np.zeros(SMALL.layer_block_nbytes, np.uint8)
    for k in keys[:4]:
        assert store.write(k, content(k, SMALL))
        assert store.read(k, out) and store.read(k, layer, layers=[3])
    assert store.read_many(keys[:2], [out, np.zeros_like(out)]) == [True, True]  # the I/O pool's threads run
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if everything checks out (no pytest machinery here)
        code = 1
        signal.alarm(30)  # a hang (e.g. on the parent's pool threads, which do not exist here) fails the test
        try:
            good = all(store.read(k, out) and (out == content(k, SMALL)).all() for k in keys[:4])
            off = SMALL.layer_offset(5)
            good &= (
                store.read(keys[0], layer, layers=[5]) and (layer == content(keys[0], SMALL)[off:][: len(layer)]).all()
            )
            good &= store.write(keys[4], content(keys[4], SMALL)) and store.read(keys[4], out)
            good &= (out == content(keys[4], SMALL)).all()
            with open(store.path_of(keys[1]), "r+b") as f:  # damage one block: the child's read must miss
                f.seek(store.header_nbytes + 7)
                f.write(b"\xff\x00\xff")
            good &= not store.read(keys[1], out)
            # The child's own I/O pool: the parent's idle pool threads are gone here (one read would wait on them).
            good &= store.read_many([keys[2]], [out]) == [True] and (out == content(keys[2], SMALL)).all()
            outs = [np.zeros_like(out) for _ in range(3)]
            good &= store.read_many([keys[0], keys[2], keys[3]], outs) == [True] * 3
            good &= all((o == content(k, SMALL)).all() for o, k in zip(outs, [keys[0], keys[2], keys[3]], strict=True))
            good &= store.submit_write(keys[5], content(keys[5], SMALL)).result(10)
            code = 0 if good else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"forked child: {status}"
    for k in (keys[0], keys[2], keys[3], keys[4]):  # the child's block too (a lookup adopts it)
        assert store.lookup([k]) == 1 and store.read(k, out)
        np.testing.assert_array_equal(out, content(k, SMALL))
    assert not store.read(keys[1], out)  # the block the child damaged (and removed) is a miss here too
    store.close()
    print("fork ok", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "writer":
        _writer_main(sys.argv[2], int(sys.argv[3]))
    elif mode == "churn":
        _churn_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    elif mode == "fork":
        _fork_main(sys.argv[2], sys.argv[3])
    elif mode == "mixed":
        _mixed_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
