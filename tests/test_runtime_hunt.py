"""Defects found by a hunt of the runtime area (engines, scheduler service, host buffers, traffic manager), each with
the input that showed it."""

from __future__ import annotations

import logging

import pytest

from configs.tiny_runtime import get_config
from dualpath_jax.runtime import driver
from dualpath_jax.runtime.config import ConfigError, RuntimeConfig
from dualpath_jax.traffic import Link, Pacer
from dualpath_jax.workloads.types import Trajectory, Turn


def _take(paced, chunks: int) -> int:
    """Move the first `chunks` chunks of a paced transfer, then drop it (a cancelled request, a stopped engine)."""
    moved = 0
    for i, n in enumerate(paced):
        moved += n
        if i + 1 == chunks:
            break
    return moved


def test_a_transfer_dropped_part_way_leaves_no_chunks_on_its_link():
    """A paced transfer keeps LOOKAHEAD chunks queued ahead; dropped after its first chunk (`engines.pace_on` on a
    cancel or stop, a transport losing its peer), those stayed queued: granted later anyway, recorded as bytes that
    never crossed (82020 B recorded for 16484 B moved) and holding up the next transfer by their link time."""
    link = Link("cnic/engine0", 1e6, quantum=16384, burst_s=0.0)
    moved = _take(link.paced(10 * 16384, "low"), 1)
    link.acquire(100, "low")  # the next transfer on the link
    assert moved == 16384
    assert link.total_bytes == moved + 100
    assert sum(s.nbytes for s in link.samples()) == moved + 100


def test_a_transfer_dropped_part_way_leaves_no_chunks_on_any_link_of_its_pacer():
    snic = Link("snic/node0", 1e6, quantum=16384, burst_s=0.0, weights={"kv": 1.0})
    cnic = Link("cnic/engine0", 2e6, quantum=16384, burst_s=0.0)
    moved = _take(Pacer([snic, cnic]).paced(10 * 16384, "low"), 2)
    snic.acquire(100, "kv")
    cnic.acquire(100, "low")
    for link in (snic, cnic):
        assert link.total_bytes == moved + 100, link.name
        assert sum(s.nbytes for s in link.samples()) == moved + 100, link.name


@pytest.mark.parametrize(
    "turns, message",
    [
        ([(32, 0), (5, 2)], "trajectory 0 turn 0 generates 0 tokens"),
        ([(32, 2), (5, 0)], "trajectory 0 turn 1 generates 0 tokens"),
        ([(0, 2), (5, 2)], "trajectory 0 turn 0 has an empty prompt"),
        ([], "have no turns"),
    ],
)
def test_turns_the_runtime_cannot_serve_are_a_config_error(turns, message):
    """A workload given to `driver.run` with a turn generating 0 tokens failed mid-run in the scheduler's fetch ("got 1
    tokens, expected 0": the PE always hands over the first token), an empty first prompt crashed every engine
    allocating a 0-byte area, and trajectories without turns stopped on `max() arg is an empty sequence`: each is a
    `ConfigError` naming it before anything starts."""
    cfg = RuntimeConfig.from_config_dict(get_config("test").runtime)
    trajs = [Trajectory(0, [Turn(a, g) for a, g in turns])]
    with pytest.raises(ConfigError, match=message):
        driver.run(cfg, trajs)


def test_kv_writes_slower_than_the_peer_timeout_still_hand_the_turn_over(base, ops, monkeypatch):
    """A PE waited at most PEER_TIMEOUT_S (30 s) for each KV write to its DE, then dropped the request without telling
    anyone: with a CNIC cap that makes a batch's writes that slow, the DE waited forever for the prefill and the run
    hung until `run_timeout_s` ("0/1 turns"). The writes are paced, not lost: the PE now waits for them (a dead DE
    still fails them, or cancels the request). Here the timeout is cut to 20 ms and each 8 KiB layer write waits
    0.25 s for its CNIC slot."""
    from dualpath_jax.runtime import engines

    monkeypatch.setattr(engines, "PEER_TIMEOUT_S", 0.02)
    cfg = base.replace(**{"scheduler.name": "basic", "nics.cnic_bytes_per_s": 32768.0, "run_timeout_s": 40.0})
    trajs = [Trajectory(0, [Turn(32, 2)])]
    res = driver.run(cfg, trajs, model_ops=ops)
    assert list(res.tokens) == [(0, 0)] and res.tokens[(0, 0)].shape == (2,)


def test_a_decode_engines_layers_slower_than_the_peer_timeout_do_not_fail_the_run(base, ops, monkeypatch):
    """A PE waited at most PEER_TIMEOUT_S (30 s) for each layer of the DE-read hit, then raised TimeoutError: the
    engine crashed and the run failed, though the DE was alive and only slow (its forwards paced on a slow CNIC,
    behind other requests' layers). A dead DE's requests are cancelled by the scheduler, so the PE now waits. Here the
    timeout is cut to 20 ms and the DE sends each layer after the first 0.2 s late."""
    import time

    from dualpath_jax.runtime import engines

    cfg = base.replace(**{"scheduler.name": "de_only", "run_timeout_s": 20.0})
    trajs = [Trajectory(0, [Turn(32, 1), Turn(4, 1)])]  # turn 1: 32 tokens of hit, read on the DE side
    driver.run(cfg, trajs, model_ops=ops)  # (compiles the prefill buckets first: the late layers are not hidden)
    write_to = engines.DecodeEngine.write_to

    def slow_write_to(self, engine_id, local_offset, remote_offset, nbytes, notify=None):
        if notify is not None and engines.split_tag(notify)[2] > 0:
            time.sleep(0.2)
        return write_to(self, engine_id, local_offset, remote_offset, nbytes, notify)

    monkeypatch.setattr(engines, "PEER_TIMEOUT_S", 0.02)
    monkeypatch.setattr(engines.DecodeEngine, "write_to", slow_write_to)
    res = driver.run(cfg, trajs, model_ops=ops)
    assert sorted(res.tokens) == [(0, 0), (0, 1)]
    assert [r.hit_tokens for r in res.records] == [0, 32] and res.summary["de_read_bytes"] > 0


def test_an_engine_stopped_mid_work_is_not_reported_as_a_crash(caplog):
    """Ctrl-C of the main job: a PE stopped while its H2D crossed the CNIC logged "engine crashed" with a traceback and
    sent an error event, as if it had failed. A stop in the middle of work is logged as such, without an error event;
    an exception while running is still a crash (test_a_crashing_engine_fails_the_run_with_its_error)."""
    import threading

    from dualpath_jax.runtime import engines

    events = []

    class Ctx:
        def emit(self, ev):
            events.append(ev)

    eng = object.__new__(engines.EngineBase)
    eng.role, eng.engine_id, eng.ctx, eng.error, eng._stop = "prefill", 0, Ctx(), None, threading.Event()

    def run():
        raise RuntimeError("pe0 stopped while its H2D crossed the CNIC")

    eng.run = run
    eng._stop.set()
    with caplog.at_level(logging.INFO, logger="dualpath_jax.runtime.engines"):
        eng._main()
    assert events == [] and "crashed" not in caplog.text and "stopped mid-work" in caplog.text
    eng._stop.clear()
    with caplog.at_level(logging.INFO, logger="dualpath_jax.runtime.engines"):
        eng._main()
    assert len(events) == 1 and events[0].kind == "error" and "crashed" in caplog.text
