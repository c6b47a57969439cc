"""KV store hunt, third pass: block files of the wrong size, and refresh() racing this process's own removals."""

import os

import numpy as np
import pytest

from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.store import LocalDirStore, block_file, local_dir

LAY = BlockLayout(num_layers=4, block_tokens=16, bytes_per_token_per_layer=64, fingerprint="hunt3/a")
FB = LAY.full_block_nbytes
FN = block_file.file_nbytes(LAY)

READS = {
    "c_preadv": {"read_method": "preadv"},
    "py_preadv": {"read_method": "preadv", "native_verify": False},
    "unverified": {"verify": False},
}


def _block(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, FB, dtype=np.uint8)


@pytest.mark.parametrize("extra", [1, 4096])
@pytest.mark.parametrize("cfg", sorted(READS))
def test_a_block_file_with_bytes_appended_is_a_corrupt_miss_for_every_read(tmp_path, cfg, extra):
    # A file longer than a block is damage (the scan at open removes it, lookup's stat says absent, layer and mapped
    # reads miss): a Full-Block preadv read must not return it as a hit and keep it.
    s = LocalDirStore(tmp_path / "kv", LAY, **READS[cfg])
    key = bytes(range(1, 17))
    s.write(key, _block(0))
    with open(s.path_of(key), "ab") as f:
        f.write(b"\0" * extra)
    out = np.zeros(FB, np.uint8)
    assert not s.read(key, out)
    st = s.stats()
    assert (st.read_corrupt, st.corrupt_blocks, st.read_hits) == (1, 1, 0)
    assert not os.path.exists(s.path_of(key))
    assert s.lookup([key]) == 0 and not s.contains(key) and s.used_bytes == 0
    s.write(key, _block(0))  # written again: a hit with the right bytes
    assert s.read(key, out) and (out == _block(0)).all()
    s.close()


def _scandir_hook(monkeypatch, when_listing: str, action):
    """Run `action` once while the scan lists fan-out directory `when_listing` (after it stat'ed the earlier ones)."""
    real = os.scandir

    def scandir(path):
        entries = list(real(path))
        if os.path.basename(path) == when_listing:
            action()
        return iter(entries)

    monkeypatch.setattr(local_dir.os, "scandir", scandir)


def test_refresh_does_not_index_again_a_block_this_process_removed_while_it_ran(tmp_path, monkeypatch):
    s = LocalDirStore(tmp_path / "kv", LAY)
    gone, other = b"\xab" * 16, b"\xcd" * 16  # fan-out directories ab/ (listed first) and cd/
    s.write(gone, _block(1))
    s.write(other, _block(2))
    removed = []
    _scandir_hook(monkeypatch, "cd", lambda: removed.append(s.remove(gone)))
    s.refresh()
    monkeypatch.undo()
    assert removed == [True] and not os.path.exists(s.path_of(gone))
    assert not s.contains(gone) and s.lookup([gone]) == 0
    assert s.keys() == [other] and s.used_bytes == FN
    s.close()


def test_refresh_does_not_index_again_a_block_evicted_while_it_ran(tmp_path, monkeypatch):
    # capacity 2: a write during the scan evicts the LRU block (listed already); refresh must not count it again
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=2 * FN)
    old, mid, new = b"\xab" * 16, b"\xcd" * 16, b"\xef" * 16
    s.write(old, _block(1))
    s.write(mid, _block(2))
    _scandir_hook(monkeypatch, "cd", lambda: s.write(new, _block(3)))
    s.refresh()
    monkeypatch.undo()
    assert s.stats().evictions == 1 and not os.path.exists(s.path_of(old))
    assert sorted(s.keys()) == sorted([mid, new]) and s.used_bytes == 2 * FN
    assert s.lookup([old]) == 0 and not s.contains(old)
    s.close()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_durable_write_whose_directory_fsync_fails_stores_nothing(tmp_path, monkeypatch, overwrite):
    # write() returning False counts a write error, "nothing stored": the renamed file must not stay on disk
    # unindexed (uncounted against capacity, found by lookups and other processes)
    s = LocalDirStore(tmp_path / "kv", LAY, capacity_bytes=2 * FN)
    a, b, c = b"\xab" * 16, b"\xcd" * 16, b"\xef" * 16
    s.write(a, _block(1))
    s.write(b, _block(2))

    def eio(path):
        raise OSError(5, "Input/output error", path)

    monkeypatch.setattr(local_dir, "_fsync_dir", eio)
    key = b if overwrite else c
    assert not s.write(key, _block(3), durable=True, overwrite=overwrite)
    monkeypatch.undo()
    assert s.stats().write_errors == 1
    assert not os.path.exists(s.path_of(key)) and not s.contains(key) and s.lookup([key]) == 0
    s.write(b"\x11" * 16, _block(4))
    on_disk = [f for _, _, fs in os.walk(tmp_path / "kv" / "blocks") for f in fs]
    assert len(on_disk) == len(s.keys()) and s.used_bytes == len(on_disk) * FN <= 2 * FN
    s.close()


def test_two_processes_creating_one_store_for_different_layouts_cannot_both_open_it(tmp_path, monkeypatch):
    # One model per directory: a creator that loses the race to make STORE.json must check the winner's layout, not
    # overwrite it (else both open, and each removes the other's blocks as corrupt, "another model's block").
    root = tmp_path / "kv"
    other = BlockLayout(num_layers=2, block_tokens=16, bytes_per_token_per_layer=64, fingerprint="hunt3/b")
    real_dump = local_dir.json.dump
    winner = []

    def dump(obj, f, **kw):  # the other creator makes STORE.json after this one found none, before it renames
        if not winner:
            winner.append(None)  # (once: the other creator's own dump comes here too)
            winner[0] = LocalDirStore(root, other)
        return real_dump(obj, f, **kw)

    monkeypatch.setattr(local_dir.json, "dump", dump)
    with pytest.raises(ValueError, match="one directory per model"):
        LocalDirStore(root, LAY)
    monkeypatch.undo()
    winner[0].close()
    LocalDirStore(root, other).close()  # the directory is still the winner's
    assert not [f for f in os.listdir(root) if f.endswith(".tmp")]


def test_an_old_temp_file_named_after_a_live_pid_of_this_host_is_removed(tmp_path):
    # A writer killed mid-write leaves a temp file named after its pid; once that pid is reused (here: our parent,
    # alive), the "pid gone" test keeps the file forever: past stale_temp_s it is a dead writer's as on other hosts.
    s = LocalDirStore(tmp_path / "kv", LAY)
    key = b"\xab" * 16
    d = os.path.dirname(s.path_of(key))
    os.makedirs(d, exist_ok=True)
    old = os.path.join(d, f".tmp.{local_dir._host_id()}.{os.getppid()}.0123abcd.{key.hex()}")
    fresh = os.path.join(d, f".tmp.{local_dir._host_id()}.{os.getppid()}.4567abcd.{key.hex()}")
    for p in (old, fresh):
        with open(p, "wb") as f:
            f.write(b"\0" * 100)
    os.utime(old, (1e9, 1e9))  # (2001)
    s.close()
    s = LocalDirStore(tmp_path / "kv", LAY, stale_temp_s=3600)
    assert s.stats().temp_files_removed == 1
    assert not os.path.exists(old) and os.path.exists(fresh)  # (a live writer's file in progress is kept)
    s.close()
