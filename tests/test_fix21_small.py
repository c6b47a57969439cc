"""Fix wave 21, small defects found in session 38. `bench_store` stopped by SIGTERM (a batch system's stop, `kill`)
after its first layout ended at once: no table, nothing in --out, the finished layout's rows lost (Ctrl-C kept
them; bench_io / bench_prefill / bench_invariant each carried the SIGTERM handling as a copy, bench_store had none).
The four now share `experiments.run_parts_then_write`. Each test failed on the code before its fix."""

import json

from test_launch_hunt import _launch

# bench_store with its measurement replaced by one row per layout (no store, no disk); the second layout sends the
# SIGTERM, as a batch system's stop would arrive while it runs
_FAKE_STORE = """
import os, signal, time
import experiments.bench_store as bs

def one_layout(names, *args):
    if names == ["qwen2.5_32b_fp16"]:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    return [{"layout": names[0], "op": "read", "variant": "full block", "gbps": 1.0, "load_avg_1min": 0.5}]

bs.run_store_bench = one_layout
# its flags are defined under `if __name__ == "__main__":`: that block runs in the module's own namespace
src = open(bs.__file__).read()
block = src[src.index('if __name__ == "__main__":') :].replace('if __name__ == "__main__":', "if True:", 1)
exec(compile(block, bs.__file__, "exec"), vars(bs))
"""


def test_bench_store_sigterm_keeps_the_finished_layouts(tmp_path):
    script = tmp_path / "fake_store.py"
    script.write_text(_FAKE_STORE)
    out = tmp_path / "rows.json"
    r = _launch(
        str(script), "--layouts=deepseek_v3_fp8,qwen2.5_32b_fp16", f"--root={tmp_path / 'store'}", f"--out={out}"
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.rstrip().endswith(
        "interrupted (SIGTERM) during 'qwen2.5_32b_fp16'; the finished ones (deepseek_v3_fp8) are kept"
    )
    assert [x["layout"] for x in json.loads(out.read_text())] == ["deepseek_v3_fp8"]
    assert "| deepseek_v3_fp8 | read | full block |" in r.stdout


def test_the_runtimes_turn_cut_of_a_scaled_workload_is_logged(caplog):
    """`workload.turns` cut each synthetic / trace agent to its first turns without a word (a trace replayed in the
    runtime lost its later turns silently; the simulator logs its max_turns cut). Contract: one info line naming the
    field and the turns dropped; none when nothing is cut."""
    from test_mutation_audit2 import _cfg

    from dualpath_jax.runtime.driver import _scaled
    from dualpath_jax.workloads.types import Trajectory, Turn

    trajs = [Trajectory(0, [Turn(10, 4), Turn(6, 3), Turn(8, 2)]), Trajectory(1, [Turn(5, 1)])]
    with caplog.at_level("INFO", logger="dualpath_jax.runtime.driver"):
        out = _scaled(trajs, _cfg(**{"workload.turns": 2}).workload)
    assert [len(t.turns) for t in out] == [2, 1]
    assert "workload.turns=2: 1 of 4 turns dropped (1 agents cut)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="dualpath_jax.runtime.driver"):
        _scaled(trajs, _cfg(**{"workload.turns": 3}).workload)
    assert "workload.turns" not in caplog.text


def test_write_backs_the_store_did_not_keep_reach_the_run_results(tmp_path):
    """Write-back blocks the KV store refused (no room: its capacity pinned) were counted by the store only
    (`write_rejected`, a log line each); the run's node stats, results.json and table said nothing, so a run with a too
    small `capacity_bytes` looked like a full-size store's. Contract: the storage NIC counts them (`unstored_blocks`,
    in each node's stats), `experiments.run` sums them per policy and notes them under the table."""
    import threading
    from types import SimpleNamespace

    import numpy as np
    from test_runtime_hunt2 import LAYOUT

    from dualpath_jax.block_keys import block_keys, root_key
    from dualpath_jax.runtime.storage_nic import StorageNIC, WriteJob
    from dualpath_jax.store import LocalDirStore
    from experiments.run import unstored_blocks, unstored_note

    one_block = LocalDirStore(tmp_path / "probe", LAYOUT).file_nbytes
    store = LocalDirStore(tmp_path / "kv", LAYOUT, capacity_bytes=one_block)  # room for one block, pinned below
    pinned = block_keys(np.arange(100, 104), LAYOUT.block_tokens, parent=root_key(LAYOUT.fingerprint))
    assert store.write(pinned[0], np.zeros(LAYOUT.full_block_shape, np.uint8))
    store.pin(pinned[:1])
    keys = block_keys(np.arange(12), LAYOUT.block_tokens, parent=root_key(LAYOUT.fingerprint))
    snic = StorageNIC(0, store, LAYOUT.block_tokens, pace=lambda n: None)
    done = threading.Event()
    blocks = [np.full(LAYOUT.full_block_shape, 7, np.uint8)] * len(keys)
    snic.submit_write(WriteJob(keys, blocks, lambda n: done.set()))
    assert done.wait(30)
    snic.close()
    store.close()
    assert snic.unstored_blocks == 3 and store.stats().write_rejected == 3  # (12 token ids: 3 blocks of 4)

    run = SimpleNamespace(node_stats={0: {"unstored_blocks": 3}, 1: {"unstored_blocks": 2}, 2: {}})
    assert unstored_blocks(run) == 5 and unstored_blocks(SimpleNamespace(node_stats={})) == 0
    assert unstored_note("dualpath", run).startswith("note: dualpath's run could not store 5 write-back blocks")
