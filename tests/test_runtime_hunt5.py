"""Runtime hunt, fifth round: engines, storage NIC, node (tests fail on the commit before their fix)."""

from __future__ import annotations

import os
import threading
import time
import types

import numpy as np

from dualpath_jax.block_keys import block_keys, root_key
from dualpath_jax.kv_layout import BlockLayout
from dualpath_jax.runtime import engines
from dualpath_jax.runtime.control import TurnTask
from dualpath_jax.runtime.storage_nic import ReadJob, StorageNIC, WriteJob
from dualpath_jax.store import LocalDirStore

LAYOUT = BlockLayout(num_layers=2, block_tokens=4, bytes_per_token_per_layer=8, fingerprint="hunt5/bf16")


def _write_back(snic, keys, blocks) -> list:
    done, got = threading.Event(), []
    snic.submit_write(WriteJob(keys, blocks, lambda n: (got.append(n), done.set())))
    assert done.wait(30)
    return got


def test_a_write_back_replaces_a_damaged_stored_block_of_the_right_size(tmp_path):
    """The SNIC skipped a write-back whose key `contains` said was stored, and `contains` looks only at the file's
    size: a damaged block (bit rot, a kept store) was never replaced. A read stops at a request's first bad block,
    so the damaged blocks behind it were recomputed, skipped at write-back, and missed again at the next turn
    (/tmp/hunt_runtime5/damaged_dedup.py: a kept store with every block damaged gave the next turns hits of 16 and
    32 tokens instead of 48 and 64). A good stored block is still not written (nor charged) again."""
    store = LocalDirStore(tmp_path / "kv", LAYOUT)
    keys = block_keys(np.arange(12), LAYOUT.block_tokens, parent=root_key(LAYOUT.fingerprint))
    good = [np.full(LAYOUT.full_block_shape, 7 + i, np.uint8) for i in range(len(keys))]
    for k, b in zip(keys, good, strict=True):
        assert store.write(k, b)
    path = store.path_of(keys[1])
    with open(path, "r+b") as f:  # one byte flipped: the file keeps its size
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    paced = []
    snic = StorageNIC(0, store, LAYOUT.block_tokens, pace=paced.append)
    assert _write_back(snic, keys, good) == [3]
    snic.close()
    out = np.empty(LAYOUT.full_block_shape, np.uint8)
    for k, b in zip(keys, good, strict=True):
        assert store.read(k, out), "every block must read back after the write-back"
        np.testing.assert_array_equal(out, b)
    assert paced == [LAYOUT.full_block_nbytes] and snic.bytes_written == LAYOUT.full_block_nbytes
    store.close()


def _fake_engine(cls, events: list, **kw):
    """An engine built by its own __init__ over stand-ins (no model, transport or store): only its inbox handling."""
    cfg = types.SimpleNamespace(block_size=4, cluster=types.SimpleNamespace(decode_slots=2, max_seq_len=64))
    model = types.SimpleNamespace(
        kv_layout=types.SimpleNamespace(bytes_per_token_per_layer=8, num_layers=2),
        new_decode_batch=lambda slots, seq: None,
    )
    ctx = types.SimpleNamespace(cfg=cfg, model=model, emit=events.append)
    transport = types.SimpleNamespace(register=lambda name, arena: None)
    pool = types.SimpleNamespace(arena=None)
    return cls(0, 0, ctx, transport, pool, None, **kw)


def test_a_reads_end_is_stamped_when_the_snic_finished_it_not_when_the_engine_got_to_it():
    """The engines stamped a read's `read_done` event when their thread handled the SNIC's report: a PE handles it
    only after the batch it is running, so a turn's `read_end` ("last storage read finished") included another
    request's prefill (/tmp/hunt_runtime5/read_end.py, `:test` config, 8 agents: recorded read times 1.57-1.87 s
    for reads of microseconds; 0.003-0.01 s after). It is now the SNIC's end of the read, as `t_start` its start."""
    for cls, kw, side in [(engines.PrefillEngine, {"batcher": None}, "pe"), (engines.DecodeEngine, {}, "de")]:
        events: list = []
        eng = _fake_engine(cls, events, **kw)
        task = TurnTask(7, 0, 0, 0, np.arange(9, dtype=np.int32), 2, [b"k"] * 2, 2, 1, 0, 1, "pe")
        eng._handle("task", task)
        t1 = time.time() - 5.0  # the read ended 5 s ago; the engine was busy meanwhile
        job = ReadJob(7, 0, [b"k"], 0, None, None)
        eng._handle("read_done", (job, 1, 64, t1 - 1.0, t1))
        (ev,) = [e for e in events if e.kind == "read_done"]
        assert ev.t == t1 and ev.data == {"side": side, "nbytes": 64, "t_start": t1 - 1.0}, side
