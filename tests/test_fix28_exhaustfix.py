"""Running out of a resource costs the run what the resource held, not the run (fix28 "exhaust" audit).

- A write-back block the StoreKeeper can neither keep (no room beside the pinned ones) nor remove (another user's
  file: EACCES; an immutable file: EPERM; a read-only remount: EROFS) failed the run ("fetch from node 2 failed:
  PermissionError"). It is now left on disk over the capacity, as a failed eviction's block, and counted.
- The driver out of file descriptors while a node connects: `os.dup` in the control server's auth ended its thread
  raw, and the run's failure blamed the node ("cannot reach the driver's control server"). The failure now names the
  driver's fd limit.
- Host buffers beyond the address-space limit (`ulimit -v`) are a config error naming it.
- A corrupt block that cannot be removed (read-only mount) is logged and counted once, not at every access; reads
  failing for want of file descriptors log one line per spell.
- A new store on a full disk (its STORE.json cannot be written) opens with its metadata pending instead of raising.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import subprocess
import sys
from multiprocessing.connection import Connection

import numpy as np
import pytest
from test_fix23_keeper import BS, FILE, LAYOUT, write
from test_kv_store import LAYOUT as KV_LAYOUT
from test_kv_store import content, make_keys

from dualpath_jax.block_keys import block_keys
from dualpath_jax.runtime.control import ControlServer
from dualpath_jax.runtime.node import store_stats
from dualpath_jax.runtime.scheduler_service import StoreKeeper
from dualpath_jax.store import LocalDirStore, local_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Unremovable(LocalDirStore):
    """A store whose block files cannot be unlinked, as os.unlink says for another user's file in a shared directory
    (root ignores file modes, so a real one needs ext4 and `chattr +i`)."""

    def remove(self, key):
        raise PermissionError(errno.EPERM, "Operation not permitted", self.path_of(key))


def test_a_block_the_keeper_cannot_remove_is_left_and_counted_not_raised(tmp_path, caplog):
    keeper = StoreKeeper(_Unremovable(tmp_path, LAYOUT, capacity_bytes=3 * FILE, stat_on_hit=True))
    node = LocalDirStore(tmp_path, LAYOUT)
    a = block_keys(np.arange(5 * BS, dtype=np.int32), BS)
    write(node, a[:2])
    assert keeper.lookup(1, a[:2]) == 2
    write(node, a[2:])
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.scheduler_service"):
        keeper.turn_done(1, a, 2)  # raised PermissionError: the run failed ("fetch from node 2 failed")
    # a[2] fits beside the 2 pinned blocks; a[3] and a[4] have no room and stay on disk, unindexed
    assert keeper.store.lookup(a) == 3 and all(os.path.exists(node.path_of(k)) for k in a[3:])
    assert keeper.unremovable_blocks == 2 and keeper.unkept_blocks == 0
    stats = keeper.report(store_stats(keeper.store))
    assert stats["unremovable_blocks"] == 2 and stats["evict_failures"] == 2 and stats["unkept_blocks"] == 0
    warned = [r.getMessage() for r in caplog.records if "could not be removed" in r.getMessage()]
    assert len(warned) == 1 and a[3].hex() in warned[0]  # once per run
    keeper.store.close()
    node.close()


def test_a_driver_out_of_file_descriptors_fails_the_run_naming_its_limit():
    """A node's connection served (`_serve`, the connection's thread) with every descriptor of the process taken: the
    auth's `os.dup` raised EMFILE out of the thread ("Exception in thread control-conn"), the node saw EOF and the run
    failed blaming it. Now on_error gets a line naming the fd limit, and the connection is dropped."""
    errors = []
    srv = ControlServer(lambda report: None, b"k" * 16, on_error=errors.append)
    ours, peer = socket.socketpair()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, top + 64), hard))  # (a few fds to fill)
        while True:  # every descriptor taken
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as e:
                assert e.errno == errno.EMFILE
                break
        srv._serve(Connection(ours.detach()))  # raised OSError EMFILE (in its thread: the thread's end)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        srv.close()
    assert peer.recv(1) == b""  # (dropped: the node sees its connection closed)
    peer.close()
    assert len(errors) == 1 and "out of file descriptors" in errors[0], errors
    assert f"RLIMIT_NOFILE {min(soft, top + 64)}" in errors[0] and "ulimit -n" in errors[0], errors


_AS_CHECK = """
import resource, sys
from configs.tiny_runtime import get_config
from dualpath_jax.runtime.config import ConfigError, RuntimeConfig, validate

cfg = RuntimeConfig.from_config_dict(get_config("test").runtime)
with open("/proc/self/statm") as f:
    mapped = int(f.read().split()[0]) * resource.getpagesize()
soft = mapped + (256 << 20)
resource.setrlimit(resource.RLIMIT_AS, (soft, resource.getrlimit(resource.RLIMIT_AS)[1]))
for launcher, each in (("local", soft + 1), ("inprocess", 128 << 20)):
    bad = cfg.replace(**{"launcher": launcher, "transport": "tcp", "buffers.pe_buffer_bytes": each,
                         "buffers.de_buffer_bytes": each})
    try:
        validate(bad)
        print(launcher, "validated")
    except ConfigError as e:
        print(launcher, e)
"""


def test_host_buffers_beyond_the_address_space_limit_are_a_config_error():
    """Buffers beyond `ulimit -v` (RLIMIT_AS) passed validation: the run loaded the model, then a node failed mapping
    its buffer ("cannot map ... Cannot allocate memory"), without naming the limit. (A subprocess: the limit is its.)"""
    out = subprocess.run(
        [sys.executable, "-c", _AS_CHECK], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    assert len(out) == 2, out
    local, inprocess = out
    assert local.startswith("local config.buffers: a node process maps") and "RLIMIT_AS" in local, local
    assert "ulimit -v" in local
    assert inprocess.startswith("inprocess config.buffers: a node process maps") and "maps already" in inprocess


def _read_only_unlink(path, *args, **kwargs):
    raise OSError(errno.EROFS, "Read-only file system", path)


def test_a_corrupt_block_that_cannot_be_removed_is_logged_and_counted_once(tmp_path, monkeypatch, caplog):
    """On a read-only mount a damaged block was logged "removed, treated as a miss" before its unlink failed, and
    every later lookup or read of it logged both lines and counted `corrupt_blocks` again (1 at open, 2 after a
    lookup, 4 after two reads). Now one line says it was left, once per file; a new file under the key is judged
    anew."""
    s = LocalDirStore(tmp_path / "kv", KV_LAYOUT)
    keys = make_keys(2)
    for k in keys:
        assert s.write(k, content(k))
    s.close()
    with open(s.path_of(keys[0]), "r+b") as f:
        f.truncate(100)
    monkeypatch.setattr(os, "unlink", _read_only_unlink)
    out = np.zeros(KV_LAYOUT.full_block_nbytes, np.uint8)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        s = LocalDirStore(tmp_path / "kv", KV_LAYOUT)
        assert s.lookup(keys) == 0 and not s.read(keys[0], out) and not s.read(keys[0], out)
    lines = [r.getMessage() for r in caplog.records if keys[0].hex() in r.getMessage()]
    assert len(lines) == 1 and "could not remove corrupt block" in lines[0] and "left on disk" in lines[0], lines
    assert "removed, treated" not in caplog.text
    assert s.stats().corrupt_blocks == 1 and os.path.exists(s.path_of(keys[0]))
    os.rename(s.path_of(keys[0]), s.path_of(keys[0]) + ".x")  # another damaged file under the key: judged anew
    with open(s.path_of(keys[0]), "wb") as f:
        f.write(b"x" * 100)
    assert s.lookup(keys[:1]) == 0 and s.stats().corrupt_blocks == 2
    s.close()


def test_reads_failing_for_want_of_file_descriptors_log_one_line_per_spell(tmp_path, monkeypatch, caplog):
    """Out of file descriptors, every failed block read logged a warning (125 lines for 200 reads); writes logged one
    line per spell. Reads now do the same: one line, the rest counted (`read_errors`), until a read succeeds."""
    s = LocalDirStore(tmp_path / "kv", KV_LAYOUT, fd_cache=0)
    keys = make_keys(4)
    for k in keys:
        assert s.write(k, content(k))
    real_open = os.open
    failing = [True]

    def open_emfile(path, flags, *args, **kwargs):
        if failing[0] and str(path).endswith(".kvb"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_emfile)
    out = np.zeros(KV_LAYOUT.full_block_nbytes, np.uint8)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        assert not any(s.read(k, out) for k in keys + keys)
        failing[0] = False
        assert s.read(keys[0], out)
        failing[0] = True
        assert not s.read(keys[1], out)  # (a new spell: said again)
    lines = [r.getMessage() for r in caplog.records if "I/O error opening block" in r.getMessage()]
    assert len(lines) == 2 and "counted (stats read_errors)" in lines[0], lines
    assert s.stats().read_errors == 9
    s.close()


@pytest.fixture
def full_tmpfs(tmp_path):
    """A 64 KiB tmpfs in tmp_path filled by one file (`filler`: remove it to free the space); unmounted after."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (a real full disk: ENOSPC)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"x" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_new_store_on_a_full_disk_opens_pending_and_is_made_once_there_is_room(full_tmpfs, monkeypatch, caplog):
    """A full disk before a store opened (experiments.run: the next policy's fresh store directory on the disk the
    last policy filled): its STORE.json could not be written, the open raised and the job ended, the remaining
    policies lost. The store is a cache: it now opens without blocks, its lookups and reads miss, its writes fail
    (counted) and never store a block without STORE.json; once there is room a write makes the store and is stored."""
    monkeypatch.setattr(local_dir, "META_RETRY_S", 0.0)
    keys = make_keys(2)
    out = np.zeros(KV_LAYOUT.full_block_nbytes, np.uint8)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        s = LocalDirStore(full_tmpfs / "store", KV_LAYOUT)  # raised OSError ENOSPC: cannot write STORE.json
        assert s.meta_pending and s.lookup(keys) == 0 and not s.read(keys[0], out)
        assert not s.write(keys[0], content(keys[0])) and not s.write(keys[1], content(keys[1]))
    st = s.stats()
    assert st.write_errors == 2 and st.writes == 0 and s.keys() == []
    assert not os.path.exists(full_tmpfs / "store" / "STORE.json") and not os.path.exists(s.path_of(keys[0]))
    assert not [f for f in os.listdir(full_tmpfs / "store") if f.endswith(".tmp")]  # (no temp file left)
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "metadata pending" in said[0] and "No space left on device" in said[0], said
    os.unlink(full_tmpfs / "filler")
    assert s.write(keys[0], content(keys[0])) and not s.meta_pending
    assert os.path.isfile(full_tmpfs / "store" / "STORE.json")
    assert s.lookup(keys) == 1 and s.read(keys[0], out)
    np.testing.assert_array_equal(out, content(keys[0]))
    s.close()
    again = LocalDirStore(full_tmpfs / "store", KV_LAYOUT)  # a store like any other: its block kept
    assert again.keys() == [keys[0]] and not again.meta_pending
    again.close()


def test_a_store_directory_it_may_not_write_is_still_refused_at_open(tmp_path, monkeypatch):
    """Only a full disk opens pending: a read-only or forbidden directory (EROFS, EACCES) is refused as before."""
    real_open = open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(OSError, match="cannot write the store metadata .*Read-only file system"):
        LocalDirStore(tmp_path / "store", KV_LAYOUT)


def test_a_memory_limit_of_this_process_s_own_cgroup_v1_is_the_limit(monkeypatch):
    """Only the root's cgroup v1 file was read: a limit on the process's own (nested) cgroup was missed."""
    import builtins
    import io

    from dualpath_jax.runtime import config as rc

    real_open = builtins.open
    files = {
        "/proc/self/cgroup": "5:cpu,cpuacct:/job\n4:memory:/job/step\n0::/\n",
        "/sys/fs/cgroup/memory/job/memory.limit_in_bytes": f"{2 << 30}\n",
        "/sys/fs/cgroup/memory/job/step/memory.limit_in_bytes": f"{1 << 30}\n",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
    }

    def fake_open(path, *a, **k):
        if str(path) in files:
            return io.StringIO(files[str(path)])
        if str(path).startswith(("/sys/fs/cgroup", "/proc/self/cgroup")):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert rc.host_memory_bytes() == (
        1 << 30,
        "the cgroup memory limit (/sys/fs/cgroup/memory/job/step/memory.limit_in_bytes)",
    )
