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
from test_runtime import assert_matches_reference

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
    new = {t.name for t in threading.enumerate()} - threads
    assert not new, f"threads started: {sorted(new)}"  # no node thread (named, should a late one show up)


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
    assert f"bad config: config.runtime.transport='rdma' cannot run on this host: {NO_RDMA}" in out.stderr
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


# ---- RDMA settings: config fields, argument checks, device checks (a stand-in for pyverbs) --------------------


def test_rdma_settings_are_config_fields_whose_defaults_are_the_endpoints_defaults():
    """`config.rdma` (device, port, gid_index, sl_high, sl_low) defaults to what the endpoint did before the fields
    existed: the first device, port 1, GID index 0, service level 0 for both classes."""
    import inspect

    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime.config import RdmaConfig, RuntimeConfig, rdma_endpoint_kwargs
    from transport.rdma import RdmaTransport

    cfg = RuntimeConfig.from_config_dict(get_config().runtime)
    assert cfg.rdma == RdmaConfig() == RuntimeConfig().rdma
    params = inspect.signature(RdmaTransport).parameters
    kwargs = rdma_endpoint_kwargs(cfg)
    assert kwargs == {k: params[k].default for k in kwargs}
    assert kwargs == {"device": None, "ib_port": 1, "gid_index": 0, "sl_high": 0, "sl_low": 0}


@pytest.mark.parametrize("transport", ["rdma", "tcp"])
@pytest.mark.parametrize(
    "field,value,match",
    [
        ("port", 0, "config.rdma.port must be in [1, 255], got 0"),
        ("port", 256, "config.rdma.port must be in [1, 255], got 256"),
        ("gid_index", -1, "config.rdma.gid_index must be in [0, 255], got -1"),
        ("sl_high", 16, "config.rdma.sl_high must be in [0, 15], got 16"),
        ("sl_low", -1, "config.rdma.sl_low must be in [0, 15], got -1"),
        ("sl_low", 1.5, "config.rdma.sl_low must be an integer, got 1.5"),
        ("device", 7, "config.rdma.device must be a string, got 7"),
    ],
)
def test_bad_rdma_fields_are_one_config_error_on_any_host(base, transport, field, value, match):  # noqa: F811
    """Types and ranges of `config.rdma` are checked by `validate` on every host (before pyverbs is looked for)."""
    from dualpath_jax.runtime.config import validate

    launcher = "inprocess" if transport == "tcp" else "local"
    cfg = base.replace(**{"transport": transport, "launcher": launcher, f"rdma.{field}": value})
    with pytest.raises(ConfigError, match=re.escape(match)):
        validate(cfg)


def test_run_command_with_a_bad_rdma_field_prints_one_line():
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "--config.runtime.transport=rdma", "--config.runtime.rdma.sl_low=16"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "bad config: config.runtime.rdma.sl_low must be in [0, 15], got 16" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "kwargs,arg,match",
    [
        ({"device": ""}, "device", "device must be a non-empty device name or None"),
        ({"device": b"mlx5_0"}, "device", "device must be a non-empty device name or None"),
        ({"ib_port": 0}, "ib_port", "ib_port must be in [1, 255], got 0"),
        ({"ib_port": 1.0}, "ib_port", "ib_port must be an integer, got 1.0"),
        ({"gid_index": -1}, "gid_index", "gid_index must be in [0, 255], got -1"),
        ({"sl_high": 16}, "sl_high", "sl_high must be in [0, 15], got 16"),
        ({"sl_low": True}, "sl_low", "sl_low must be an integer, got True"),
        ({"chunk_bytes": 0}, "chunk_bytes", "chunk_bytes must be in [1, 2147483647], got 0"),
        ({"max_send_wr": 0}, "max_send_wr", "max_send_wr must be >= 1, got 0"),
        ({"timeout_s": float("nan")}, "timeout_s", "timeout_s must be > 0 seconds and finite, got nan"),
        ({"timeout_s": float("inf")}, "timeout_s", "timeout_s must be > 0 seconds and finite, got inf"),
    ],
)
def test_rdma_endpoint_checks_its_arguments_before_it_needs_a_device(kwargs, arg, match):
    """Argument types and ranges are `RdmaConfigError`s naming the argument on any host, pyverbs or not (a
    chunk_bytes of 0 was a ZeroDivisionError at the first transfer, a service level of 16 a verbs error)."""
    from transport.rdma import RdmaConfigError, RdmaTransport

    with pytest.raises(RdmaConfigError, match=re.escape(match)) as e:
        RdmaTransport("x", **kwargs)
    assert e.value.arg == arg


def test_launchers_pass_the_rdma_fields_to_every_endpoint(base, monkeypatch):  # noqa: F811 (fixture)
    """The local and inprocess launchers' factory and the Ray actors' endpoint config carry `config.rdma`."""
    import transport as transport_pkg
    from dualpath_jax.runtime.launcher import _transport_factory, endpoint_spec

    made = []
    monkeypatch.setattr(transport_pkg, "make_transport", lambda spec, **kw: made.append((spec, kw)) or "ep")
    fields = {"rdma.device": "mlx5_1", "rdma.port": 2, "rdma.gid_index": 3, "rdma.sl_high": 5, "rdma.sl_low": 1}
    cfg = base.replace(transport="rdma", launcher="local", **fields)
    assert _transport_factory(cfg)("pe0", "pacer") == "ep"
    want = {"device": "mlx5_1", "ib_port": 2, "gid_index": 3, "sl_high": 5, "sl_low": 1}
    assert made == [({"backend": "rdma", "name": "pe0", **want}, {"pacer": "pacer"})]
    ray = endpoint_spec(cfg, "de1", host="10.0.0.2", secret="s")  # (what ray_launcher's actors pass)
    assert ray == {"backend": "rdma", "name": "de1", "host": "10.0.0.2", "secret": "s", **want}
    assert endpoint_spec(cfg.replace(transport="tcp"), "de1") == {"backend": "tcp", "name": "de1"}
    assert endpoint_spec(cfg.replace(**{"rdma.device": ""}), "x")["device"] is None  # "" = the first device


class _FakeVerbs:
    """Just enough of pyverbs (device list, Context.query_device/query_port/query_gid, enums) for the device checks:
    devices mlx5_0 and mlx5_1 with ports 1 (ACTIVE; GIDs at 0 and 3, 1 and 2 empty, table of 4) and 2 (DOWN)."""

    ZERO = "0000:0000:0000:0000:0000:0000:0000:0000"
    GIDS = ["fe80:0000:0000:0000:0202:c9ff:fe00:0001", ZERO, ZERO, "0000:0000:0000:0000:0000:ffff:0a00:0002"]

    def __init__(self):
        import types

        ns = types.SimpleNamespace
        gids = self.GIDS

        class Context:
            def __init__(self, name):
                self.name = name

            def query_device(self):
                return ns(phys_port_cnt=2)

            def query_port(self, port):
                return ns(state=4 if port == 1 else 1, gid_tbl_len=len(gids), active_mtu=5, lid=0)

            def query_gid(self, port, index):
                return ns(gid=gids[index])

            def close(self):
                pass

        self.root = types.ModuleType("pyverbs")
        self.device = types.ModuleType("pyverbs.device")
        self.device.Context = Context
        self.device.get_device_list = lambda: [ns(name=b"mlx5_0"), ns(name=b"mlx5_1")]
        self.enums = types.ModuleType("pyverbs.enums")
        self.enums.IBV_PORT_ACTIVE = 4
        self.root.device, self.root.enums = self.device, self.enums


@pytest.fixture
def fake_verbs(monkeypatch):
    fake = _FakeVerbs()
    for name, mod in (("pyverbs", fake.root), ("pyverbs.device", fake.device), ("pyverbs.enums", fake.enums)):
        monkeypatch.setitem(sys.modules, name, mod)
    return fake


@pytest.mark.parametrize(
    "kwargs,arg,match",
    [
        ({"device": "mlx9"}, "device", "no RDMA device 'mlx9'; this host has: mlx5_0, mlx5_1"),
        ({"ib_port": 3}, "ib_port", "device 'mlx5_0' has no port 3 (it has ports 1..2)"),
        ({"device": "mlx5_1", "ib_port": 2}, "ib_port", "port 2 of device 'mlx5_1' is not ACTIVE (state DOWN)"),
        (
            {"gid_index": 4},
            "gid_index",
            "gid_index 4 is past the GID table of 'mlx5_0' port 1 (4 entries; indices with a GID: 0, 3)",
        ),
        ({"gid_index": 1}, "gid_index", "GID 1 of 'mlx5_0' port 1 is empty (indices with a GID: 0, 3)"),
    ],
)
def test_device_checks_name_what_is_wrong_and_what_exists(fake_verbs, kwargs, arg, match):
    """On an RDMA host (here a stand-in for pyverbs): a device that does not exist lists those that do, a port the
    device lacks or that is not ACTIVE is named with its state, an empty or missing GID lists the usable indices."""
    from transport.rdma import RdmaConfigError, check_rdma_device, rdma_unavailable_reason

    assert rdma_unavailable_reason() is None
    with pytest.raises(RdmaConfigError, match=re.escape(match)) as e:
        check_rdma_device(**kwargs)
    assert e.value.arg == arg
    assert check_rdma_device() == "mlx5_0" and check_rdma_device("mlx5_1", 1, 3) == "mlx5_1"


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"rdma.device": "mlx9"}, "config.rdma.device='mlx9': no RDMA device 'mlx9'; this host has: mlx5_0, mlx5_1"),
        ({"rdma.port": 2}, "config.rdma.port=2: port 2 of device 'mlx5_0' is not ACTIVE (state DOWN)"),
        (
            {"rdma.gid_index": 2},
            "config.rdma.gid_index=2: GID 2 of 'mlx5_0' port 1 is empty (indices with a GID: 0, 3)",
        ),
    ],
)
def test_validate_checks_the_rdma_device_where_one_exists(base, fake_verbs, fields, match):  # noqa: F811
    from dualpath_jax.runtime.config import validate

    cfg = base.replace(transport="rdma", launcher="local", **fields)
    with pytest.raises(ConfigError, match=re.escape(match)):
        validate(cfg)
    validate(cfg.replace(**{"rdma.device": "mlx5_1", "rdma.port": 1, "rdma.gid_index": 3}))  # a usable setting


def test_validate_checks_the_locked_memory_limit_for_rdma_buffers(base, fake_verbs, monkeypatch):  # noqa: F811
    """RDMA registers (pins) the host buffers: a `ulimit -l` below what one process registers is named up front
    (ibv_reg_mr failed with ENOMEM in each node otherwise). Not checked for root (CAP_IPC_LOCK)."""
    import resource

    from dualpath_jax.runtime.config import validate

    real = resource.getrlimit  # (only the locked-memory limit: RLIMIT_AS is checked too, since 2026-12-07)
    monkeypatch.setattr(
        resource, "getrlimit", lambda what: (8 << 20, 8 << 20) if what == resource.RLIMIT_MEMLOCK else real(what)
    )
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cfg = base.replace(transport="rdma", launcher="inprocess")
    c = cfg.cluster
    pinned = c.prefill_nodes * cfg.buffers.pe_buffer_bytes + c.decode_nodes * cfg.buffers.de_buffer_bytes
    with pytest.raises(ConfigError, match=re.escape(f"register (pin) {pinned} B of host buffers per process")):
        validate(cfg)
    with pytest.raises(ConfigError, match="locked-memory limit is 8388608 B"):
        validate(cfg.replace(launcher="local"))  # one node's buffer per process
    validate(cfg.replace(**{"buffers.pe_buffer_bytes": 2 << 20, "buffers.de_buffer_bytes": 2 << 20}))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    validate(cfg)


def test_rdma_endpoint_on_a_non_loopback_address_needs_a_secret_before_it_opens_the_device():
    """The control channel's rule, checked before the device is opened (it was checked after the context, PD and
    CQ were made, and left them open)."""
    from transport.rdma import RdmaTransport

    with pytest.raises(ValueError, match="binding non-loopback address '10.1.2.3' requires a shared secret"):
        RdmaTransport("x", host="10.1.2.3")
