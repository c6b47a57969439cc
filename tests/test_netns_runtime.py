"""`config.netns`: the runtime's node processes in the kernel-shaped namespaces of experiments/netns_cluster.sh.

The checks of the config and the parts (control channel over a Unix socket, the recording pacer) run everywhere; the
run itself needs root, iproute2, tc and a kernel that makes network namespaces (skips otherwise, and when a cluster
of the script is already up: the test makes its own and takes it down).
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from test_netns_cluster import _run, _skip_reason

from dualpath_jax.runtime import driver, netns
from dualpath_jax.runtime.config import ConfigError, validate
from dualpath_jax.runtime.control import ControlServer, GroupReply, GroupReport, SocketControlClient
from dualpath_jax.runtime.launcher import LocalCluster
from dualpath_jax.traffic import Link, Pacer, RecordingPacer

CNIC_BYTES_PER_S = 32e6  # 256 Mbit/s: the cluster's CNIC rate, and the config's
NODES = 3  # the :test config's 1 PE node + 2 DE nodes


# ---- everywhere: the config, the control channel, the pacer ----------------------------------------------------------


def test_netns_needs_the_local_launcher_and_tcp(base):
    with pytest.raises(ConfigError, match=r"config.netns needs config.launcher='local'.*got 'inprocess'"):
        validate(base.replace(netns=True, transport="tcp"))
    with pytest.raises(ConfigError, match=r"config.netns needs config.transport='tcp'.*got 'inproc'"):
        validate(base.replace(netns=True, launcher="local"))


def test_netns_without_root_says_so(base, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    cfg = base.replace(netns=True, launcher="local", transport="tcp")
    with pytest.raises(ConfigError, match=r"config.netns cannot run here: joining a network namespace needs root"):
        validate(cfg)


def test_up_command_matches_the_config(base):
    cfg = base.replace(**{"nics.cnic_bytes_per_s": CNIC_BYTES_PER_S, "nics.snic_bytes_per_s": 4e6})
    assert netns.up_command(cfg) == "experiments/netns_cluster.sh up 3 1 32 256"
    assert netns.endpoint_hosts(2, [5, 6]) == {5: "10.77.2.1", 6: "10.77.2.2"}


def test_control_server_on_a_unix_socket(tmp_path):
    """The driver's control channel for nodes in other namespaces: a Unix socket path (their 127.0.0.1 is not ours).
    A fetch goes round, and `close` ends the accept thread and removes the socket file."""
    path = str(tmp_path / "control")
    server = ControlServer(lambda report: GroupReply(shutdown=report.node_id == 7), b"k" * 16, unix_path=path)
    try:
        assert server.address == path and os.path.exists(path)
        client = SocketControlClient(path, b"k" * 16)
        try:
            assert client.fetch(GroupReport(node_id=7, role="decode", engine_ids=[1])).shutdown
        finally:
            client.close()
    finally:
        server.close()
    assert not server._accept.is_alive()
    assert not os.path.exists(path)


def test_recording_pacer_records_each_class_and_paces_nothing():
    """A kernel-shaped path's bytes are recorded on the CNIC link in their class, without taking its slots (the
    link's timeline does not move: the engine's own paced copies on that link are not delayed by them)."""
    link = Link("cnic/engine0", 1e6, weights={"high": 0.99, "low": 0.01}, per_class_names=True)
    rec = RecordingPacer(Pacer([link]))
    busy_until = link._busy_until
    rec.pace(1_000_000, "low")
    assert list(rec.paced(300, "high")) == [300]
    assert link.bytes_by_class == {"low": 1_000_000, "high": 300}
    assert {s.link for s in link.samples()} == {"cnic/engine0/low", "cnic/engine0/high"}
    with pytest.raises(ValueError, match="unknown priority 'hihg'"):
        rec.pace(1, "hihg")
    assert link._busy_until == busy_until and not any(link._queues.values())


def test_a_session_started_without_netns_refuses_a_netns_run(base):
    cfg = base.replace(netns=True, launcher="local", transport="tcp")
    with pytest.raises(ValueError, match=r"config.netns=True but the LocalCluster session's processes were started"):
        LocalCluster([], netns=False).launcher(cfg)


# ---- root: a real run in the namespaces ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(netns_host_lock_module):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    up = _run("up", str(NODES), "1", "8", str(int(CNIC_BYTES_PER_S * 8 / 1e6)))
    try:
        assert up.returncode == 0, up.stderr
        yield
    finally:
        down = _run("down")
        assert down.returncode == 0, down.stderr


def _low_class_bytes(node: int) -> int:
    """Bytes the kernel sent in the low (CS1, KV) class out of node's cnic0."""
    out = subprocess.run(
        ["tc", "-n", netns.namespace(node), "-s", "class", "show", "dev", "cnic0"], capture_output=True, text=True
    ).stdout
    m = re.search(r"class htb 1:20 .*?\n\s*Sent (\d+) bytes", out)
    assert m, out
    return int(m.group(1))


def test_netns_names_a_mismatched_rate_and_missing_engines(base, cluster):
    cfg = base.replace(netns=True, launcher="local", transport="tcp")
    with pytest.raises(ConfigError, match=r"cnic0 of namespace dpj-n0 is shaped to 256 Mbit/s, but .*=1e\+09 is 8000"):
        validate(cfg)
    cfg = cfg.replace(**{"nics.cnic_bytes_per_s": CNIC_BYTES_PER_S})
    validate(cfg)
    with pytest.raises(ConfigError, match=r"namespace dpj-n0 has no cnic1 with address 10.77.0.2"):
        validate(cfg.replace(**{"cluster.engines_per_node": 2}))
    with pytest.raises(ConfigError, match=r"no network namespace dpj-n3, dpj-n4 .*netns_cluster.sh up 5 1"):
        validate(cfg.replace(**{"cluster.decode_nodes": 4}))


def test_a_run_in_the_namespaces_moves_kv_over_the_shaped_veths(base, ops, reference_for, cluster):
    """The `:test` workload with round-robin reading every hit on the DE side (then DE -> PE over the compute
    network; the prompt's KV goes PE -> DE after prefill): the reference tokens; every engine's transfers recorded
    on its CNIC link (not paced there), and the KV through the shaped CNICs' low class: the DEs sent at least the
    bytes they read from storage for the PE (payload; the kernel adds headers), the PE sent the prompts' KV."""
    from test_runtime import assert_matches_reference

    cfg = base.replace(
        **{
            "netns": True,
            "launcher": "local",
            "transport": "tcp",
            "nics.cnic_bytes_per_s": CNIC_BYTES_PER_S,
            "scheduler.name": "round_robin",
            "scheduler.policy_kwargs": {"read_side": "de"},
            "workload.agents": 2,
            "run_timeout_s": 300.0,
        }
    )
    trajs = driver.make_trajectories(cfg)
    before = [_low_class_bytes(n) for n in range(NODES)]
    res = driver.run(cfg, trajs)
    sent = [_low_class_bytes(n) - before[n] for n in range(NODES)]
    assert_matches_reference(res, reference_for(cfg, ops, trajs), trajs)
    recorded = {}
    for s in res.links:
        m = re.fullmatch(r"cnic/engine(\d+)/low", s.link)
        if m:
            recorded[int(m.group(1))] = recorded.get(int(m.group(1)), 0) + s.nbytes
    assert res.summary["de_read_bytes"] > 0
    assert sent[1] + sent[2] >= res.summary["de_read_bytes"], (sent, res.summary["de_read_bytes"])
    assert sent[0] > 0, sent
    for node in range(NODES):  # (engine e is node e's only engine; its own D2H copies are recorded there too)
        assert recorded.get(node, 0) > 0, (node, recorded)
