"""Fixtures shared by the runtime tests (tests/test_runtime.py, tests/test_runtime_cnic.py): the small `:test`
runtime config, its model ops, trajectories and the single-process reference tokens (session-scoped: built once
per pytest process); and by the KV store tests (tests/test_kv_store*.py): `rm`, the store options of each read
method."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import signal
import tempfile

import pytest
from hypothesis import settings

from configs.tiny_runtime import get_config
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import RuntimeConfig
from dualpath_jax.runtime.model_ops import ModelOps, is_checkpoint

# Property tests (hypothesis) draw the same examples every run, so a CI run is reproducible and a green run stays
# green; `HYPOTHESIS_PROFILE=explore pytest ...` draws fresh examples (and keeps failures in .hypothesis/).
settings.register_profile("deterministic", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "deterministic"))

# A pytest started with SIGINT ignored (a background job of a non-interactive shell, `pytest ... &`, as a CI script
# may start it) handed the ignore to every process the tests start (exec keeps SIG_IGN, and Python then installs no
# KeyboardInterrupt): the tests that send a real SIGINT saw it ignored (`experiments.run` SIGINTed in its warm-up
# ran on to its end and wrote its results: 5 of 6 tries in a backgrounded loop). The tests' processes start with
# SIGINT's default action, as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# JAX's persistent compilation cache in the tests' own processes too, the launchers' (models/jax_cache.py:
# $DUALPATH_JAX_CACHE, else ~/.cache/dualpath_jax/xla; their node processes use it already): the tiny models' steps
# compile once per host and jax version instead of in every run. Measured side by side (session 49, -n 2,
# tests/test_invariant.py + test_models.py): 226 s without, 235 s with an empty cache, 86 s with the cache of a run
# before. The same executables either way (jax's key holds the program, the compile options and the versions).
# `DUALPATH_JAX_TESTS_XLA_CACHE=off` runs the tests without it, `=<dir>` with a directory of their own.
_TESTS_CACHE = os.environ.get("DUALPATH_JAX_TESTS_XLA_CACHE", "")
if _TESTS_CACHE != "off":
    from models.jax_cache import enable_persistent_compilation_cache

    enable_persistent_compilation_cache(_TESTS_CACHE or None)


# A tiny model's ops (weights and jitted steps), built once per pytest process for each (model, seed, numerics,
# dtype, device): every `ModelOps.of_config` of the tests and of the in-process launcher's runs (`model_ops=None`)
# shares them, as one node process's engines do, instead of compiling the same steps again in each test (~3 s each).
# Checkpoint directories are read each time (a test may rewrite one at the same path).
_OPS: dict[tuple, ModelOps] = {}
_of_config = ModelOps.of_config.__func__


def _shared_of_config(cls, cfg, device=None):
    if cls is not ModelOps or is_checkpoint(cfg.model):
        return _of_config(cls, cfg, device)
    key = (cfg.model, cfg.model_seed, cfg.batch_invariant, cfg.dtype, device)
    if key not in _OPS:
        _OPS[key] = _of_config(cls, cfg, device)
    return _OPS[key]


ModelOps.of_config = classmethod(_shared_of_config)


# experiments/netns_cluster.sh's namespaces (dpj-*) are one set per host: the tests that bring a cluster up or look for
# one hold this lock, so that pytest-xdist's workers (setup.cfg: `-n 2`) and concurrent pytest runs take turns instead
# of tearing down each other's cluster or skipping on seeing it up. Re-entrant within a process (flock is per open
# file: a second open in the same process would wait for itself).
_netns_held = 0


@contextlib.contextmanager
def _netns_host_lock():
    global _netns_held
    if _netns_held:
        _netns_held += 1
        try:
            yield
        finally:
            _netns_held -= 1
        return
    from dualpath_jax import flocks

    # (root's test run made it 0644: another user's open for appending was a PermissionError in every netns test)
    fd = flocks.open_lock_file(os.path.join(tempfile.gettempdir(), "dualpath_jax_tests_netns.lock"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # (released when the file closes)
        _netns_held = 1
        try:
            yield
        finally:
            _netns_held = 0
    finally:
        os.close(fd)


@pytest.fixture
def netns_host_lock():
    with _netns_host_lock():
        yield


@pytest.fixture(scope="module")
def netns_host_lock_module():
    with _netns_host_lock():
        yield


# A test that changes absl's logger level (a launcher's flags parsed in-process: --verbosity, or absl's default taken
# as they parse) left it for the tests after it in its worker process, whose caplog.at_level(INFO) then caught
# nothing (it sets the root logger's level, not absl's): each test gets the level it found back.
@pytest.fixture(autouse=True)
def _absl_log_level_restored():
    import logging

    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    yield
    absl_logger.setLevel(level)


# The `:test` runtime config and what derives from it: one per pytest process (read-only in every test).
@pytest.fixture(scope="session")
def base() -> RuntimeConfig:
    return RuntimeConfig.from_config_dict(get_config("test").runtime)


@pytest.fixture(scope="session")
def ops(base) -> ModelOps:
    return ModelOps.of_config(base)


@pytest.fixture(scope="session")
def trajs(base):
    return driver.make_trajectories(base)


_REFERENCES: dict[tuple, tuple] = {}


def reference_of(cfg, ops: ModelOps, trajs) -> dict:
    """The single-process reference tokens of `cfg`'s conversations (decode batch shaped as its DEs'); computed once
    per (ops, trajectories, workload seed, max_seq_len, decode slots) in a pytest process (a new dict each call)."""
    key = (id(ops), id(trajs), cfg.workload.seed, cfg.cluster.max_seq_len, cfg.cluster.decode_slots)
    if key not in _REFERENCES:  # (ops and trajs kept with it: their ids stay theirs)
        ref = driver.reference_tokens(cfg, trajs, ops)
        _REFERENCES[key] = (ops, trajs, ref)
    return dict(_REFERENCES[key][2])


@pytest.fixture(scope="session")
def reference_for():
    """`reference_of` for tests that build their own config."""
    return reference_of


@pytest.fixture(scope="session")
def reference(base, ops, trajs) -> dict:
    return reference_of(base, ops, trajs)


def corrupt_every_block_once(store_dir, after_turns: int):
    """A `driver.run` fault: once `after_turns` turns are done, flip one byte near the end of every stored block
    (its checksum fails on the next read). Returns (fault, the paths it corrupted)."""
    corrupted: list[str] = []

    def fault(service, launcher):
        done, _ = service.progress()
        if done >= after_turns and not corrupted:
            for path in glob.glob(os.path.join(str(store_dir), "blocks", "*", "*.kvb")):
                with open(path, "r+b") as f:
                    f.seek(-7, os.SEEK_END)
                    b = f.read(1)
                    f.seek(-7, os.SEEK_END)
                    f.write(bytes([b[0] ^ 0xFF]))
                corrupted.append(path)

    return fault, corrupted


@pytest.fixture(scope="session")
def block_corrupter():
    """`corrupt_every_block_once` for the tests."""
    return corrupt_every_block_once


# The KV store's read methods: "mmap" with every verified read mapped from the first read of a file on (by default
# only reads of >= 256 KiB are, from the second read of an open file on) and "preadv"; each with the compiled
# verified-read loops (store/_verify.pyx, where built) and with the Python loops ("-py").
_STORE_MMAP_ALL = {"read_method": "mmap", "mmap_min_bytes": 0, "mmap_after_reads": 0}
_STORE_READ_METHODS = {
    "mmap": _STORE_MMAP_ALL,
    "preadv": {"read_method": "preadv"},
    "mmap-py": {**_STORE_MMAP_ALL, "native_verify": False},
    "preadv-py": {"read_method": "preadv", "native_verify": False},
}


@pytest.fixture(params=sorted(_STORE_READ_METHODS))
def rm(request):
    """Store options of one read method."""
    return dict(_STORE_READ_METHODS[request.param])
