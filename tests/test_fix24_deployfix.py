"""Fix wave 24, from a deployment audit (Ray, netns, TCP authentication); each test failed on the commit before.

- Ray: a cluster with fewer CPUs than the config's nodes (a 2-core host: 2 Ray CPUs, 3 node actors of 1 CPU) kept an
  actor pending and the run waited out config.run_timeout_s (900 s) in silence; `RayLauncher.start` refuses it at
  once naming the shortfall and the fix (`placement_shortfall`). A multi-host run without `config.store_dir` (a
  temporary directory on the driver's host) is warned of.
- config: launcher 'local' / 'ray' with transport 'inproc' named only the launcher; it names the transport fix now.
  `config.netns` reported its launcher, transport and namespace misses one failed run at a time; now together.
  `_warn_pd_range` warned for the ratio against an unpaced link (a netns warm-up: s = 1e12 / 32e6).
- tcp: the server logged an authentication failure (a secret on one side only, or two different secrets) as
  "connection closed by peer"; it says "authentication failed" now, and the client suggests the secrets differ. A
  wildcard bind (0.0.0.0), whose `address` no remote peer can use, is warned of.
- netns_cluster.sh: `status` printed nothing when no cluster was up.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import time
from types import SimpleNamespace

import pytest

from dualpath_jax.runtime import config as rc
from dualpath_jax.runtime import netns
from dualpath_jax.runtime.config import ConfigError, validate
from dualpath_jax.runtime.ray_launcher import RayLauncher, is_driver_temp_store, placement_shortfall
from dualpath_jax.runtime.scheduler_service import RunFailed
from transport.base import TransportError
from transport.tcp import TcpTransport, is_wildcard

# ---- Ray: placement ------------------------------------------------------------------------------------------------


def test_placement_shortfall_names_the_cpus_and_the_fix():
    msg = placement_shortfall([{"CPU": 2.0}], 3, 1.0)
    assert "can place only 2 of the config's 3 node actors" in msg
    assert "its 1 host has 2" in msg and "`ray start --head --num-cpus=3`" in msg
    assert placement_shortfall([{"CPU": 3.0}], 3, 1.0) is None
    assert placement_shortfall([{"CPU": 3.0}], 30, 0.1) is None  # (3 / 0.1 is 29.999999999999996)
    assert placement_shortfall([{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}], 3, 1.0) is None
    msg = placement_shortfall([{"CPU": 1.5}, {"CPU": 1.5}], 3, 1.0)  # (3 CPUs in all, one actor per host)
    assert "place only 2 of" in msg and "its 2 hosts have 3" in msg and "on each, 3 in all" in msg
    assert placement_shortfall([], 3, 1.0).startswith("the Ray cluster can place only 0 of")


def test_placement_shortfall_of_the_node_resource():
    """RAY_NODE_RESOURCE: one unit per actor, on a host that also has its CPU."""
    msg = placement_shortfall([{"CPU": 4.0}], 3, 1.0, "dualpath_node")
    assert "place only 0 of" in msg and "each needs one 'dualpath_node' (RAY_NODE_RESOURCE)" in msg
    assert """`ray start --resources='{"dualpath_node": 1}'`""" in msg and "Ray CPU" not in msg
    hosts = [{"CPU": 1.0, "dualpath_node": 1.0}] * 3
    assert placement_shortfall(hosts, 3, 1.0, "dualpath_node") is None
    # enough of each in all, not on the same hosts
    msg = placement_shortfall([{"CPU": 0.0, "n": 2.0}, {"CPU": 4.0, "n": 1.0}], 3, 1.0, "n")
    assert "place only 1 of" in msg and "the hosts with 'n' have CPUs for 1 of them" in msg


def _launcher(base, nodes, store_dir):
    """A RayLauncher over a stand-in `ray` that knows only `nodes()` (no ray needed)."""
    launcher = object.__new__(RayLauncher)
    launcher.cfg, launcher.num_cpus = base.replace(store_dir=store_dir), 1.0
    launcher.ray = SimpleNamespace(nodes=lambda: nodes)
    return launcher


def _node(ip, cpus, alive=True):
    return {"NodeManagerAddress": ip, "Alive": alive, "Resources": {"CPU": cpus}}


def test_start_checks_the_cluster_before_anything_starts(base, caplog, tmp_path):
    # (a dead host's CPUs do not count)
    launcher = _launcher(base, [_node("10.0.0.1", 2.0), _node("10.0.0.2", 8.0, alive=False)], str(tmp_path))
    with pytest.raises(RunFailed, match=r"place only 2 of the config's 3 .*--num-cpus=3"):
        launcher._check_cluster(3, None)
    assert _launcher(base, [_node("10.0.0.1", 4.0)], "")._check_cluster(3, None) is False
    caplog.set_level(logging.WARNING, logger="dualpath_jax.runtime.ray_launcher")
    temp = tempfile.mkdtemp(prefix=f"dualpath_store_{os.getpid()}_")  # (as driver.run makes it)
    try:
        two = [_node("10.0.0.1", 2.0), _node("10.0.0.2", 2.0)]
        assert _launcher(base, two, str(tmp_path))._check_cluster(3, None) is True
        assert "store_dir" not in caplog.text  # (a directory given: taken as shared)
        assert _launcher(base, two, temp)._check_cluster(3, None) is True
        assert "the run spans 2 Ray hosts but config.store_dir is empty" in caplog.text
        assert "shared by every host" in caplog.text
    finally:
        os.rmdir(temp)
    assert is_driver_temp_store("") and not is_driver_temp_store(str(tmp_path))
    other = os.path.join(tempfile.gettempdir(), f"dualpath_store_{os.getpid() + 1}_x")  # (another run's)
    assert not is_driver_temp_store(other)


@pytest.mark.slow
def test_a_ray_cluster_with_too_few_cpus_is_refused_at_once(base, ops, trajs, monkeypatch):
    """Real Ray, a private 2-CPU instance, the :test config's 3 nodes: the run fails at once naming the fix (it
    waited out run_timeout_s); with RAY_NODE_RESOURCE that no host has, likewise."""
    ray = pytest.importorskip("ray", reason="ray is not installed (optional extra: pip install -e '.[ray]')")
    from dualpath_jax.runtime import driver

    cfg = base.replace(**{"launcher": "ray", "transport": "tcp", "run_timeout_s": 60.0})
    ray.init(address="local", num_cpus=2)
    try:
        t0 = time.monotonic()
        with pytest.raises(RunFailed, match=r"can place only 2 of the config's 3 .*`ray start --head --num-cpus=3`"):
            driver.run(cfg, trajs, model_ops=ops)
        assert time.monotonic() - t0 < 30
    finally:
        ray.shutdown()
    monkeypatch.setenv("RAY_NODE_RESOURCE", "fix24_node")
    ray.init(address="local", num_cpus=4)
    try:
        with pytest.raises(RunFailed, match=r"place only 0 of .*'fix24_node' \(RAY_NODE_RESOURCE\)"):
            driver.run(cfg, trajs, model_ops=ops)
    finally:
        ray.shutdown()


# ---- config --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("launcher, where", [("local", "one process per node"), ("ray", "one Ray actor per node")])
def test_inproc_with_a_multiprocess_launcher_names_the_transport_fix(base, launcher, where):
    with pytest.raises(ConfigError) as e:
        validate(base.replace(launcher=launcher, transport="inproc"))
    msg = str(e.value)
    assert f"config.launcher {launcher!r} runs the engines in separate processes ({where})" in msg
    assert msg.endswith("set --config.runtime.transport=tcp (or rdma)")


def test_netns_reports_every_miss_at_once(base):
    cfg = base.replace(netns=True)  # (launcher 'inprocess', transport 'inproc')
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "config.netns needs config.launcher='local' (node processes on this host), got 'inprocess'" in msg
    assert "config.netns needs config.transport='tcp' (its sockets cross the namespaces' veths), got 'inproc'" in msg
    reason = netns.unavailable_reason(cfg)  # (root, the namespaces, their CNIC rate: here, as the run sees them)
    if reason is not None:
        assert msg.endswith(f"config.netns cannot run here: {reason}")


@pytest.mark.parametrize("snic, cnic, warns", [(1e12, 32e6, False), (32e6, 1e12, False), (1e6, 1e6, True)])
def test_pd_range_is_not_judged_against_an_unpaced_link(base, caplog, monkeypatch, snic, cnic, warns):
    """An unpaced link (>= 1e11 B/s) on either side: no ratio to judge (a netns warm-up warned s=31250)."""
    monkeypatch.setattr(rc, "_WARNED", set())
    cfg = base.replace(**{"nics.snic_bytes_per_s": snic, "nics.cnic_bytes_per_s": cnic, "cluster.engines_per_node": 1})
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.config"):
        rc._warn_pd_range(cfg)
    assert ("bottleneck-free" in caplog.text) is warns


# ---- tcp -----------------------------------------------------------------------------------------------------------


def _logged(caplog, text, timeout=5.0):
    """Whether `text` is logged within `timeout` (the server logs from its handshake thread)."""
    end = time.monotonic() + timeout
    while text not in caplog.text and time.monotonic() < end:
        time.sleep(0.01)
    return text in caplog.text


@pytest.fixture
def closing():
    eps: list = []
    yield eps
    for ep in eps:
        ep.close()


def test_tcp_a_client_without_the_secret_is_logged_as_an_authentication_failure(closing, caplog):
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    srv = TcpTransport("srv24", secret="s3cret")
    anon = TcpTransport("anon24")
    closing += [srv, anon]
    with pytest.raises(TransportError, match="'srv24' requires a shared secret and 'anon24' has none"):
        anon.connect("srv24", srv.address, timeout=5)
    assert _logged(caplog, "authentication failed: 'srv24' requires a shared secret and 'anon24' has none")
    assert "closed by peer" not in caplog.text


def test_tcp_differing_secrets_are_named_on_both_sides(closing, caplog):
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    srv = TcpTransport("srv24b", secret="one")
    other = TcpTransport("other24", secret="two")
    closing += [srv, other]
    with pytest.raises(TransportError, match=r"failed to prove the shared secret .*secrets differ\?"):
        other.connect("srv24b", srv.address, timeout=5)
    assert _logged(caplog, "'other24' closed the connection during authentication (authentication failed: do the")
    assert "closed by peer" not in caplog.text and srv.peers() == []


def test_tcp_a_server_without_a_secret_logs_a_client_with_one(closing, caplog):
    caplog.set_level(logging.ERROR, logger="transport.tcp")
    srv = TcpTransport("open24")
    cli = TcpTransport("careful24", secret="s3cret")
    closing += [srv, cli]
    with pytest.raises(TransportError, match="'open24' does not authenticate"):
        cli.connect("open24", srv.address, timeout=5)
    assert _logged(caplog, "authentication failed: 'open24' does not authenticate (it has no shared secret)")
    assert srv.peers() == []


def test_tcp_a_wildcard_bind_is_warned_of(closing, caplog):
    caplog.set_level(logging.WARNING, logger="transport.tcp")
    assert is_wildcard("0.0.0.0") and is_wildcard("::") and is_wildcard("")
    assert not is_wildcard("127.0.0.1") and not is_wildcard("192.0.2.2") and not is_wildcard("example.org")
    closing.append(TcpTransport("loop24"))
    assert "wildcard" not in caplog.text
    wild = TcpTransport("wild24", host="0.0.0.0", secret="k")
    closing.append(wild)
    assert wild.address[0] == "0.0.0.0"
    assert "'wild24': bound to the wildcard address '0.0.0.0'" in caplog.text
    assert "a peer on another host must connect to one of this host's addresses" in caplog.text


# ---- netns_cluster.sh ----------------------------------------------------------------------------------------------


def test_netns_cluster_status_says_when_no_cluster_is_up(netns_host_lock):
    if not shutil.which("ip"):
        pytest.skip("needs iproute2 (ip)")
    up = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    up += subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    if "dpj-n" in up or "dpj-cbr" in up or "dpj-sbr" in up:  # (the script's `is_up`)
        pytest.skip("a netns cluster (or part of one) is up; not touching it")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        ["bash", os.path.join(root, "experiments", "netns_cluster.sh"), "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and out.stdout.startswith("no cluster up"), out
