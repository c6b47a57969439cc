"""Fix wave 27, runtime and traffic leftovers of session 43: the bound on messages held for unknown attempts, a JAX
compile taken for a stall, a killed node's death reason, the layer feeder's futures made up front, tiny class weights.
Each test failed on the code before its fix (checked with the old files swapped back in)."""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import signal
import threading
import time
import types

import numpy as np
import pytest
from test_runtime_hunt3 import _fake_engine, _task

from dualpath_jax.runtime import engines

# ---- 1. messages of unknown attempts are held within a bound ------------------------------------------------------


def test_messages_held_for_unknown_attempts_are_bounded_and_a_dropped_attempt_fails_clearly(monkeypatch, caplog):
    """Messages and layer notifications of an attempt whose task had not come were held in `early` without bound: a
    peer's bug sending for attempts that never come grew it for ever. Now at most EARLY_MAX_ITEMS items and
    EARLY_MAX_BYTES bytes: beyond, the oldest attempt's go, with a warning naming it; should its task come after all,
    the run fails naming it (it would have waited for them until run_timeout_s)."""
    monkeypatch.setattr(engines, "EARLY_MAX_ITEMS", 8)
    monkeypatch.setattr(engines, "EARLY_WARNINGS", 3)
    errors = []
    pe = _fake_engine(engines.PrefillEngine, batcher=None)
    pe.ctx.emit = errors.append
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.engines"):
        for rid in range(10):  # 20 items of 10 attempts: the 6 oldest attempts go
            pe._handle("msg", {"kind": "de_area", "request_id": rid, "attempt": 0, "offset": 64 * rid})
            pe._handle("layer", (rid, 0, 1))
    assert pe.early_items == 8 and list(pe.early) == [(6, 0), (7, 0), (8, 0), (9, 0)] and pe.early_dropped == 6
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3 and "dropped 2 message(s)/notification(s) held for request 0 attempt 0" in warned[0]
    assert warned[2].endswith("; further drops are logged at debug level")  # (a flood: 3 lines, not one per drop)
    pe._handle("task", _task(9, 0))  # kept: delivered with its task
    assert pe.reqs[(9, 0)].de_area_off == 64 * 9 and pe.reqs[(9, 0)].layers_from_de == {1} and not errors
    pe._handle("task", _task(0, 0))  # its held items were dropped: the run fails, naming it
    assert [e.kind for e in errors] == ["error"]
    assert "request 0 attempt 0 came after the messages held for it were dropped" in errors[0].data["message"]
    pe._handle("cancel", engines.Cancel(8, 0))  # a cancel frees what it held
    assert list(pe.early) == [(6, 0), (7, 0)] and pe.early_items == 4

    # bytes: a message with a large (unchecked) field pushes the oldest out
    monkeypatch.setattr(engines, "EARLY_MAX_ITEMS", 1000)
    monkeypatch.setattr(engines, "EARLY_MAX_BYTES", 1000)
    de = _fake_engine(engines.DecodeEngine)
    for rid in (1, 2):
        de._handle("msg", {"kind": "pe_area", "request_id": rid, "attempt": 0, "offset": 0, "pad": "x" * 600})
    assert list(de.early) == [(2, 0)] and 600 < de.early_bytes <= 1000 and de.early_dropped == 1


# ---- 2. a JAX compile is progress, not a stall --------------------------------------------------------------------


def test_a_slow_jit_compile_is_not_taken_for_a_stall_but_a_hang_after_it_is(monkeypatch):
    """A compile longer than scheduler.stall_timeout_s (the first call of a new shape with cluster.precompile off: a
    large model compiles for minutes) had the engine declared dead. Now a compile on the engine's main thread stamps
    its progress; a hang after it is still a stall."""
    import jax
    from jax._src import compiler

    from dualpath_jax.runtime.node import EngineGroup

    real = compiler.backend_compile_and_load
    compiling, compiled, hang = threading.Event(), threading.Event(), threading.Event()

    def slow_compile(*a, **k):  # an XLA compile of 0.9 s (3x the stall timeout)
        compiling.set()
        time.sleep(0.9)
        try:
            return real(*a, **k)
        finally:
            compiled.set()

    monkeypatch.setattr(compiler, "backend_compile_and_load", slow_compile)
    k = np.float32(time.time_ns() % 1000 + 3)  # (a program of its own: no cache hit)

    def main():
        jax.jit(lambda x: x * k + 1)(np.ones(3, np.float32)).block_until_ready()
        hang.wait(10)  # then stuck, with no progress stamped

    eng = _fake_engine(engines.DecodeEngine)
    eng._threads[0] = threading.Thread(target=main, daemon=True)
    group = object.__new__(EngineGroup)
    group.role, group.engines, group.stall_timeout_s = "decode", {0: eng}, 0.3
    group.snic = types.SimpleNamespace(stalled=lambda now, timeout: {})
    eng.tick = time.monotonic()
    eng._threads[0].start()
    try:
        assert compiling.wait(10)
        during = []
        while not compiled.is_set():
            during.append(group._stalled(time.monotonic()))
            time.sleep(0.02)
        assert len(during) > 15 and not any(during), [d for d in during if d][:3]
        assert eng.compiles_seen > 0
        seen: dict = {}
        deadline = time.monotonic() + 5
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
            seen = group._stalled(time.monotonic())
        assert list(seen) == ["decode engine 0"] and seen["decode engine 0"] > 0.3
        assert not engines.jax_compiling(eng._threads[0])
    finally:
        hang.set()
        eng._threads[0].join(10)


# ---- 3. a killed node's death reason names its exit -----------------------------------------------------------------


def test_a_local_node_process_killed_by_sigkill_is_named_so():
    """The local launcher's reason for a node whose process ended: its exit code or signal (it said "its process or
    thread exited", or a peer's "could not reach it" when that came first)."""
    from dualpath_jax.runtime.launcher import LocalProcessLauncher, exit_code_text

    launcher = LocalProcessLauncher(types.SimpleNamespace(netns=False))
    p = mp.get_context("spawn").Process(target=time.sleep, args=(30,), name="node2", daemon=True)
    p.start()
    try:
        launcher.procs[2] = p
        launcher._running.add(2)
        assert launcher.exit_reason(2) is None  # running
        p.kill()
        p.join(10)
        assert launcher.exit_reason(2) == f"its process node2 (pid {p.pid}) was killed by SIGKILL (exit code -9)"
        launcher._killed.add(2)
        assert launcher.exit_reason(2).endswith("was killed by SIGKILL (exit code -9, sent by launcher.kill)")
    finally:
        p.kill()
        p.join(5)
    assert exit_code_text(-signal.SIGSEGV) == "was killed by SIGSEGV (exit code -11)"
    assert (
        exit_code_text(0) == "exited with code 0" and exit_code_text(-99) == "was killed by signal 99 (exit code -99)"
    )


def test_the_scheduler_names_a_nodes_exit_also_where_a_peer_noticed_first(sched_store):
    """A node killed mid-run was first declared dead by a peer's `peer_lost` ("engine 0 (node 0) could not reach it:
    PeerLostError(...)"), read as a network fault; the launcher's exit check then changed nothing. Now the launcher
    tells the scheduler how a node ended (`watch_exits`): the reason names the exit, and what noticed it first."""
    from test_runtime_scheduler import Clock, fetch, make_service

    from dualpath_jax.runtime.control import Event
    from dualpath_jax.workloads.types import Trajectory, Turn

    exits: dict[int, str] = {}
    svc = make_service(sched_store, [Trajectory(i, [Turn(6, 2)]) for i in range(4)], Clock(), timeout=100.0)
    svc.watch_exits(exits.get)
    fetch(svc, 1), fetch(svc, 2)
    tasks = fetch(svc, 0).tasks
    on2 = next(t for t in tasks if t.decode_engine == 2)
    lost = {"engine": 0, "peer": 2, "error": "PeerLostError('engine0: not connected to engine2')"}
    fetch(svc, 0, [Event("peer_lost", on2.request_id, on2.attempt, svc.t0, lost)])
    first = "engine 0 (node 0) could not reach it: PeerLostError('engine0: not connected to engine2')"
    assert svc.death_reasons == {2: first}  # (its process not reaped yet)
    svc.check_heartbeats()
    assert svc.death_reasons == {2: first}
    exits[2] = "its process node2 (pid 7) was killed by SIGKILL (exit code -9)"
    svc.check_heartbeats()
    assert svc.death_reasons == {2: f"{exits[2]} (noticed first as: {first})"}
    exits[1] = "its process node1 (pid 8) exited with code 0"
    svc.declare_dead(1)  # (the driver's check, the exit known: the exit alone, not "its process or thread exited")
    assert svc.death_reasons[1] == exits[1]
    assert svc.failure is not None and exits[1] in svc.failure


def test_a_node_told_to_stop_then_exiting_keeps_its_reason(sched_store):
    """A node declared dead while alive (late heartbeat, a stall) fetches once more, is told to stop and exits: that
    exit is the stop, not the cause."""
    from test_runtime_scheduler import Clock, fetch, make_service

    from dualpath_jax.workloads.types import Trajectory, Turn

    exits: dict[int, str] = {}
    clock = Clock()
    svc = make_service(sched_store, [Trajectory(i, [Turn(6, 2)]) for i in range(4)], clock, timeout=1.0)
    svc.watch_exits(exits.get)
    fetch(svc, 1), fetch(svc, 2), fetch(svc, 0)
    clock.t += 0.6
    fetch(svc, 0), fetch(svc, 1)
    clock.t += 0.6
    assert svc.check_heartbeats() == [2]
    why = svc.death_reasons[2]
    assert why.startswith("no fetch for ") and fetch(svc, 2).shutdown
    exits[2] = "its process node2 (pid 7) exited with code 0"
    svc.check_heartbeats()
    assert svc.death_reasons[2] == why


def test_the_inprocess_launcher_names_a_kill():
    from dualpath_jax.runtime.launcher import InProcessLauncher

    launcher = InProcessLauncher(types.SimpleNamespace())
    launcher.groups[3] = types.SimpleNamespace(kill=lambda: None)
    assert launcher.exit_reason(3) is None
    launcher.kill(3)
    assert launcher.exit_reason(3) == "its thread node3 was killed (InProcessLauncher.kill: no goodbye, as SIGKILL)"


@pytest.fixture
def sched_store(tmp_path):
    from test_runtime_scheduler import BS

    from dualpath_jax.kv_layout import BlockLayout
    from dualpath_jax.kv_store import LocalDirStore

    s = LocalDirStore(tmp_path / "kv", BlockLayout(2, BS, 8, "test-model"))
    yield s
    s.close()


# ---- 4. the layer feeder makes its futures lazily -------------------------------------------------------------------


def test_a_feeder_of_a_million_layers_starts_at_once_and_holds_few_futures():
    """`LayerFeeder(num_layers=10**6)` made one Future (with its Condition) per layer before anything ran: 18 s and 1.7
    GB. Now they are made as asked for and dropped once the consumer moved past them; the contract is unchanged
    (layers in order, a released layer raises naming the wait that moved past it, close fails every layer)."""
    from transport.feeder import LayerFeeder, LayerLoadError

    t0 = time.monotonic()
    feed = LayerFeeder(10**6, lambda layer, out: np.full(4, layer % 251, np.uint8), 4, prefetch=2, to_device=np.copy)
    try:
        assert time.monotonic() - t0 < 1.0
        for layer in range(200):
            assert int(feed.wait_for_layer(layer)[0]) == layer % 251
        assert len(feed._results._futs) <= 2 + 1 + 1  # (prefetch + 1 loaded or loading, and the one computed)
        assert int(feed.wait_for_layer(205)[0]) == 205  # (skips 200..204)
        with pytest.raises(LayerLoadError, match=r"layer 150 was released \(wait_for_layer\(151\) moved past it\)"):
            feed.wait_for_layer(150)
        with pytest.raises(LayerLoadError, match=r"layer 201 was released \(wait_for_layer\(205\) moved past it\)"):
            feed.wait_for_layer(201)
    finally:
        feed.close()
    with pytest.raises(LayerLoadError, match="feeder closed"):
        feed.wait_for_layer(206)
    assert all(f.exception() is not None for f in (feed._results[i] for i in (0, 205, 206, 10**6 - 1)))


# ---- 5. class weights the fair-queuing tags can hold -----------------------------------------------------------------


def test_class_weights_beyond_what_the_tags_hold_are_refused_and_tiny_ones_work():
    """Weights (1e-300, 1) overflowed the SFQ finish tags (bytes / weight) to inf within a few chunks: the classes then
    tied, and `cancel`'s refund (inf - inf) was NaN. A ratio the float64 tags cannot resolve is refused, naming it; tiny
    weights of a sane ratio are normalised (the smallest 1) and keep their shares."""
    from dualpath_jax.traffic import ClusterLinks, Link

    with pytest.raises(ValueError, match=r"link 'x': weights: class 'b'.* more than MAX_WEIGHT_RATIO=1e\+07"):
        Link("x", 1e9, {"a": 1e-300, "b": 1.0})
    with pytest.raises(ValueError, match=r"ClusterLinks: cnic_weights: class 'high'"):
        ClusterLinks(1e9, 1e9, {"high": 1e8, "low": 1.0})
    Link("x", 1e9, {"a": 1.0, "b": 1e7})  # (MAX_WEIGHT_RATIO: taken)

    link = Link("tiny", math.inf, {"a": 1e-300, "b": 3e-300})  # (unpaced: the tags of queued chunks, none granted)
    tickets = [link.enqueue(1 << 20, c) for _ in range(200) for c in ("a", "b")]  # (old: a's tags inf)
    assert all(math.isfinite(t.charge) for t in tickets)
    assert link._finish == {"a": 200 * 2.0**20, "b": pytest.approx(200 * 2.0**20 / 3)}  # (b: 3/4 under contention)
    link.cancel(tickets[-1])
    assert link._finish["b"] == pytest.approx(199 * 2.0**20 / 3)
