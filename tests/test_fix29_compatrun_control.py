"""A runtime node of other code than the driver (another install on another host) is refused by name: each node's
first report carries its code id (`dualpath_jax.code_id`), and the driver's control server compares it with its own."""

from __future__ import annotations

import pickle
import re

import pytest

import dualpath_jax
from dualpath_jax import code_id as code_id_mod
from dualpath_jax.runtime import control, driver
from dualpath_jax.runtime.control import ControlServer, DriverLost, GroupReply, GroupReport, SocketControlClient

KEY = b"fix29-compatrun-control"


def test_code_id_is_the_version_and_a_digest_of_the_sources(tmp_path):
    assert re.fullmatch(re.escape(dualpath_jax.__version__) + r"\+[0-9a-f]{12}", code_id_mod.code_id())
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "a.py").write_text("x = 1\n")
    (pkg / "sub" / "b.py").write_text("y = 2\n")
    (pkg / "notes.txt").write_text("not code\n")
    first = code_id_mod.sources_digest({"pkg": str(pkg)})
    (pkg / "notes.txt").write_text("edited, still not code\n")
    assert code_id_mod.sources_digest({"pkg": str(pkg)}) == first
    (pkg / "sub" / "b.py").write_text("y = 3\n")  # one byte of one source
    assert code_id_mod.sources_digest({"pkg": str(pkg)}) != first


@pytest.fixture
def server():
    said, seen = [], []

    def handler(report: GroupReport) -> GroupReply:
        seen.append(report.node_id)
        return GroupReply()

    srv = ControlServer(handler, KEY, on_error=said.append)
    srv.said, srv.seen = said, seen
    yield srv
    srv.close()


def _fetch(server, report: GroupReport):
    client = SocketControlClient(server.address, KEY)
    try:
        return client.fetch(report)
    finally:
        client.close()


def test_a_node_of_other_code_is_refused_naming_both_ids(server):
    ours = code_id_mod.code_id()
    assert _fetch(server, GroupReport(1, "prefill", [1])).shutdown is False  # (made here: this process's id)
    with pytest.raises(DriverLost, match=r"the driver refused this node: node 2 runs dualpath-jax 0\.0\.9\+0123"):
        _fetch(server, GroupReport(2, "decode", [2], code_id="0.0.9+0123456789ab"))
    assert server.seen == [1]  # (the refused node's report never reached the scheduler)
    assert len(server.said) == 1
    assert f"node 2 runs dualpath-jax 0.0.9+0123456789ab, the driver {ours}: install the same version" in server.said[0]


def test_a_driver_whose_own_id_predates_an_edit_takes_nodes_of_the_sources_now(monkeypatch):
    """A long-lived driver process (a test session, a notebook) computed its id before a source was edited; the nodes
    it starts now read the edited sources. Both ids are its own; a third is refused, naming both."""
    monkeypatch.setattr(control, "code_id", lambda: "0.1.0+aaaaaaaaaaaa")
    monkeypatch.setattr(control, "code_id_now", lambda: "0.1.0+bbbbbbbbbbbb")
    said = []
    srv = ControlServer(lambda r: GroupReply(), KEY, on_error=said.append)
    try:
        for node, cid in enumerate(("0.1.0+aaaaaaaaaaaa", "0.1.0+bbbbbbbbbbbb")):
            assert _fetch(srv, GroupReport(node, "prefill", [node], code_id=cid)).refused is None
        with pytest.raises(DriverLost, match=r"node 5 runs dualpath-jax 0\.1\.0\+cccccccccccc, the driver "):
            _fetch(srv, GroupReport(5, "decode", [5], code_id="0.1.0+cccccccccccc"))
    finally:
        srv.close()
    assert said and "the driver 0.1.0+aaaaaaaaaaaa (its sources now: 0.1.0+bbbbbbbbbbbb)" in said[0], said


class _OlderReport(GroupReport):
    """A report as a version before code ids pickles it: no `code_id` in its state."""

    def __reduce__(self):
        state = {k: v for k, v in vars(self).items() if k != "code_id"}
        return (_bare_report, (state,))


def _bare_report(state: dict) -> GroupReport:
    r = GroupReport.__new__(GroupReport)
    r.__dict__.update(state)
    return r


def test_a_node_of_an_older_version_without_a_code_id_is_refused(server):
    old = pickle.loads(pickle.dumps(_OlderReport(3, "prefill", [3])))
    assert type(old) is GroupReport and not hasattr(old, "code_id")
    with pytest.raises(DriverLost, match=r"node 3 runs an older dualpath-jax \(its reports carry no code id\)"):
        _fetch(server, _OlderReport(3, "prefill", [3]))
    assert server.seen == []


def test_local_launcher_refuses_nodes_of_other_code(base, ops, trajs, monkeypatch):
    """The local launcher's node processes are spawned: they compute their own (real) code id, while the driver's
    control server is given another one here, as a driver of another install would have."""
    from dualpath_jax.runtime.scheduler_service import RunFailed

    monkeypatch.setattr(control, "code_id", lambda: "0.0.0+driverdiffer")
    monkeypatch.setattr(control, "code_id_now", lambda: "0.0.0+driverdiffer")
    cfg = base.replace(
        **{"scheduler.name": "basic", "launcher": "local", "transport": "tcp", "cluster.precompile": False}
    )
    # (the node's id is not pinned to this process's: a tree edited meanwhile gives the nodes another, rightly)
    node_id = re.escape(dualpath_jax.__version__) + r"\+[0-9a-f]{12}"
    with pytest.raises(RunFailed, match=rf"node \d runs dualpath-jax {node_id}, the driver 0\.0\.0\+driverdiffer: "):
        driver.run(cfg, trajs, model_ops=ops)
