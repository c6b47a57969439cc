"""The runtime over RDMA (`--config.runtime.transport=rdma`): the transport's real endpoints between node processes.

Where pyverbs or an RDMA device is missing (this machine), a run with transport 'rdma' is one `ConfigError` naming
the reason before anything starts, and the end-to-end runs skip with that reason. On a host with an RDMA NIC
(`pip install -e '.[rdma]'`) the end-to-end runs must reproduce the single-process reference token for token,
exactly like the TCP runs of tests/test_runtime.py (whose fixtures and check they reuse).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

# Fixtures (the test config, its model, trajectories and single-process reference) and the reference check.
from test_runtime import assert_matches_reference, base, ops, reference, trajs  # noqa: F401

from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import ConfigError
from transport import make_transport
from transport.rdma import rdma_unavailable_reason

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_RDMA = rdma_unavailable_reason()  # None on a host with pyverbs and an RDMA device
needs_rdma = pytest.mark.skipif(NO_RDMA is not None, reason=f"rdma: {NO_RDMA}")
without_rdma = pytest.mark.skipif(NO_RDMA is None, reason="this host has pyverbs and an RDMA device")


@without_rdma
@pytest.mark.parametrize("launcher", ["local", "inprocess"])
def test_rdma_without_a_device_is_one_config_error_before_anything_starts(base, trajs, launcher):  # noqa: F811 (fixtures)
    """No pyverbs / no device: the run fails in validation with the reason, at once, and starts no node."""
    cfg = base.replace(transport="rdma", launcher=launcher)
    threads = {t.name for t in threading.enumerate()}
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=re.escape(f"config.transport='rdma' cannot run on this host: {NO_RDMA}")):
        driver.run(cfg, trajs)
    assert time.monotonic() - t0 < 10.0
    assert multiprocessing.active_children() == []  # no node process
    assert {t.name for t in threading.enumerate()} <= threads  # no node thread


@without_rdma
def test_run_command_with_rdma_and_no_device_prints_one_line():
    """The researcher's command on a host without RDMA: one `bad config` line naming the reason, no traceback."""
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--config.runtime.transport=rdma"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert f"bad config: config.transport='rdma' cannot run on this host: {NO_RDMA}" in out.stderr
    assert "Traceback" not in out.stderr and "turn/s" not in out.stderr  # nothing ran


def test_importing_and_validating_the_runtime_never_imports_pyverbs(tmp_path):
    """pyverbs is imported only when an rdma endpoint is built or transport 'rdma' is validated (a `pyverbs`
    package that records its import stands on sys.path in a fresh interpreter)."""
    trip = tmp_path / "pyverbs"
    trip.mkdir()
    (trip / "__init__.py").write_text("import os\nopen(os.environ['PYVERBS_TRIPWIRE'], 'w').close()\n")
    marker = tmp_path / "imported"
    code = (
        "import dualpath_jax.runtime.config, dualpath_jax.runtime.driver, dualpath_jax.runtime.launcher\n"
        "import dualpath_jax.runtime.node, dualpath_jax.runtime.ray_launcher, transport\n"
        "from configs.tiny_runtime import get_config\n"
        "from dualpath_jax.runtime.config import RuntimeConfig, validate\n"
        "cfg = RuntimeConfig.from_config_dict(get_config('test').runtime)\n"
        "for t, launcher in (('tcp', 'local'), ('tcp', 'inprocess'), ('inproc', 'inprocess')):\n"
        "    validate(cfg.replace(transport=t, launcher=launcher))\n"
        "import sys\n"
        "assert 'pyverbs' not in sys.modules\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), REPO]), "PYVERBS_TRIPWIRE": str(marker)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not marker.exists()


def _connect(src, dst, errors: list) -> None:
    """What an engine does on its first transfer to a peer (`engines.Engine._peer`)."""
    try:
        src.connect(dst.name, dst.address)
    except Exception as e:  # noqa: BLE001 -- the other side's connect may have won
        if dst.name not in src.peers():
            errors.append(e)


@pytest.mark.parametrize("backend", ["tcp", pytest.param("rdma", marks=needs_rdma)])
def test_two_endpoints_connecting_to_each_other_at_once(backend):
    """Engines connect lazily on their first transfer, so a PE and a DE may connect to each other at the same time;
    both directions must then work (rdma: each side's connect makes its own queue pairs)."""
    for _ in range(5):
        a = make_transport({"backend": backend, "name": "pe0"})
        b = make_transport({"backend": backend, "name": "de1"})
        try:
            bufs = {}
            for t, fill in ((a, 1), (b, 2)):
                bufs[t.name] = np.full(1 << 16, fill, np.uint8)
                t.register("kv", bufs[t.name])
            errors: list[BaseException] = []
            threads = [threading.Thread(target=_connect, args=(*p, errors)) for p in ((a, b), (b, a))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert not errors
            a.wait_for_peer(b.name, timeout=10)
            b.wait_for_peer(a.name, timeout=10)
            fa = a.write(b.name, "kv", 8000, "kv", 100, 1000, notify=7)  # (sources outside both destinations)
            fb = b.write(a.name, "kv", 8000, "kv", 200, 2000, notify=8)
            assert fa.result(10) == 1000 and fb.result(10) == 2000
            assert b.wait_notification(tag=7, timeout=10).length == 1000
            assert a.wait_notification(tag=8, timeout=10).length == 2000
            assert (bufs["de1"][100:1100] == 1).all() and (bufs["pe0"][200:2200] == 2).all()
            assert bufs["de1"][1100] == 2 and bufs["pe0"][2200] == 1  # nothing past the writes
        finally:
            a.close()
            b.close()


@needs_rdma
@pytest.mark.parametrize("launcher", ["local", "inprocess"])
def test_rdma_runs_match_reference(base, ops, trajs, reference, launcher):  # noqa: F811 (fixtures)
    """Node processes (and threads of one process, over the NIC's loopback) moving KV over RDMA reproduce the
    single-process reference, with both read paths, every turn exactly once, read bytes equal to hit bytes."""
    cfg = base.replace(**{"scheduler.name": "dualpath", "launcher": launcher, "transport": "rdma"})
    res = driver.run(cfg, trajs, model_ops=ops)
    assert_matches_reference(res, reference, trajs)
    hit_bytes = sum(r.hit_tokens for r in res.records) * ops.config.kv_bytes_per_token
    assert res.summary["pe_read_bytes"] + res.summary["de_read_bytes"] == hit_bytes
    assert any(s.link.startswith("cnic/") and s.nbytes for s in res.links)  # KV crossed the compute NICs
