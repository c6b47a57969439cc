"""Small fixes left by session 45 (fix29 "leftovers").

- A full disk under `--config.runtime.store_dir` ended experiments.run before (or between) the runs, though its KV
  store, a cache, opens there with its metadata pending: the launcher's checks and `driver.prepare` now warn and the
  runs go on (missing in the store). A results directory that takes an empty file but not its bytes (a full tmpfs)
  passed the check and the job failed writing its results after the runs: the check now writes bytes, and names
  ENOSPC.
"""

from __future__ import annotations

import errno
import logging
import os
import re

import pytest
from test_fix24_faultfix import _result, job  # noqa: F401 - a fixture
from test_fix28_exhaustfix import full_tmpfs  # noqa: F401 - a fixture

import experiments
from experiments import fresh_dir_or_exit, writable_dir_or_exit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORE_FLAG = "--config.runtime.store_dir"


@pytest.fixture
def inodes_full(monkeypatch):
    """`full(directory)`: from now on nothing can be made under `directory` (mkdir, open with O_CREAT), as on an ext4
    disk out of inodes or out of the blocks a non-root user may take: ENOSPC."""
    real_mkdir, real_open = os.mkdir, os.open
    full = []

    def under(path) -> bool:
        path = os.path.abspath(os.fspath(path))
        return any(path.startswith(d + os.sep) for d in full)

    def mkdir(path, *args, **kwargs):
        if under(path):
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and under(path) and not os.path.exists(path):
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(experiments, "_FULL_STORE_DIRS_SAID", set(), raising=False)
    return lambda d: full.append(os.path.abspath(d))


def test_a_full_disk_under_the_store_dir_costs_hits_not_the_job(job, inodes_full, tmp_path, caplog):  # noqa: F811
    """experiments.run with --config.runtime.store_dir on a full disk: "bad --config.runtime.store_dir ...: cannot
    write there (No space left on device)" and nothing ran. Now one warning, and each policy runs on its own (unmade)
    store subdirectory, which its store makes once there is room."""
    inodes_full(tmp_path / "disk")
    ran = []
    with caplog.at_level(logging.WARNING):
        code, d = job(lambda cfg, ts: ran.append(cfg.store_dir) or _result(), runtime__store_dir=str(tmp_path / "disk"))
    assert code is None and sorted(os.listdir(d)) == ["results.json", "run.json", "table.txt", *_turns()]
    assert [os.path.basename(s).rsplit("-", 1)[-1] for s in ran] == ["basic", "dualpath"]
    assert len(set(ran)) == 2 and all(os.path.dirname(s) == str(tmp_path / "disk") for s in ran)
    said = [r.getMessage() for r in caplog.records if STORE_FLAG in r.getMessage()]
    assert len(said) == 1 and "No space left on device: ENOSPC, the disk is full" in said[0], said
    assert "metadata pending" in said[0]


def _turns() -> list[str]:
    return ["turns_basic.json", "turns_dualpath.json"]


def test_a_results_dir_on_a_full_disk_is_still_refused_naming_enospc(inodes_full, tmp_path):
    """Only a KV store's directory is a cache: a results directory (or a store directory with a file in the way) on
    a full disk is refused as before, now naming ENOSPC."""
    inodes_full(tmp_path)
    with pytest.raises(SystemExit) as e:
        writable_dir_or_exit(str(tmp_path / "res"), "--config.results_dir")
    assert str(e.value) == (
        f"bad --config.results_dir '{tmp_path}/res': cannot write there (No space left on device: ENOSPC, the disk "
        "is full)"
    )
    with pytest.raises(SystemExit, match="cannot make"):
        fresh_dir_or_exit(str(tmp_path.parent), tmp_path.name + "/x", "--config.results_dir")


def test_prepare_opens_a_store_a_full_disk_cannot_make(base, inodes_full, tmp_path, caplog):
    """`driver.prepare` on a store_dir a full disk cannot make: a ConfigError ("cannot be created: No space left on
    device"); now the store opens there with its metadata pending (its warning) and the run may go on."""
    from dualpath_jax.runtime import driver

    inodes_full(tmp_path)
    store_dir = str(tmp_path / "kv" / "store")
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.store.local_dir"):
        driver.prepare(base.replace(store_dir=store_dir))
    assert not os.path.exists(store_dir)
    assert any("metadata pending" in r.getMessage() and store_dir in r.getMessage() for r in caplog.records)


def test_a_directory_that_takes_no_bytes_is_refused_and_a_store_dir_there_warned(full_tmpfs, caplog):  # noqa: F811
    """A full tmpfs takes a new directory and an empty file, not their bytes: the results directory passed the check
    and the job failed writing its results after every run ("cannot write the results ... written nothing"). The
    check writes bytes now: refused before the runs, naming ENOSPC; a store directory there is a warning."""
    with pytest.raises(SystemExit, match=r"cannot write there \(No space left on device: ENOSPC, the disk is full\)"):
        writable_dir_or_exit(str(full_tmpfs / "results"), "--config.results_dir")
    with caplog.at_level(logging.WARNING):
        assert writable_dir_or_exit(str(full_tmpfs / "kv"), STORE_FLAG) == str(full_tmpfs / "kv")
    assert [r for r in caplog.records if "the KV store opens without blocks" in r.getMessage()]
    assert [f for f in os.listdir(full_tmpfs / "kv") if f.startswith(".write-check-")] == []


# ---- 2: a durable store opened with its metadata pending fsyncs the entries of the directories it made ----------


def test_a_durable_store_made_after_a_full_disk_fsyncs_its_roots_entry(tmp_path, monkeypatch):
    """A durable store whose first make a full disk stopped after its directories were made (STORE.json: ENOSPC) made
    itself later, fsync'ing STORE.json and the root, never the root's entry in its parent (nor those of the missing
    parents `os.makedirs` made): a power loss could take the store away. Every made directory's parent is fsync'ed
    once the store is made."""
    from test_kv_store import LAYOUT, content, make_keys

    from dualpath_jax.store import LocalDirStore, local_dir

    monkeypatch.setattr(local_dir, "META_RETRY_S", 0.0)
    real_meta, full = LocalDirStore._check_or_write_meta, [True]

    def meta(self):
        if full.pop() if full else False:
            raise OSError(errno.ENOSPC, "cannot write the store metadata (No space left on device)")
        return real_meta(self)

    monkeypatch.setattr(LocalDirStore, "_check_or_write_meta", meta)
    synced = []
    real_sync = local_dir._fsync_dir
    monkeypatch.setattr(local_dir, "_fsync_dir", lambda d: synced.append(d) or real_sync(d))
    root = tmp_path / "new" / "a" / "store"
    s = LocalDirStore(root, LAYOUT, durable=True)
    assert s.meta_pending and os.path.isdir(root / "blocks") and synced == []
    key = make_keys(1)[0]
    assert s.write(key, content(key)) and not s.meta_pending
    made = [str(tmp_path), str(tmp_path / "new"), str(tmp_path / "new" / "a"), str(root)]
    assert set(made) <= set(synced), synced
    s.close()


# ---- 4: RdmaTransport's max_message_bytes, settable and told to the peers as tcp's ------------------------------


@pytest.mark.parametrize(
    "value,message",
    [
        (65535, "must be >= 65536 (this backend's own control messages go on the same channel"),
        (1.5, "must be an integer, got 1.5"),
        (True, "must be an integer, got True"),
    ],
)
def test_an_rdma_max_message_bytes_is_checked_before_a_device_is_needed(value, message):
    """`RdmaTransport` had no max_message_bytes (a TypeError; its limit fixed at 16 MiB); a bad one is refused by name
    on any host, as its other arguments."""
    from transport.rdma import RdmaConfigError, RdmaTransport

    with pytest.raises(RdmaConfigError, match=re.escape(f"rdma: max_message_bytes {message}")) as e:
        RdmaTransport("x", max_message_bytes=value)
    assert e.value.arg == "max_message_bytes"


def test_an_rdma_max_message_bytes_is_told_to_the_peers(monkeypatch):
    """Over tests/_fake_verbs.py: an endpoint's limit is its control channel's (with the prefix byte) and reaches the
    peer in the handshake, whose larger `send` fails at once naming both limits, in user-message bytes."""
    from _fake_verbs import install

    from transport.base import TransportError
    from transport.rdma import RdmaTransport

    install(monkeypatch)
    a, b = RdmaTransport("ra"), RdmaTransport("rb", max_message_bytes=100_000)
    try:
        assert (a.max_message_bytes, b.max_message_bytes, b.control.max_message_bytes) == (16 << 20, 100_000, 100_001)
        a.connect("rb", b.address, timeout=5)
        payload = bytes(range(256)) * 390 + b"!" * 160  # (100,000 bytes)
        assert a.send("rb", payload).result(10) == 100_000 and b.recv(peer="ra", timeout=10)[1] == payload
        with pytest.raises(TransportError, match=re.escape("ra: message of 100001 bytes exceeds the max_message_bytes=100000 of peer 'rb'")):  # fmt: skip
            a.send("rb", payload + b"!")
        with pytest.raises(ValueError, match="^message of 100001 bytes exceeds max_message_bytes=100000$"):
            b.send("ra", payload + b"!")
        assert a.send("rb", b"after").result(10) == 5 and b.recv(peer="ra", timeout=10)[1] == b"after"  # (set kept)
    finally:
        a.close()
        b.close()


def test_an_rdma_max_message_bytes_goes_through_transport_options(base):
    """config.transport_options of rdma takes max_message_bytes by name (it was refused: "takes no
    max_message_bytes"), and the endpoint a launcher builds gets it."""
    from dualpath_jax.runtime import launcher
    from dualpath_jax.runtime.config import ConfigError, validate
    from transport.rdma import rdma_unavailable_reason

    cfg = base.replace(transport="rdma", launcher="inprocess", transport_options={"max_message_bytes": 1 << 20})
    if rdma_unavailable_reason() is None:
        pytest.skip("this host has pyverbs and an RDMA device")
    with pytest.raises(ConfigError, match="config.transport='rdma' cannot run on this host"):
        validate(cfg)  # (the name passed; then the host has no device)
    assert launcher.endpoint_spec(cfg, "pe0")["max_message_bytes"] == 1 << 20


# ---- 5: the C files a compiled module builds from are in its build record ----------------------------------------


def test_an_edited_c_file_the_record_lists_makes_the_build_stale(tmp_path, monkeypatch):
    """The record held only a module's .py/.pxd/.pyx: an edit of the C it includes (the store's `_verify_c.h`, the
    vendored `_xxhash/`) left the old build running as if current. Its `includes` are compared as its sources."""
    import json

    from test_fix28_stale import _MODULE, _layout, _touch

    from dualpath_jax import compiled

    built = _layout(tmp_path, monkeypatch, sources=("mod.pyx",))
    (built.parent / "sub").mkdir()
    headers = {"mod_c.h": "#define X 1\n", "sub/inc.h": "#define Y 2\n"}
    for name, text in headers.items():
        (built.parent / name).write_text(text)
        os.utime(built.parent / name, (os.path.getmtime(built) - 50.0,) * 2)
    path = built.parent / compiled.SOURCES_RECORD
    record = json.loads(path.read_text())
    record["mod"]["includes"] = {name: compiled.file_sha256(str(built.parent / name)) for name in headers}
    path.write_text(json.dumps(record))
    for name in headers:
        _touch(built.parent / name)  # (same bytes, newer: not stale)
    assert compiled.stale_reason(_MODULE) == ""
    (built.parent / "sub" / "inc.h").write_text("#define Y 3\n")
    _touch(built.parent / "sub" / "inc.h", 0.0)
    assert compiled.stale_reason(_MODULE) == "edited since the build: sub/inc.h"
    (built.parent / "sub" / "inc.h").write_text(headers["sub/inc.h"])  # (reverted)
    assert compiled.stale_reason(_MODULE) == ""
    (built.parent / "mod_c.h").unlink()
    assert compiled.stale_reason(_MODULE) == "edited since the build: mod_c.h (removed)"


def _setup_names(*names: str) -> dict:
    """The named functions and constants of setup.py (with its os and re), without running it (it builds)."""
    import ast

    setup_py = os.path.join(REPO, "setup.py")
    tree = ast.parse(open(setup_py).read())
    body = [
        node
        for node in tree.body
        if (isinstance(node, ast.FunctionDef) and node.name in names)
        or (isinstance(node, ast.Assign) and any(getattr(t, "id", "") in names for t in node.targets))
        or (isinstance(node, ast.Import) and all(a.name in ("os", "re") for a in node.names))
    ]
    namespace: dict = {}
    exec(compile(ast.Module(body=body, type_ignores=[]), setup_py, "exec"), namespace)
    return namespace


def test_setup_finds_the_c_files_the_store_verify_module_includes(monkeypatch):
    """setup.py's `_c_files` (each extension's `depends`, recorded as its `includes`): the store's C helper and the
    vendored xxHash headers it includes, found from the .pyx's `cdef extern from`, and the dispatcher's C source."""
    c_files = _setup_names("_c_files", "_C_INCLUDE", "_CDEF_EXTERN", "_SOURCE_SUFFIXES")["_c_files"]
    monkeypatch.chdir(REPO)
    store = "dualpath_jax/store"
    found = c_files([f"{store}/_verify.pyx", f"{store}/_xxhash/xxh_x86dispatch.c"], [store])
    assert found == [f"{store}/{n}" for n in ("_verify_c.h", "_xxhash/xxh_x86dispatch.c", "_xxhash/xxh_x86dispatch.h", "_xxhash/xxhash.h")]  # fmt: skip
    assert c_files([f"{store}/_verify.pyx"], [store])[0] == f"{store}/_verify_c.h"  # (not x86: no dispatcher)
    assert c_files(["dualpath_jax/sim/network.py"], []) == []  # (pure-Python mode: no C of its own)


def test_a_config_refused_after_the_results_check_leaves_no_results_directory(tmp_path):
    """The results directory's write check moved before `driver.prepare` (which checks the model and the workload);
    a config that prepare refuses then left the directory it made, empty."""
    from test_fix12_runtime import _launch

    res = tmp_path / "a" / "res"
    out = _launch(
        "-m", "experiments.run", "--config=configs/tiny_runtime.py:test", f"--config.results_dir={res}",
        f"--config.runtime.model={tmp_path / 'no_model'}",
    )  # fmt: skip
    assert out.returncode != 0 and "bad config: config.runtime.model" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "a").exists()
