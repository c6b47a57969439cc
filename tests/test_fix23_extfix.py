"""Fix wave 23, "extend" audit (/work/notes/fix23_extend_report.md): what a researcher extending the framework from the
README met. Each test failed on the code before its fix (checked on a copy with the fix taken out)."""

from __future__ import annotations

import dataclasses
import logging
import os
import types

import pytest

import schedulers
from dualpath_jax.host_buffers import HostBufferPool
from dualpath_jax.runtime import engines
from schedulers import POLICIES, Assignment
from transport import TRANSPORTS
from transport.base import PeerLostError, Transport
from transport.inproc import InProcFabric, InProcTransport

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "sim_tiny.py")


# ---- 3. a transport backend's own bug is not a dead node ------------------------------------------------------------


class _BuggyTransport(InProcTransport):
    """inproc, but `write` / `send` raise what `bug` says (a backend's own bug, or a lost peer)."""

    bug: BaseException | None = None

    def write(self, *a, **k):
        if self.bug is not None:
            raise self.bug
        return super().write(*a, **k)

    def send(self, *a, **k):
        if self.bug is not None:
            raise self.bug
        return super().send(*a, **k)


def _engine(cls, engine_id: int, transport, events: list, **kw):
    """A real engine over a real endpoint; model, store and SNIC are stand-ins (tests/test_runtime_hunt7.py)."""
    cfg = types.SimpleNamespace(
        block_size=4, transport="bugfab", cluster=types.SimpleNamespace(decode_slots=2, max_seq_len=64)
    )
    model = types.SimpleNamespace(
        kv_layout=types.SimpleNamespace(bytes_per_token_per_layer=8, num_layers=2), new_decode_batch=lambda *a: None
    )
    ctx = types.SimpleNamespace(cfg=cfg, model=model, emit=events.append)
    pool = HostBufferPool(slot_nbytes=64, budget_bytes=1024, prefault=False)
    return cls(engine_id, 0, ctx, transport, pool, None, **kw)


@pytest.fixture
def buggy():
    fabric = InProcFabric()
    bug, peer = _BuggyTransport("engine0", fabric=fabric), InProcTransport("engine1", fabric=fabric)
    yield bug, peer
    bug.close()
    peer.close()


def _kinds(events: list) -> list[str]:
    return [ev.kind for ev in events]


def test_a_transport_bug_fails_the_run_naming_the_backend_not_the_peer(buggy):
    """A backend whose `write` raised RuntimeError (its own bug) was reported as a lost peer: the scheduler declared
    the peer's node dead ("node 1: engine 0 (node 0) could not reach it: RuntimeError('my transport bug')"), with no
    traceback and no word of the backend. Contract: an "error" event (the run fails) naming the backend, the exception
    and the file:line it was raised at; no `peer_lost`; once per engine."""
    bug, peer = buggy
    events: list = []
    pe = _engine(engines.PrefillEngine, 0, bug, events, batcher=None)
    pe.directory = {1: (1, peer.address)}
    bug.bug = RuntimeError("my transport bug")
    f = pe.write_to(1, 0, 0, 8)
    assert isinstance(f.exception(timeout=5), RuntimeError)
    assert _kinds(events) == ["error"]
    msg = events[0].data["message"]
    assert msg.startswith("pe 0: transport 'bugfab' raised RuntimeError('my transport bug') in write() at "), msg
    assert f"{__file__}:" in msg and "(write)" in msg
    bug.bug = TypeError("another bug")
    pe.send_msg(1, {"kind": "x", "request_id": 7, "attempt": 0})  # (the run is failing already: said once)
    assert _kinds(events) == ["error"]


def test_a_lost_peer_is_still_a_lost_peer(buggy):
    """What the transports raise for a dead peer or a failed link (TransportError, OSError, a timeout, a peer declared
    dead) is reported as before: `peer_lost`, the scheduler then declares the peer's node dead."""
    bug, peer = buggy
    for lost in (PeerLostError("gone"), ConnectionResetError("reset"), TimeoutError("slow")):
        events: list = []
        pe = _engine(engines.PrefillEngine, 0, bug, events, batcher=None)
        pe.directory = {1: (1, peer.address)}
        bug.bug = lost
        assert pe.write_to(1, 0, 0, 8).exception(timeout=5) is lost and events == []
        pe.send_msg(1, {"kind": "x", "request_id": 7, "attempt": 0})
        assert _kinds(events) == ["peer_lost"] and events[0].data["error"] == repr(lost)
        pe.transport.deregister(engines.REGION)
    events = []
    pe = _engine(engines.PrefillEngine, 0, bug, events, batcher=None)
    pe.send_msg(3, {"kind": "x", "request_id": 7, "attempt": 0})  # engine 3: not in the directory (declared dead)
    assert _kinds(events) == ["peer_lost"] and "not in the directory" in events[0].data["error"]


def test_a_failed_write_future_of_a_bug_is_not_a_lost_peer(buggy):
    """The same for a write whose future failed later (the DE forwarding its read KV to the PE)."""
    import concurrent.futures

    bug, _ = buggy
    task = types.SimpleNamespace(prefill_engine=0, request_id=7, attempt=0)
    for error, kinds in ((RuntimeError("bug in a copy thread"), ["error"]), (PeerLostError("gone"), ["peer_lost"])):
        events: list = []
        de = _engine(engines.DecodeEngine, 1, bug, events)
        r = types.SimpleNamespace(cancelled=False, forward_lost=False, task=task, key=(7, 0))
        f = concurrent.futures.Future()
        f.set_exception(error)
        de._forward_failed(f, r)
        assert _kinds(events) == kinds
        if kinds == ["error"]:
            assert (
                "transport 'bugfab' raised RuntimeError('bug in a copy thread') in write()" in events[0].data["message"]
            )
        bug.deregister(engines.REGION)


# ---- 6. an unknown policy's error says how one's own gets registered ----------------------------------------------

HINT = "a policy of one's own: register it in a module that your --config file imports"


def test_an_unknown_policy_says_how_to_register_ones_own():
    """`--config.policies=shortq,dualpath` (shortq registered in a module no one imported) said only "unknown
    inter-engine policy 'shortq'; known: ...", the simulator "is neither a mode (...) nor a registered policy (...)"."""
    from dualpath_jax.runtime.config import ConfigError, check_policy_run, parse_policy_list
    from dualpath_jax.sim.config import sim_config_from_dict
    from dualpath_jax.sim.configs_io import load_config

    with pytest.raises(ConfigError, match=r"--config.policies: unknown inter-engine policy 'shortq'; known: .*") as e:
        check_policy_run(parse_policy_list("shortq,dualpath")[0], {}, 16)
    assert HINT in str(e.value) and 'README "A policy of one\'s own"' in str(e.value)
    d = load_config(TINY).to_dict()
    d["scheduler"]["name"] = "shortq"
    with pytest.raises(ValueError, match=r"config.scheduler.name 'shortq' is neither a mode .* nor a registered") as e:
        sim_config_from_dict(d)
    assert HINT in str(e.value)


# ---- 7. an Assignment's read fraction follows its read side -------------------------------------------------------


def test_an_assignment_fraction_left_out_follows_the_read_side():
    """`Assignment(rid, pe, de, "de")` raised "read_side 'de' needs de_read_fraction 1.0, got 0.0"."""
    assert Assignment(1, 0, 2, "de").de_read_fraction == 1.0
    assert Assignment(1, 0, 2, "pe").de_read_fraction == 0.0
    assert Assignment(1, 0, 2, "de") == Assignment(1, 0, 2, "de", 1.0)
    assert type(Assignment(1, 0, 2, "de").de_read_fraction) is float
    with pytest.raises(TypeError, match=r"de_read_fraction must be a number in \[0, 1\], got None .*'split' needs it"):
        Assignment(1, 0, 2, "split")
    with pytest.raises(ValueError, match=r"read_side 'de' needs de_read_fraction 1.0, got 0.0"):
        Assignment(1, 0, 2, "de", 0.0)  # (given: still checked)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Assignment(1, 0, 2, "de").de_read_fraction = 0.5


# ---- 12. a transport class's `backend` is the name it is registered under -----------------------------------------


def test_registration_names_a_transports_backend(monkeypatch):
    """A backend class that forgot `backend = "NAME"` (the README asks for it beside the registration) ran as its
    parent's: `ep.backend == 'inproc'`. Contract: registration sets it; a class that sets another name is refused."""
    monkeypatch.setattr(TRANSPORTS, "_entries", dict(TRANSPORTS._entries))  # (registered for this test only)

    @TRANSPORTS.register("fix23_forgot")
    class Forgot(InProcTransport):
        pass

    assert Forgot.backend == "fix23_forgot" and InProcTransport.backend == "inproc"

    class Wrong(InProcTransport):
        backend = "fix23_other"

    with pytest.raises(ValueError, match=r"transport 'fix23_wrong': Wrong sets backend = 'fix23_other', not the name"):
        TRANSPORTS.add("fix23_wrong", Wrong)
    assert "fix23_wrong" not in TRANSPORTS and Wrong.backend == "fix23_other"

    class Right(Transport):
        backend = "fix23_right"

    TRANSPORTS.add("fix23_right", Right)
    assert TRANSPORTS.get("fix23_right") is Right


# ---- 2. the store contract names the error of an unpin of a key not pinned -----------------------------------------


def test_the_unpin_contract_says_a_key_not_pinned_is_a_value_error(tmp_path):
    """The conformance suite requires `unpin` of a key not pinned to raise ValueError ("not pinned"); `KVStore.unpin`
    said only "Undo one `pin` of each key" (a store written from it failed the suite)."""
    from dualpath_jax.kv_layout import BlockLayout
    from dualpath_jax.kv_store import LocalDirStore
    from dualpath_jax.store.api import KVStore

    doc = " ".join(KVStore.unpin.__doc__.split())
    assert 'raises `ValueError` ("... not pinned") and changes nothing' in doc
    s = LocalDirStore(tmp_path / "kv", BlockLayout(2, 4, 8, "m"))
    try:
        a, b = b"a" * 16, b"b" * 16
        s.pin([a])
        with pytest.raises(ValueError, match="not pinned"):
            s.unpin([a, b])
        s.unpin([a])  # (still pinned: the failed call changed nothing)
        with pytest.raises(ValueError, match="not pinned"):
            s.unpin([a])
    finally:
        s.close()


# ---- 10. the hardware warning: a given value is not "its default", and once per sweep cell --------------------------


@pytest.fixture
def gpu25(monkeypatch):
    """A hardware profile with 25 GB/s NICs (the defaults: 50), registered for one test."""
    from schedulers.hardware import HARDWARE

    monkeypatch.setattr(HARDWARE, "_entries", dict(HARDWARE._entries))
    HARDWARE.add("fix23-gpu", dataclasses.replace(HARDWARE.get("h200"), name="fix23-gpu", snic_bandwidth=25e9))
    return "fix23-gpu"


def test_a_given_figure_is_not_called_its_default(gpu25, caplog):
    """`sweep --loads=cluster.snic_gbps=50` on a 25 GB/s profile was told "config.cluster.snic_gbps is its default
    50 GB/s" for the cells that set 50. Contract: a field given by a variant item or a --config flag is not named
    "its default" (one left at it still is; a rate 8x the profile's, given, still is named)."""
    from dualpath_jax.sim.config import sim_config_from_dict
    from dualpath_jax.sim.configs_io import load_config

    d = load_config(TINY).to_dict()
    d["cluster"].update(hardware=gpu25, snic_gbps=50.0)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):
        sim_config_from_dict(d)
        assert "config.cluster.snic_gbps is its default 50 GB/s" in caplog.text
        caplog.clear()
        sim_config_from_dict(d, variant={"cluster.snic_gbps": "cluster.snic_gbps=50"})
        sim_config_from_dict(d, explicit={"cluster.snic_gbps"})
        assert "snic_gbps" not in caplog.text
        d["cluster"]["snic_gbps"] = 200.0
        sim_config_from_dict(d, explicit={"cluster.snic_gbps"})
        assert "config.cluster.snic_gbps = 200 GB/s is 8x the 25 GB/s" in caplog.text


def test_a_sweep_cell_says_its_checks_warnings_once(gpu25, monkeypatch, caplog):
    """Each warning came twice per cell: when `_check_cells` built it and again when it ran. The grid's cells now run
    inside `checks_said`, in which the config's warnings are not said again."""
    from dualpath_jax.sim.config import checks_said, checks_were_said, sim_config_from_dict
    from dualpath_jax.sim.configs_io import load_config
    from experiments import sweep

    d = load_config(TINY).to_dict()
    d["cluster"].update(hardware=gpu25, snic_gbps=50.0)
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):
        with checks_said():
            sim_config_from_dict(d)
        assert not caplog.records
    seen = []
    monkeypatch.setattr(sweep, "run_cell", lambda c: seen.append(checks_were_said()) or {"jct_s": 1.0})
    (row,) = sweep.run_grid([(TINY, "basic", "", "", "")], 1)
    assert seen == [True] and row["jct_s"] == 1.0 and not checks_were_said()


# ---- 1. a policy's own Config defaults that the run replaces are named ---------------------------------------------


@pytest.fixture
def own_policy(monkeypatch):
    """A policy of one's own whose Config sets seed, α, block_size (`/tmp/extend/my_pol3.py`), registered for one test."""
    monkeypatch.setattr(POLICIES, "_entries", dict(POLICIES._entries))

    @POLICIES.register("fix23_bs")
    class BlockSized(schedulers.policies.BasicPolicy):
        @dataclasses.dataclass(frozen=True)
        class Config:
            block_size: int = 32
            seed: int = 7
            alpha_tokens: int = 5
            beta_tokens: int = 0  # (a sentinel: "fill me")

        def __init__(self, config=None):
            super().__init__(schedulers.policies.BasicPolicy.Config())  # (places as basic does)
            self.own = config or self.Config()

    return "fix23_bs"


def test_a_policys_own_config_defaults_replaced_by_the_run_are_named(own_policy, caplog):
    """`Config: block_size: int = 64; seed: int = 7; alpha_tokens: int = 5` ran with the run's block size, seed and α,
    silently (a researcher reads a class default as set). Contract: one warning per run and policy naming each field,
    its default, the run's value and how to keep it; none for a field given, a sentinel default or a built-in's."""
    from dualpath_jax.sim.config import checks_said, sim_config_from_dict
    from dualpath_jax.sim.configs_io import load_config
    from dualpath_jax.sim.runner import build_simulator
    from schedulers.registry import warn_replaced_defaults

    d = load_config(TINY).to_dict()
    d["scheduler"]["name"] = own_policy
    d["workload"].update(n_agents=2, max_turns=2)
    sc = sim_config_from_dict(d)
    logger = "schedulers.registry"
    with caplog.at_level(logging.WARNING, logger=logger):
        sim = build_simulator(sc)
    (line,) = [r.getMessage() for r in caplog.records if r.name == logger]
    alpha, bs = sim.policy.own.alpha_tokens, sc.cluster.block_size
    assert line == (
        f"policy 'fix23_bs': the run replaces its Config's defaults block_size=32 by the run's {bs}, seed=7 by the run's "
        f"{sc.seed}, alpha_tokens=5 by the run's {alpha} (give policy.seed=7, policy.alpha_tokens=5 to keep them); "
        "block_size is always the run's KV block size"
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=logger):
        with checks_said():  # (a sweep's cell, run after its check said it)
            build_simulator(sc)
        cls = POLICIES.get(own_policy)
        given = {"seed": 7, "alpha_tokens": 9, "block_size": 32}
        assert warn_replaced_defaults(cls, own_policy, given, {**given, "beta_tokens": 100}) is None
        assert warn_replaced_defaults(POLICIES.get("random"), "random", {}, {"seed": 3}) is None  # (built-in)
        assert warn_replaced_defaults(POLICIES.get("dualpath"), "dualpath", {}, {"block_size": 16}) is None
    assert not caplog.records


def test_a_modes_override_warning_is_said_once_per_sweep_cell_too(caplog):
    """`_warn_mode_overrides` (a mode replacing a given setting) came twice per sweep cell as the hardware warning did:
    not within `checks_said`, still said outside it."""
    from dualpath_jax.sim.config import checks_said, sim_config_from_dict
    from dualpath_jax.sim.configs_io import load_config

    d = load_config(TINY).to_dict()
    d["mode"], d["cluster"]["layerwise"] = "basic", True
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.sim.config"):
        with checks_said():
            sim_config_from_dict(d, explicit={"cluster.layerwise"})
        assert not caplog.records
        sim_config_from_dict(d, explicit={"cluster.layerwise"})
        assert any("sets config.cluster.layerwise" in r.getMessage() for r in caplog.records)
