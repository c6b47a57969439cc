"""Session 39's small fixes (each test fails on the code before its fix)."""

import os
from types import SimpleNamespace


def test_the_table_gives_each_runs_hit_rate():
    """A bounded store (`capacity_bytes`) changes a run's hits, and the table had no column for them (only
    results.json's `hit_rate`): a capacity sweep had to open every results.json."""
    from experiments.run import format_table

    res = {
        "basic": SimpleNamespace(summary={"jct_s": 2.0, "hit_rate": 0.5236}),
        "x": SimpleNamespace(summary={"jct_s": 1.0}),
    }
    header, _, first, second = format_table(res).splitlines()
    names = [h.strip() for h in header.split("  ") if h.strip()]
    assert dict(zip(names, first.split(), strict=True))["hit rate"] == "52.4%"
    assert dict(zip(names, second.split(), strict=True))["hit rate"] == "n/a"  # (no hit rate given: not "nan%")


def test_bench_runtimes_simulator_copy_holds_the_runtimes_bounded_store():
    """`bench_runtime` on a bounded store (`capacity_bytes`) printed the simulator's prediction of an unbounded store
    (its hits, and so its JCTs, a store's that evicts nothing) without a word: the copy now holds as many whole
    blocks (`cluster.store_capacity_gb`), and the note says how the two stores differ."""
    from dualpath_jax.runtime.config import RuntimeConfig
    from dualpath_jax.sim.simulator import _room_tokens
    from dualpath_jax.store import block_file
    from experiments.bench_runtime import bounded_store_note, sim_config, sim_store_capacity_gb

    kv = SimpleNamespace(num_layers=2, bytes_per_token_per_layer=64)
    ops = SimpleNamespace(kv_layout=kv, fingerprint="fp", config=SimpleNamespace(kv_bytes_per_token=128))
    cfg = RuntimeConfig()
    assert sim_store_capacity_gb(cfg, ops) is None and bounded_store_note(cfg, None) is None
    from dualpath_jax.runtime.node import block_layout

    file_b = block_file.file_nbytes(block_layout(cfg, ops))  # a header + the Full Block's 128 B x block_size
    assert file_b > 128 * cfg.block_size
    bounded = cfg.replace(store_options={"capacity_bytes": 3 * file_b + file_b // 2})  # 3 whole block files
    gb = sim_store_capacity_gb(bounded, ops)
    assert _room_tokens(gb, 128, "store_capacity_gb") == 3 * cfg.block_size  # the simulator's room: 3 whole blocks
    # exactly as many blocks where the bare product would floor one token short (15 blocks of 16 at 1,024 B/token)
    kv1k = SimpleNamespace(kv_layout=SimpleNamespace(num_layers=2, bytes_per_token_per_layer=512), fingerprint="fp",
                           config=SimpleNamespace(kv_bytes_per_token=1024))  # fmt: skip
    fifteen = cfg.replace(store_options={"capacity_bytes": 15 * block_file.file_nbytes(block_layout(cfg, kv1k))})
    assert _room_tokens(sim_store_capacity_gb(fifteen, kv1k), 1024, "store_capacity_gb") == 15 * cfg.block_size
    note = bounded_store_note(bounded, gb)
    assert f"capacity_bytes={3 * file_b + file_b // 2}" in note and "per decode node process" not in note
    # one keeper of the capacity (the driver's store object) whatever the launcher (fix23: was per decode node process)
    assert "keeps the capacity for every node" in note
    assert bounded_store_note(bounded.replace(launcher="inprocess"), gb) == note
    # a store of one's own: its capacity's meaning is its own, so the copy stays unbounded and says so
    own = bounded.replace(store="my_store")
    assert sim_store_capacity_gb(own, ops) is None and "unbounded" in bounded_store_note(own, None)
    # the copy's cluster carries it (and the default None)
    from schedulers.cost_model import MODEL_SHAPES

    shape = MODEL_SHAPES.get(MODEL_SHAPES.names()[0])
    assert sim_config(bounded, shape, {}, store_capacity_gb=gb).cluster.store_capacity_gb == gb
    assert sim_config(cfg, shape, {}).cluster.store_capacity_gb is None


def test_a_storage_nic_logs_its_first_unreadable_blocks_and_counts_the_rest(tmp_path, caplog):
    """A store far smaller than the working set evicts blocks between the scheduler's lookup and the read all the time:
    the storage NIC logged a warning per block (79 in one main job at 1 MiB per process). Now the first
    LOGGED_FAILED_READS are logged, the last of them saying the rest are counted (`failed_reads`)."""
    import logging
    import threading

    import numpy as np

    from dualpath_jax.block_keys import block_keys, root_key
    from dualpath_jax.kv_layout import BlockLayout
    from dualpath_jax.runtime.storage_nic import LOGGED_FAILED_READS, ReadJob, StorageNIC
    from dualpath_jax.store import LocalDirStore

    layout = BlockLayout(num_layers=2, block_tokens=16, bytes_per_token_per_layer=8, fingerprint="fix22/snic")
    store = LocalDirStore(tmp_path / "kv", layout)
    keys = block_keys(np.arange(16), 16, parent=root_key(layout.fingerprint))  # one block, never written
    snic = StorageNIC(0, store, 16, pace=lambda n: None)
    area = np.zeros((2, 16, 8), np.uint8)
    n = LOGGED_FAILED_READS + 3
    with caplog.at_level(logging.WARNING, logger="dualpath_jax.runtime.storage_nic"):
        for rid in range(n):
            done = threading.Event()
            snic.submit_read(ReadJob(rid, 0, keys, 0, area, lambda *a, d=done: d.set()))
            assert done.wait(30)
    snic.close()
    store.close()
    lines = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert snic.failed_reads == n and len(lines) == LOGGED_FAILED_READS
    assert lines[-1].endswith("further ones are counted, not logged (node_stats failed_reads)")
    assert "request 0 " in lines[0] and "further" not in lines[0]


def test_a_block_another_process_removed_is_not_counted_as_this_stores_eviction(tmp_path):
    """Every process's store object evicts from its own view of a shared directory; a victim whose file another one
    had removed already counted as an eviction again, so a run's summed `evictions` (`store_stats`) exceeded its
    writes (8,872 evictions for 3,951 writes in one main job at 1 MiB per process). It is dropped, not counted."""
    import numpy as np

    from dualpath_jax.block_keys import block_keys, root_key
    from dualpath_jax.kv_layout import BlockLayout
    from dualpath_jax.store import LocalDirStore, block_file

    layout = BlockLayout(num_layers=2, block_tokens=16, bytes_per_token_per_layer=8, fingerprint="fix22/evict")
    writer = LocalDirStore(tmp_path, layout)
    reader = LocalDirStore(tmp_path, layout, capacity_bytes=2 * block_file.file_nbytes(layout))  # 2 blocks
    keys = [block_keys(np.full(16, i), 16, parent=root_key(layout.fingerprint))[0] for i in range(3)]
    for k in keys:
        assert writer.write(k, np.full(layout.full_block_shape, 7, np.uint8))
    assert reader.lookup([keys[0]]) == 1 and reader.lookup([keys[1]]) == 1  # adopted: its view is full
    assert writer.remove(keys[0])  # another process removes the reader's least recently used block
    assert reader.lookup([keys[2]]) == 1  # adopting it evicts keys[0] from the reader's view: its file was gone
    st = reader.stats()
    assert st.evictions == 0 and st.bytes_evicted == 0
    assert sorted(reader.keys()) == sorted(keys[1:]) and reader.used_bytes == 2 * block_file.file_nbytes(layout)
    # a victim whose file is there is removed and counted
    writer.write(keys[0], np.full(layout.full_block_shape, 7, np.uint8))
    assert reader.lookup([keys[0]]) == 1 and reader.stats().evictions == 1
    writer.close()
    reader.close()


def test_the_drivers_store_object_keeps_the_capacity_and_answers_fresh_hits(tmp_path):
    """The driver's store object (the scheduler's lookups) enforced `capacity_bytes` on its own view: its lookups
    index every hit, so it deleted blocks the nodes had written and were about to read (5 of a run's 33 evictions on
    `:test` at 200,000 B), and it answered hits from its index for blocks a node had evicted since (the read then
    missed). Then (fix22) it had no capacity and the decode nodes' objects kept it, each per process (about 2x the
    capacity in the directory with two). Now (fix23) it is the one keeper of the capacity (`StoreKeeper` pins what
    the turns in flight will read): opened with it and `stat_on_hit`; the nodes' objects have none and evict nothing."""
    import os

    import numpy as np

    from dualpath_jax.block_keys import block_keys, root_key
    from dualpath_jax.kv_layout import BlockLayout
    from dualpath_jax.runtime.config import RuntimeConfig
    from dualpath_jax.runtime.launcher import open_store
    from dualpath_jax.store import block_file

    layout = BlockLayout(num_layers=2, block_tokens=16, bytes_per_token_per_layer=8, fingerprint="fix22/driver")
    two = 2 * block_file.file_nbytes(layout)
    cfg = RuntimeConfig(store_dir=str(tmp_path), store_options={"capacity_bytes": two})
    node = open_store(cfg, layout)  # a node's object: no capacity
    driver = open_store(cfg, layout, keeper=True)
    assert node.capacity_bytes is None and driver.capacity_bytes == two and driver.stat_on_hit
    keys = [block_keys(np.full(16, i), 16, parent=root_key(layout.fingerprint))[0] for i in range(4)]
    block = np.full(layout.full_block_shape, 3, np.uint8)
    for k in keys:
        assert node.write(k, block)  # the node keeps all 4 and evicts none
    assert node.stats().evictions == 0 and all(os.path.exists(node.path_of(k)) for k in keys)
    for k in keys:
        assert driver.lookup([k]) == 1  # the keeper indexes each, evicting the least recently used to fit two
    assert [os.path.exists(node.path_of(k)) for k in keys] == [False, False, True, True]
    assert driver.stats().evictions == 2 and driver.keys() == keys[2:]
    assert node.remove(keys[2])  # removed by a node (a corrupt block, say): not a hit from the keeper's index
    assert driver.lookup([keys[2]]) == 0
    # an unbounded store: the driver's object is opened as the nodes' are
    assert open_store(cfg.replace(store_options={}), layout, keeper=True).capacity_bytes is None
    node.close()
    driver.close()


def test_a_dotted_override_into_the_runtimes_store_options_names_the_dict_flag():
    """`--config.runtime.store_options.capacity_bytes=N` (the dotted form every other field takes) said only "the
    config has no field 'capacity_bytes'": the option dicts take one flag with the whole dict."""
    from experiments import _bad_override

    argv = ["run", "--config.runtime.store_options.capacity_bytes=400000"]
    line = _bad_override(argv, KeyError("'capacity_bytes'"))
    assert line == (
        "bad override --config.runtime.store_options.capacity_bytes=400000: the config has no field 'capacity_bytes'. "
        "An option of config.runtime.store_options is given with the whole dict: "
        "--config.runtime.store_options=\"{'capacity_bytes': VALUE}\""
    )
    argv = ["run", "--config.runtime.transport_options.chunk=1"]
    assert "--config.runtime.transport_options=\"{'chunk': VALUE}\"" in _bad_override(argv, KeyError("'chunk'"))
    # another missing field keeps the plain line
    assert _bad_override(["run", "--config.runtime.snic=1"], KeyError("'snic'")).endswith("no field 'snic'.")


def test_a_sweep_over_store_capacities_carries_the_stores_counters():
    """`experiments.sweep --loads=cluster.store_capacity_gb=...` gave each cell's hit rate but none of the bounded
    store's counters (evicted bytes, lookups cut) and plotted no hit rate: a capacity study had to re-run each cell."""
    from experiments.sweep import COLUMNS, plot_metrics, run_cell

    bounded = run_cell(("configs/sim_tiny.py", "dualpath", "cluster.store_capacity_gb=1", "", ""))
    unbounded = run_cell(("configs/sim_tiny.py", "dualpath", "", "", ""))
    assert {"store_evicted_bytes", "store_lost_lookups"} <= set(COLUMNS)
    assert bounded["store_evicted_bytes"] > 0 and bounded["store_lost_lookups"] > 0
    assert bounded["hit_rate"] < unbounded["hit_rate"] and "store_evicted_bytes" not in unbounded
    assert ("hit_rate", "hit rate") in plot_metrics([bounded, unbounded])
    assert "hit_rate" not in dict(plot_metrics([unbounded]))  # (the workload's own: the same in every cell)


_STUB_BOUNDED_BENCH = """
import sys, types
from absl import app
from dualpath_jax.runtime import driver
from experiments import bench_runtime, parse_flags_or_exit

def run(cfg, ts, **kw):
    s = {"jct_s": 2.0 if cfg.scheduler.name == "basic" else 1.0, "pe_read_bytes": 1, "de_read_bytes": 0,
         "snic_max_over_avg": 1.5, "hit_rate": 0.25}
    return types.SimpleNamespace(summary=s, store_stats={"evictions": 7, "read_absent": 1}, tokens={})

kv = types.SimpleNamespace(num_layers=2, bytes_per_token_per_layer=64)
ops = types.SimpleNamespace(kv_layout=kv, fingerprint="fp", config=types.SimpleNamespace(kv_bytes_per_token=128))
driver.prepare = lambda cfg, *a, **k: ([types.SimpleNamespace(turns=[0])] * 8, ops)
driver.measure_prefill_tokens_per_s = lambda ops, cfg, *a, **k: 1000.0
driver.run = run
bench_runtime._plot = lambda out, path: None
sys.argv = [sys.argv[0], "--config=configs/tiny_runtime.py:test", "--skip_sim", "--skip_overhead",
            "--config.results_dir=" + sys.argv[1], "--config.runtime.store_options={'capacity_bytes': 1000000}"]
app.run(bench_runtime.main, flags_parser=parse_flags_or_exit)
"""


def test_bench_runtime_json_has_the_runtimes_store_counters_of_a_bounded_store(tmp_path):
    """bench_runtime.json had a bounded store's counters for the simulator's copy only (`simulated.<policy>`), none
    for the measured runs: evictions could not be compared side by side from the one file."""
    import json
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", _STUB_BOUNDED_BENCH, str(tmp_path)],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (path,) = tmp_path.glob("bench_runtime-*/bench_runtime.json")
    measured = json.loads(path.read_text())["measured"]
    assert measured["basic"]["store_stats"] == measured["dualpath"]["store_stats"] == {"evictions": 7, "read_absent": 1}


def test_a_capacity_probe_records_its_hit_rate_and_a_bounded_stores_counters():
    """`experiments.capacity`'s probes recorded the SLO's figures only: on a bounded store the hits depend on the
    load (more agents fill the store), and neither the hit rate nor the store's counters could be read back."""
    import dataclasses

    from dualpath_jax.sim import load_sim_config
    from dualpath_jax.sim.capacity import probe

    cfg = load_sim_config("configs/sim_tiny.py")
    cfg = dataclasses.replace(cfg, workload=dataclasses.replace(cfg.workload, duration_s=20.0))
    bounded = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, store_capacity_gb=0.5))
    free, tight = probe(cfg, 1.0, drain_s=20.0), probe(bounded, 1.0, drain_s=20.0)
    assert 0 < tight["hit_rate"] < free["hit_rate"]
    assert tight["store_evicted_bytes"] > 0 and tight["store_lost_lookups"] > 0 and "store_evicted_bytes" not in free


def test_an_output_directory_flag_of_the_other_tool_names_this_ones():
    """The simulator's launchers write under `config.output_dir`, the runtime's under `config.results_dir`; the other
    tool's name said only "no field"."""
    from experiments import _bad_override

    line = _bad_override(["run", "--config.output_dir=/tmp/x"], KeyError("'output_dir'"))
    assert line.endswith("no field 'output_dir'. Did you mean \"--config.results_dir\"? (the simulator's launchers: "
                         "output_dir; the runtime's: results_dir)")  # fmt: skip
    assert 'Did you mean "--config.output_dir"?' in _bad_override(
        ["simulate", "--config.results_dir=x"], KeyError("'results_dir'")
    )
