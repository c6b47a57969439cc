"""Runtime defects found by the third hunt over dualpath_jax/runtime (engines, nodes, launcher, config)."""

from __future__ import annotations

import os
import time
import types

import numpy as np

from dualpath_jax.runtime import engines
from dualpath_jax.runtime.control import Cancel, TurnTask


def _fake_engine(cls, **kw):
    """An engine built by its own __init__ over stand-ins (no model, transport or store): only its inbox handling."""
    cfg = types.SimpleNamespace(block_size=4, cluster=types.SimpleNamespace(decode_slots=2, max_seq_len=64))
    model = types.SimpleNamespace(
        kv_layout=types.SimpleNamespace(bytes_per_token_per_layer=8, num_layers=2),
        new_decode_batch=lambda slots, seq: None,
    )
    ctx = types.SimpleNamespace(cfg=cfg, model=model, emit=lambda ev: None)
    transport = types.SimpleNamespace(register=lambda name, arena: None)
    pool = types.SimpleNamespace(arena=None)
    return cls(0, 0, ctx, transport, pool, None, **kw)


def _task(rid: int, attempt: int) -> TurnTask:
    return TurnTask(rid, attempt, 0, 0, np.arange(9, dtype=np.int32), 2, [], 0, 0, 0, 1, "pe")


def test_messages_of_a_dropped_attempt_arriving_late_are_not_held_forever():
    """A peer declared dead while alive keeps sending until its next fetch: its messages and layer notifications for
    an attempt this engine had already dropped (cancel) were held in `early` for the rest of the run (seen on a DE
    after a live PE node was declared dead: prefill_done of the dropped attempt). Items of an attempt not here yet
    are still held and delivered with its task."""
    pe = _fake_engine(engines.PrefillEngine, batcher=None)
    pe._handle("msg", {"kind": "de_area", "request_id": 7, "attempt": 0, "offset": 64})  # before its task: kept
    pe._handle("task", _task(7, 0))
    assert pe.reqs[(7, 0)].de_area_off == 64 and pe.early == {}
    pe._handle("cancel", Cancel(7, 0))
    pe._handle("msg", {"kind": "de_read_done", "request_id": 7, "attempt": 0, "end_blocks": 1})
    pe._handle("layer", (7, 0, 1))
    assert pe.reqs == {} and pe.early == {}

    de = _fake_engine(engines.DecodeEngine)
    de._handle("task", _task(7, 0))
    de._handle("cancel", Cancel(7, 0))
    de._handle("msg", {"kind": "prefill_done", "request_id": 7, "attempt": 0, "hit_tokens": 0, "first_token": 3})
    de._handle("msg", {"kind": "pe_area", "request_id": 8, "attempt": 1, "offset": 0})  # a later task's: kept
    assert de.reqs == {} and list(de.early) == [(8, 1)]


def test_a_group_told_to_shut_down_while_reading_reports_every_byte_its_snic_moved(tmp_path):
    """A group sent its final report (link bytes) before stopping its engines and its SNIC, whose read in progress went
    on after it -- past `close` too, from a store being closed: those bytes crossed the SNIC but never reached the
    run's records (a busy node declared dead though alive, or any stop mid-read). The final report now comes once
    nothing moves, and a stop ends the SNIC's job after its current block."""
    from configs.tiny_runtime import get_config
    from dualpath_jax.block_keys import block_keys, root_key
    from dualpath_jax.kv_layout import BlockLayout
    from dualpath_jax.runtime.config import RuntimeConfig
    from dualpath_jax.runtime.control import GroupReply
    from dualpath_jax.runtime.launcher import _transport_factory
    from dualpath_jax.runtime.node import EngineGroup
    from dualpath_jax.runtime.storage_nic import ReadJob
    from dualpath_jax.store import LocalDirStore
    from dualpath_jax.traffic import TrafficManager

    layout = BlockLayout(num_layers=2, block_tokens=16, bytes_per_token_per_layer=64, fingerprint="hunt3/x")
    cfg = RuntimeConfig.from_config_dict(get_config("test").runtime).replace(
        **{"nics.snic_bytes_per_s": 20 * layout.full_block_nbytes}  # a block each 50 ms: the read takes 0.8 s
    )
    store = LocalDirStore(tmp_path / "kv", layout)
    keys = block_keys(np.arange(16 * 16), 16, parent=root_key(layout.fingerprint))
    for k in keys:
        assert store.write(k, np.full(layout.full_block_shape, 7, np.uint8))
    model = types.SimpleNamespace(
        kv_layout=types.SimpleNamespace(bytes_per_token_per_layer=64, num_layers=2), fingerprint="hunt3/x"
    )
    reported = []

    class Control:
        def fetch(self, report):
            reported.extend(s.nbytes for s in report.link_bytes if s.link == "snic/node0")
            return GroupReply(shutdown=True)  # e.g. declared dead, or the run failed

    traffic = TrafficManager()
    g = EngineGroup(0, "prefill", [0], cfg, model, store, Control(), _transport_factory(cfg), traffic, lambda: None)
    area = np.zeros((2, 16 * 16, 64), np.uint8)
    g.snic.submit_read(ReadJob(0, 0, keys, 0, area, lambda *a: None))
    # the stop must come mid-read: once the first block crossed (on a loaded machine the shutdown, fetched at once,
    # could come before the SNIC's thread had moved a byte: 0 moved, a flaky failure of CI on 2026-12-05)
    deadline = time.monotonic() + 30.0
    while traffic.link("snic/node0").total_bytes == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    g.run()
    for t in g.snic._threads:  # (the base code left the read running: wait for it to end)
        t.join(5.0)
    store.close()
    moved = traffic.link("snic/node0").total_bytes
    assert sum(reported) == moved
    assert 0 < moved < len(keys) * layout.full_block_nbytes, "the stop did not end the read early"


def test_ctrl_c_of_a_node_process_is_not_a_traceback():
    """Ctrl-C of the main job (local launcher, the default) reaches every node process: each printed a whole
    KeyboardInterrupt traceback ("Process node0: Traceback ...") under the driver's one-line "interrupted". A node
    interrupted by the user now logs an info line; any other exception still prints its traceback."""
    import subprocess
    import sys

    code = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from dualpath_jax.runtime.launcher import _node_process\n"
        "def serve(exc):\n"
        "    raise exc\n"
        "_node_process(serve, KeyboardInterrupt() if sys.argv[1] == 'int' else ValueError('boom'))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = [
        subprocess.run([sys.executable, "-c", code, a], capture_output=True, text=True, cwd=root)
        for a in ("int", "err")
    ]
    assert run[0].returncode == 130 and "Traceback" not in run[0].stderr and "interrupted" in run[0].stderr
    assert run[1].returncode == 1 and "Traceback" in run[1].stderr and "ValueError: boom" in run[1].stderr


def test_gaps_that_put_a_last_turn_past_the_run_timeout_are_a_config_error():
    """Turn i arrives no sooner than turn i-1 plus its gap: with workload.gap_s=400 over 3 turns the last turn cannot
    arrive before 800 s, so a run_timeout_s of 600 can never be met -- the run waited out the whole timeout and then
    failed ("run did not finish within 600.0 s"). Known before the run: a ConfigError naming both fields."""
    import pytest

    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime import driver
    from dualpath_jax.runtime.config import ConfigError, RuntimeConfig

    base = RuntimeConfig.from_config_dict(get_config("test").runtime)  # 3 turns per agent, offline arrivals
    ops = types.SimpleNamespace(config=types.SimpleNamespace(batch_invariant=False))  # (checks before the model)
    with pytest.raises(ConfigError, match=r"config.run_timeout_s=600 s .* turn 2 arrives at 800 s .*gap_s=400"):
        driver.prepare(base.replace(**{"workload.gap_s": 400.0, "run_timeout_s": 600.0}), model_ops=ops)
    driver.prepare(base.replace(**{"workload.gap_s": 300.0, "run_timeout_s": 600.0}), model_ops=ops)  # can finish


def test_a_policy_block_size_other_than_the_runtimes_is_a_config_error():
    """`scheduler.policy_kwargs.block_size` (the split policy's rounding unit; a simulator setting, 64 there) was
    accepted whatever `config.block_size` the runtime stores and reads in: with 64 over 16-token blocks, split put a
    request's whole hit on one side unless it held more than 64 tokens. Any other value than the runtime's own is a
    ConfigError before the run (left out, it defaults to config.block_size)."""
    import pytest

    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime.config import ConfigError, RuntimeConfig, validate

    base = RuntimeConfig.from_config_dict(get_config("test").runtime).replace(**{"scheduler.name": "split"})
    with pytest.raises(ConfigError, match=r"policy_kwargs.block_size=64 differs from config.block_size=16"):
        validate(base.replace(**{"scheduler.policy_kwargs": {"block_size": 64}}))
    validate(base.replace(**{"scheduler.policy_kwargs": {"block_size": 16}}))
    validate(base)


def test_a_prefill_node_precompiles_only_buckets_it_can_meet():
    """`precompile` compiled (and ran) every bucket up to prefill_token_budget new tokens and prefill_max_batch
    requests, also past what a batch can hold: a prompt has at most max_seq_len tokens, and a batch at most one request
    per budgeted token. prefill_token_budget=4096 over max_seq_len=256 ran shapes up to 8 x 4096 new tokens (one took
    ~2 min on this CPU) that no batch has."""
    from configs.tiny_runtime import get_config
    from dualpath_jax.runtime.config import RuntimeConfig
    from dualpath_jax.runtime.node import EngineGroup

    base = RuntimeConfig.from_config_dict(get_config("test").runtime)  # max_seq_len 256, prefill_max_batch 8
    calls = []
    model = types.SimpleNamespace(precompile=lambda *a: calls.append(a) or 0)
    g = object.__new__(EngineGroup)
    g.role, g.node_id = "prefill", 0
    for budget in (4096, 3):
        g._precompile(base.replace(**{"cluster.prefill_token_budget": budget}), [model, model])  # (one model twice)
    assert calls == [(8, 256, 256), (3, 3, 256)]
